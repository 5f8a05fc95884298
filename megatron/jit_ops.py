"""Just-in-time built ops, built by deepy.py before any rank starts.

The ranks need DeepSpeed's CPU shared-memory all-reduce (on the CPU accelerator) and the data index helpers
(`megatron/data/helpers.cpp`). Built by the ranks themselves, every rank of a machine would reach the build
at the same moment; several compilers at once on a small machine were OOM-killed and the other rank hung.
Built here once, into TORCH_EXTENSIONS_DIR, the ranks only load the cached files (hosts that do not share
that folder build their own once, under the builders' file locks).
"""


def build_jit_ops(log=print) -> list:
    """Build (or find cached) every JIT op the ranks load; returns the names built or found."""
    names = []
    from megatron.data.helpers import get_cpp_helpers

    if get_cpp_helpers() is not None:  # None: the numpy twin is used (a warning was printed)
        names.append("megatron_data_helpers")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible(verbose=False):
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            builder.load(verbose=False)
        names.append(builder.NAME)
    log(f"JIT ops ready in TORCH_EXTENSIONS_DIR: {', '.join(names) or 'none needed'}")
    return names
