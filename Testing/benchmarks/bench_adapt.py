"""Benchmark: time and peak memory of adapting the bundled model (core/adapt.adapt_model) on
corrected 512 x 512 slices at its factor 2 (target: 4 slices in under 2 minutes on the CPU).

The slices are phantom slices at the model's source spacing (0.865 mm, so they stay
512 x 512 and the network sees 256 x 256), labels as corrections; the default settings
(AdaptSettings, recorded in the output). Peak memory: the
process's peak resident set (ru_maxrss), which includes the model and the data.

    python Testing/benchmarks/bench_adapt.py                  # 4 slices, CPU, 1 thread
    python Testing/benchmarks/bench_adapt.py --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="default: AdaptSettings' default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    import numpy as np
    import torch

    from EPDSegmentationLib.core.adapt import AdaptCase, AdaptSettings, adapt_model
    from EPDSegmentationLib.core.inference import source_pixel_mm
    from EPDSegmentationLib.core.model_io import load_model
    from EPDSegmentationLib.core.resources import bundled_model_path
    from training.phantom import subject_slices

    torch.set_num_threads(args.threads)
    model, card = load_model(bundled_model_path())
    mm = source_pixel_mm(card)
    slices = list(subject_slices(3, args.slices + 4, 5.0, size=args.size))
    hu = np.stack([s.hu for s in slices]).astype(np.float32)
    labels = np.stack([s.labels for s in slices]).astype(np.uint8)
    case = AdaptCase(hu, labels, mm, list(range(args.slices)), "phantom")
    t0 = time.perf_counter()
    settings = AdaptSettings(device=args.device) if args.steps is None else \
        AdaptSettings(steps=args.steps, device=args.device)
    result = adapt_model(model, card, [case], settings)
    total = time.perf_counter() - t0
    print(json.dumps({"slices": args.slices, "size": args.size, "factor": card["factor"],
                      "settings": settings.to_dict(), "threads": args.threads, "device": args.device,
                      "fine_tune_s": round(result.seconds, 1), "total_s": round(total, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "before": result.before, "after": result.after}))


if __name__ == "__main__":
    main()
