"""Fetch Debian packages with ``apt-get download`` (no install, no root needed for the files) and unpack them.

Unpacking reads the ``.deb`` directly (an ``ar`` archive holding ``data.tar.{xz,gz,zst}``) so neither
``dpkg-deb`` nor root is required, and only the requested members are written.
"""
from __future__ import annotations

import glob
import io
import os
import shutil
import subprocess
import tarfile


class PackageError(RuntimeError):
    """A package could not be downloaded or unpacked."""


def apt_available() -> bool:
    return shutil.which("apt-get") is not None


def _needs_update(stderr: str) -> bool:
    # Without package lists apt cannot resolve the name; "apt-get update" fixes that once.
    return any(s in stderr for s in ("Unable to locate package", "has no installation candidate",
                                     "No packages found", "Couldn't find any package"))


def find_deb(package: str, dest: str) -> str | None:
    hits = sorted(glob.glob(os.path.join(dest, f"{package}_*.deb")))
    return hits[-1] if hits else None


def apt_download(package: str, dest: str, log=print, _updated: list | None = None) -> str:
    """Path of ``<dest>/<package>_*.deb``, downloading it with ``apt-get download`` if absent."""
    existing = find_deb(package, dest)
    if existing:
        return existing
    if not apt_available():
        raise PackageError(f"apt-get is not available to download {package}")
    os.makedirs(dest, exist_ok=True)
    updated = _updated if _updated is not None else []
    for attempt in range(2):
        log(f"apt-get download {package}")
        r = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
        deb = find_deb(package, dest)
        if r.returncode == 0 and deb:
            return deb
        if attempt == 0 and _needs_update(r.stderr) and not updated:
            log("package lists missing or stale: running apt-get update")
            u = subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            updated.append(True)
            if u.returncode != 0:
                raise PackageError(f"apt-get update failed (needed to find {package}): {u.stderr.strip()[-500:]}")
            continue
        break
    raise PackageError(f"apt-get download {package} failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")


def _ar_members(path: str):
    """Yield ``(name, bytes)`` of the members of an ``ar`` archive (the .deb container)."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise PackageError(f"{path} is not a .deb (ar) archive")
        while True:
            hdr = f.read(60)
            if not hdr:
                return
            if len(hdr) < 60 or hdr[58:60] != b"`\n":
                raise PackageError(f"{path}: corrupt ar member header")
            name = hdr[:16].decode("ascii").strip().rstrip("/")
            size = int(hdr[48:58].decode("ascii").strip())
            data = f.read(size)
            if len(data) != size:
                raise PackageError(f"{path}: truncated member {name}")
            if size % 2:
                f.read(1)  # members are 2-byte aligned
            yield name, data


def _open_data_tar(path: str) -> tarfile.TarFile:
    for name, data in _ar_members(path):
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                import zstandard

                data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
                return tarfile.open(fileobj=io.BytesIO(data), mode="r:")
            return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    raise PackageError(f"{path} has no data.tar member")


def extract_deb(path: str, dest: str, members: list[str]) -> dict[str, str]:
    """Write the package files ``members`` (paths like ``usr/lib/x``) under ``dest``; returns name -> path.

    Files are written to a temporary name and renamed. A requested member missing from the package is
    an error naming it.
    """
    out = {}
    wanted = {m.lstrip("./"): m for m in members}
    with _open_data_tar(path) as tar:
        for info in tar:
            name = info.name.lstrip("./")
            if name not in wanted or not info.isfile():
                continue
            target = os.path.join(dest, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp.{os.getpid()}"
            with tar.extractfile(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.chmod(tmp, info.mode & 0o755)
            os.replace(tmp, target)
            out[wanted[name]] = target
    missing = [m for m in members if m not in out]
    if missing:
        raise PackageError(f"{path} does not contain {', '.join(missing)}")
    return out
