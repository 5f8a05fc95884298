"""Per-rank entry point: ``deepy.py`` launches this on every rank with ``--neox_config_file PATH``."""
import sys


def main() -> int:
    from megatron.neox_arguments import NeoXArgs
    from megatron.training import pretrain

    neox_args = NeoXArgs.consume_neox_args()
    return pretrain(neox_args)


if __name__ == "__main__":
    sys.exit(main())
