"""Writing a small file so that readers see the old content or the new, never half of it."""
import os
import tempfile


def atomic_write_text(path: str, text: str, suffix: str = "") -> str:
    """Writes ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``; the temporary
    file is removed if anything fails. Returns the absolute path."""
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
    return path
