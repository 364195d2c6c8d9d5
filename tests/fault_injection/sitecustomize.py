"""Python imports this at start-up in every process a test runs with this folder on
PYTHONPATH. With WLORA_TEST_ENOSPC=<what>:<rank>:<step> it makes one rank's write of the
step-<step> checkpoint fail as a full disk does (OSError ENOSPC): ``shards`` its DCP shard
file, ``rng`` its RNG file. Everything else, and every other rank, is untouched; without
the variable this does nothing. (Where the tests can mount a small tmpfs they fill a real
disk instead: tests/test_disk_full.py.)"""

import os


def _install(what: str, step: int) -> None:
    import errno

    marker = f"step-{step:08d}.tmp"

    def full(path: object) -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if what == "shards":
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        real_write = HuggingFaceStorageWriter.write_data

        def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
            if marker in str(self.path):
                raise full(self.path)
            return real_write(self, plan, planner)

        HuggingFaceStorageWriter.write_data = write_data  # type: ignore[method-assign]
    elif what == "rng":
        import safetensors.torch

        real_save = safetensors.torch.save_file

        def save_file(tensors, filename, *args, **kwargs):  # type: ignore[no-untyped-def]
            if marker in str(filename) and "rng" in str(filename):
                raise full(filename)
            return real_save(tensors, filename, *args, **kwargs)

        safetensors.torch.save_file = save_file


_spec = os.environ.get("WLORA_TEST_ENOSPC")
if _spec and os.environ.get("RANK") == _spec.split(":")[1]:
    _what, _, _step = _spec.split(":")
    _install(_what, int(_step))
