"""REBECA kit: reusable helpers for the notebooks (data, models, prior, diffusion, metrics, plots)."""
from __future__ import annotations

import os
import random

__version__ = "0.1.0"

DEVICE_ENV = "REBECA_DEVICE"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global RNGs (model init, dropout); sampling uses its own generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def resolve_device(device: str = "auto") -> str:
    """'auto' -> $REBECA_DEVICE if set, else cuda > mps > cpu; explicit names are checked."""
    import torch

    if device == "auto":
        device = os.environ.get(DEVICE_ENV, "") or "auto"
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r}: valid devices are auto, cpu, cuda[:N], mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(device: str, dtype: str = "auto"):
    """'auto' -> fp16 on CUDA, fp32 elsewhere; fp16/bf16 are refused off CUDA."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}: valid dtypes are auto, {', '.join(table)}")
    if dtype != "fp32" and not device.startswith("cuda"):
        raise ValueError(f"dtype={dtype!r} needs a CUDA device (got device={device!r}); use fp32")
    return table[dtype]
