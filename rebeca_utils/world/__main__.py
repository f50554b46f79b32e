"""`python -m rebeca_utils.world [--profile smoke]`: train (or find) the smoke world, print what each part took."""
from __future__ import annotations

import argparse
import json
import os
import time

from ..config import get_profile
from .cache import WORLD_THREADS, ensure_world, world_report


def main(argv: list[str] | None = None) -> int:
    """Train (or find) the world of a tiny-builder profile and print each component's record."""
    parser = argparse.ArgumentParser(prog="python -m rebeca_utils.world", description=__doc__)
    parser.add_argument("--profile", default="smoke", help="a profile with the tiny builder (smoke or demo)")
    models = get_profile(parser.parse_args(argv).profile).models
    if models.builder != "tiny":
        parser.error(f"--profile: the {models.builder!r} builder loads the paper's weights; no world to train")
    t0 = time.perf_counter()
    world = ensure_world(models)
    print(f"smoke world {world} ready in {time.perf_counter() - t0:.0f} s "
          f"(trains with {WORLD_THREADS} torch threads; load {os.getloadavg()[0]:.2f})")
    for name, rec in world_report(models).items():
        if isinstance(rec, dict):
            print(f"  {name}: trained in {rec['seconds']} s with {rec['threads']} thread(s) at load "
                  f"{rec['load_avg'][0]}; {json.dumps(rec['metrics'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
