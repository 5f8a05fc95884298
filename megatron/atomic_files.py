"""Writing a small file so that readers see the old content or the new, never half of it."""
import os
import tempfile


def atomic_write_text(path: str, text: str, suffix: str = "") -> str:
    """Writes ``text`` to ``path`` through a temporary file in the same folder, ``fsync`` and ``os.replace`` (then
    the folder is synced), so readers see the old content or the new; the temporary file is removed if anything
    fails. Returns the absolute path."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
    return path


def fsync_dir(path: str) -> None:
    """Makes a rename or a new entry in the folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_directory(tmp, out) -> None:
    """Puts the finished directory ``tmp`` at ``out``. A previous ``out`` (which the caller has recognised as its own
    earlier output) is renamed aside first and removed only once ``tmp`` is in place."""
    import shutil
    import uuid

    tmp, out = os.fspath(tmp), os.fspath(out)
    if os.path.exists(out):
        parent, name = os.path.split(os.path.abspath(out))
        old = os.path.join(parent, f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    fsync_dir(os.path.dirname(os.path.abspath(out)))
