"""Files written safely: atomic file and directory writes, JSON, sha256, image listing, downloads."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; it replaces `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file and a rename: readers never see a truncated file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write pretty JSON."""
    return atomic_write(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


@contextlib.contextmanager
def atomic_dir(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to `folder`; on success it takes `folder`'s place (the old one is removed)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    old = None
    try:
        yield tmp
        if folder.exists():  # move the previous folder aside, put the new one in, then delete the old one
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / "x")
        try:
            os.replace(tmp, folder)
        except OSError:
            if old is not None:
                os.replace(old / "x", folder)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in blocks (multi-GB files are never held in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, hex."""
    return file_digest(path, "sha256")


def list_images(image_dir: str | os.PathLike) -> list[str]:
    """Sorted names of the image files (.jpg/.jpeg/.png) directly in `image_dir`."""
    d = Path(image_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: image folder not found")
    with os.scandir(d) as it:
        return sorted(e.name for e in it if e.name.lower().endswith(IMAGE_EXTS) and e.is_file())


def download_url(url: str, path: str | os.PathLike, md5: str | None = None, progress: bool = True) -> Path:
    """Fetch `url` to `path` (progress bar, temp file + rename, by torch.hub); a file already there with the
    expected `md5` (or any file, without one) is kept. A digest mismatch removes the file and raises."""
    path = Path(path)
    if path.is_file() and (md5 is None or file_digest(path, "md5") == md5):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=progress)
    if md5 is not None and (got := file_digest(path, "md5")) != md5:
        path.unlink()
        raise OSError(f"{url}: md5 {got} != expected {md5}; the download was removed")
    return path
