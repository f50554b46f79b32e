"""Peak memory of LoRA training against the number of training images: the streamed data keeps it flat.

``python -m rebeca_utils.baselines.lora_bench --sizes 50 500 --folder /tmp/lora_rss`` writes N images to disk for
each size, trains a few steps of a tiny-pipeline LoRA on them in a fresh process per size, and prints one JSON line
per size: peak RSS of the training process (and of its data workers), seconds, load average and torch threads.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..config import SMOKE_LORA, get_profile
from . import lora as L
from . import lora_data as D
from .lora_cli import build_training_pipeline
from .lora_recipe import LoraSpec

IMAGE_SIZE = (2048, 64)  # (width, height): at resolution 64 a decoded image keeps 384 KiB, as a 512² one at 512


def make_images(folder: str | os.PathLike, n: int, size: tuple[int, int] = IMAGE_SIZE) -> list[Path]:
    """n distinct flat-colour PNGs of `size` in `folder` (kept when there): cheap to write, full size once decoded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        path = folder / f"img_{size[0]}x{size[1]}_{k:06d}.png"
        if not path.is_file():
            colour = ((k * 37) % 256, (k * 91) % 256, (k * 13) % 256)
            Image.new("RGB", size, colour).save(path)
        paths.append(path)
    return paths


def stream_rss(n_images: int, folder: str | os.PathLike, steps: int = 4, resolution: int = 64,
               num_workers: int = 0, size: tuple[int, int] = IMAGE_SIZE) -> dict:
    """Train `steps` steps of a tiny-pipeline LoRA on n_images images in this process; its peak RSS (call it in a
    fresh process: ru_maxrss never goes down)."""
    paths = make_images(folder, n_images, size)
    pipe = build_training_pipeline(get_profile("smoke").models, "cpu", SMOKE_LORA)
    base, t0 = D.peak_rss_mb(), time.perf_counter()
    with _RssSampler() as during:  # imports and the model build peak higher: sample the training itself
        L.train_adapter(pipe, paths, [""] * len(paths), LoraSpec(4, 4, 0.0, steps, 0), SMOKE_LORA, seed=0,
                        resolution=resolution, progress=False, num_workers=num_workers)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest ended worker (Linux: KiB)
    decoded = size[0] * resolution / size[1] * resolution * 3 / 1024  # one image once resized, KiB
    return {"n_images": n_images, "training_rss_growth_mb": round(during.peak - during.start, 1),
            "peak_rss_mb": round(D.peak_rss_mb(), 1), "peak_before_training_mb": round(base, 1),
            "workers_peak_rss_mb": round(workers, 1), "seconds": round(time.perf_counter() - t0, 2),
            "num_workers": num_workers, "steps": steps, "decoded_image_kib": round(decoded),
            "all_decoded_mb": round(decoded * n_images / 1024, 1), "torch_threads": torch.get_num_threads(),
            "load_1min": round(os.getloadavg()[0], 2)}


def rss_now_mb() -> float:
    """Current resident memory of this process, MB (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return D.peak_rss_mb()


class _RssSampler:
    """The largest current RSS seen every 5 ms inside the block (`start`: at its entry)."""

    def __enter__(self):
        self.start = self.peak = rss_now_mb()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss_now_mb())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_now_mb())


def rss_curve(sizes: Sequence[int], folder: str | os.PathLike, steps: int = 4, resolution: int = 64,
              num_workers: int = 0, timeout_s: float = 600) -> list[dict]:
    """stream_rss for each size, each in a fresh Python process (one torch thread unless OMP_NUM_THREADS says)."""
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for n in sizes:
        cmd = [sys.executable, "-m", "rebeca_utils.baselines.lora_bench", "--one", str(n), "--folder", str(folder),
               "--steps", str(steps), "--resolution", str(resolution), "--num-workers", str(num_workers)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        if r.returncode != 0:
            raise RuntimeError(f"lora_bench --one {n} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: one JSON line per dataset size."""
    p = argparse.ArgumentParser(prog="python -m rebeca_utils.baselines.lora_bench", description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 500])
    p.add_argument("--one", type=int, help="measure one size in this process (what --sizes runs per size)")
    p.add_argument("--folder", required=True, help="where the images are written (kept for later runs)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    a = p.parse_args(argv)
    if a.one is not None:
        print(json.dumps(stream_rss(a.one, a.folder, a.steps, a.resolution, a.num_workers)))
        return 0
    for row in rss_curve(a.sizes, a.folder, a.steps, a.resolution, a.num_workers):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
