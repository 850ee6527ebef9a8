"""Helpers for tests that write their own (possibly hostile) shards."""
import io
import tarfile


def write_tar(path, members):
    """Write a plain tar of (name, bytes) members; returns path."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
