"""Per-rank entry point: ``deepy.py`` launches this on every rank with ``--neox_config_file PATH``."""
import sys


def main(argv=None) -> int:
    from megatron.neox_arguments import NeoXArgs
    from megatron.neox_arguments.errors import ConfigError

    try:
        neox_args = NeoXArgs.consume_neox_args(argv)
    except ConfigError as err:
        print(f"train.py: configuration error: {err}", file=sys.stderr)
        return 2
    from megatron.training import pretrain

    return pretrain(neox_args)


if __name__ == "__main__":
    sys.exit(main())
