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

    code = pretrain(neox_args)
    shutdown_distributed()
    return code


def shutdown_distributed() -> None:
    """Ends the process group once every rank is done. Left to interpreter teardown, gloo's threads were
    destroyed while joinable, and a rank that had finished training aborted ("terminate called without an
    active exception", exit -6) in one of eight 2-process runs of `bench/bench_scaling.py --preset cpu`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
