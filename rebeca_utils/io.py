"""Files written safely: atomic file and directory writes, JSON, sha256, image listing, downloads."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from safetensors import safe_open

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
    """Atomically write pretty, strict JSON (NaN and infinities become null)."""
    text = json.dumps(_finite(obj), indent=2, default=_jsonable, allow_nan=False)
    return atomic_write(path, (text + "\n").encode())


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if hasattr(o, "tolist") and not isinstance(o, (str, bytes)):  # numpy / torch scalars and arrays
        return _finite(o.tolist())
    return o


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


ORPHAN_AGE_S = 600  # in a folder shared by processes, a temp file this old belongs to no live one

TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old-)")  # what atomic_path / atomic_dir name their temporaries


def remove_orphans(folder: str | os.PathLike, recursive: bool = False, min_age_s: float = 0.0) -> int:
    """Delete temporaries of atomic writes left in `folder` by a killed run; returns how many.

    Only the step that owns the folder calls this. `min_age_s` spares the fresh temporaries of other processes
    still writing into a shared folder (multi-process runs)."""
    folder, now, n = Path(folder), time.time(), 0
    if not folder.is_dir():
        return 0
    for p in sorted(folder.rglob(".*") if recursive else folder.glob(".*")):
        try:
            if not TEMP_NAME.match(p.name) or now - p.lstat().st_mtime < min_age_s:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            n += 1
        except FileNotFoundError:  # removed meanwhile (by its own process, or inside a removed folder)
            continue
    return n


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically and byte-reproducibly (sorted names and metadata keys).

    safetensors' own writer orders the metadata by a hash map, so equal inputs gave different bytes."""
    header: dict[str, Any] = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    return atomic_write(path, struct.pack("<Q", len(head)) + head + b"".join(blobs))


class CorruptFileError(OSError):
    """A file the kit wrote earlier is truncated or unreadable; the message names it and what to do."""


def read_safetensors(path: str | os.PathLike, redo: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a missing, truncated or corrupt file is one line naming it and `redo`."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: file not found; {redo}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for truncated files
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFileError(f"{path}: truncated or corrupt safetensors file ({why}); delete it and {redo}") from None


def save_model(model: Any, folder: str | os.PathLike) -> Path:
    """`save_pretrained` (config.json + model.safetensors) into a temp folder swapped into place: never half-written."""
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
    return Path(folder)


def load_model(cls: Any, folder: str | os.PathLike, redo: str) -> Any:
    """`cls.from_pretrained(folder)`; a missing, truncated or corrupt file is one line naming it and `redo`."""
    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise CorruptFileError(f"{folder / name}: not found; {redo}")
    read_safetensors(folder / "model.safetensors", redo)  # the hub mixin's own error would not name the file
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the hub mixin prints "Loading weights from local directory"
            return cls.from_pretrained(folder)
    except (ValueError, TypeError, OSError) as exc:  # e.g. a config.json of another model or version
        raise CorruptFileError(f"{folder}: cannot load ({str(exc).splitlines()[0]}); {redo}") from None


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in blocks (multi-GB files are never held in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, hex."""
    return file_digest(path, "sha256")


def path_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents; temporaries left out)."""
    path = Path(path)
    if path.is_file():
        return sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()
                    and not any(TEMP_NAME.match(x) for x in p.relative_to(path).parts)):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256(f)}\n".encode())
    return h.hexdigest()


def read_rgb(paths: Iterable[str | os.PathLike], size: tuple[int, int] | None = None) -> np.ndarray:
    """(n, H, W, 3) uint8 pixels of image files, each resized (bilinear) to `size` = (width, height) when given."""
    from PIL import Image  # only the callers that read pictures pay for PIL

    out = []
    for p in paths:
        with Image.open(p) as im:  # opened one at a time, so long lists never hold every file open
            im = im.convert("RGB")
            out.append(np.asarray(im.resize(size, Image.BILINEAR) if size else im))
    if not out:
        return np.zeros((0, size[1], size[0], 3) if size else (0, 0, 0, 3), np.uint8)
    return np.stack(out)


def image_arrays(paths: Iterable[str | os.PathLike], size: tuple[int, int] | None = None) -> np.ndarray:
    """(n, H, W, 3) floats in [0, 1] of image files (for grids), each resized to `size` = (width, height) if given."""
    return read_rgb(paths, size).astype(np.float32) / 255


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
