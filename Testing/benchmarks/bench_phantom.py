"""Benchmark: seconds per phantom slice at 512 x 512 (one core), and where the time goes.

Measured side by side in one run, best of --repeat, on a warm subject (its layout planned):
  make_slice 512, supersample 4   the default slice (HU, labels, exact fractions)
  make_slice 512, supersample 1   the same anatomy sampled at pixel centres only
  make_slice 256 / 64             smaller slices of the same field of view
  stages at 512 x 4               painting the anatomy, fractions (EPD of the subpixel map),
                                  the CT image (partial volume, texture, blur, noise)
  subject planning                drawing a new subject (first slice of a seed)
Run pinned to one core for the one-core figure:

    taskset -c 0 python Testing/benchmarks/bench_phantom.py
    python Testing/benchmarks/bench_phantom.py --quick      # fewer repeats
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args()
    repeat = 2 if args.quick else args.repeat

    from EPDSegmentationLib.core.classes import NUM_CLASSES
    from EPDSegmentationLib.core.epd import epd_labels
    from training.phantom import make_slice
    from training.phantom.anatomy import draw, plan_layout
    from training.phantom.generate import render_image
    from training.phantom.raster import Canvas
    from training.phantom.anatomy import subject_from_seed
    from training.phantom.subject import draw_subject
    from training.phantom.tissues import CLASS_OF

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"phantom benchmark: seed {args.seed}, best of {repeat}, {cores} core(s) available")
    s = subject_from_seed(args.seed)
    make_slice(args.seed)                       # warm up imports and caches
    rows = []
    base = best(lambda: make_slice(args.seed), repeat)
    rows.append(("make_slice 512, supersample 4 (default)", base))
    rows.append(("make_slice 512, supersample 1", best(lambda: make_slice(args.seed, supersample=1), repeat)))
    rows.append(("make_slice 256, supersample 4", best(lambda: make_slice(args.seed, size=256), repeat)))
    rows.append(("make_slice 64, supersample 4", best(lambda: make_slice(args.seed, size=64), repeat)))
    n = 512 * 4
    state = {}

    def paint():
        cv = Canvas(n, s.fov_mm)
        draw(cv, s, 0.0)
        state["codes"] = cv.codes

    rows.append(("  stage: paint the anatomy (2048 x 2048 codes)", best(paint, repeat)))
    rows.append(("  stage: exact fractions (EPD of the subpixel map)",
                 best(lambda: epd_labels(CLASS_OF[state["codes"]], NUM_CLASSES, 4, workers=1), repeat)))
    rng = np.random.default_rng(0)
    rows.append(("  stage: CT image (partial volume, texture, blur, noise)",
                 best(lambda: render_image(state["codes"], 4, s, s.fov_mm / 512, rng), repeat)))

    def plan():
        t = draw_subject(args.seed)
        plan_layout(t)

    rows.append(("subject planning (once per seed)", best(plan, repeat)))
    width = max(len(r[0]) for r in rows)
    for name, t in rows:
        print(f"{name:<{width}}  {t:7.3f} s   {t / base:5.2f} x default")
    print(f"seconds per 512 x 512 slice: {base:.3f}")


if __name__ == "__main__":
    main()
