"""Benchmark: training throughput (slices per second) and peak memory per step at factors
1, 2, 4, 8, printed as ratios against factor 1, all measured in one run.

One step is what ``python -m training train`` does per batch: window the HU slices, EPD
downsample slices and labels on the device (epd_torch), forward, the MAE + soft Dice loss
with uncertainty weights, backward, AdamW. Each factor runs in a fresh process (so peak
memory is its own); time is the median of --steps steps after --warmup steps (robust to a
shared machine). Peak memory per step: on a GPU, the peak of torch.cuda.max_memory_allocated
during a step above what was allocated before it; on the CPU, in a second fresh process, the
rise of the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs)
during a step, with glibc's mmap threshold fixed at 64 KiB
(MALLOC_MMAP_THRESHOLD_) so every tensor buffer is mapped and unmapped and resident memory
follows the live tensors instead of the allocator's reuse.

    python Testing/benchmarks/bench_training.py                 # GPU if present, 512 x 512
    python Testing/benchmarks/bench_training.py --device cpu --size 256 --batch 4
    python Testing/benchmarks/bench_training.py --quick         # seconds, CPU, 128 x 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FACTORS = (1, 2, 4, 8)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(factor: int, size: int, batch: int, width: int, steps: int, warmup: int,
            device: str, threads: int) -> dict:
    """Run in a fresh process: time and peak memory of training steps at one factor."""
    import numpy as np
    import torch

    from EPDSegmentationLib.core.model import ModelConfig, build_model
    from training.phantom import make_slice
    from EPDSegmentationLib.core.windowing import DEFAULT_WINDOWS
    from training.data import model_inputs
    from EPDSegmentationLib.core.losses import Criterion
    from training.train import TrainModule, make_optimizer

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    slices = [make_slice(s, size=size) for s in range(batch)]
    hu = torch.from_numpy(np.stack([s.hu for s in slices])).to(dev)
    lab = torch.from_numpy(np.stack([s.labels for s in slices])).to(dev)
    module = TrainModule(build_model(ModelConfig(width=width)), Criterion(["mae", "dice"]),
                         bf16=dev.type == "cuda").to(dev)
    opt = make_optimizer(module, 1e-3, 1e-4)

    def step():
        with torch.no_grad():
            x, q = model_inputs(hu, lab, factor=factor, label_mode="epd",
                                image_mode="average", windows=DEFAULT_WINDOWS)
        loss, _, _ = module(x, q)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    peaks = []
    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            _reset_peak()
            before = _rss_kb("VmRSS:") * 1024
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(dev) - before)
        else:
            peaks.append(_rss_kb("VmHWM:") * 1024 - before)
    mean = float(np.median(times))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {"factor": factor, "step_s": mean, "slices_per_s": batch / mean,
            "peak_mib": float(np.max(peaks)) / 2 ** 20, "device": name,
            "input": -(-size // factor), "torch": torch.__version__}


def _child(cmd, env, k) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"factor {k} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--size", type=int, help="full-resolution slice size (default 512 on GPU, 256 on CPU)")
    p.add_argument("--batch", type=int, help="slices per step (default 16 on GPU, 4 on CPU)")
    p.add_argument("--width", type=int, default=16, help="network width (16 = the default model)")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="CPU, 128 x 128, batch 2, 2 steps")
    p.add_argument("--_one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.quick:
        a.device, a.size, a.batch, a.steps, a.warmup = "cpu", 128, 2, 2, 1
    gpu = a.device.startswith("cuda")
    a.size = a.size or (512 if gpu else 256)
    a.batch = a.batch or (16 if gpu else 4)
    if a._one is not None:
        print(json.dumps(measure(a._one, a.size, a.batch, a.width, a.steps, a.warmup, a.device,
                                 a.threads)))
        return
    results = []
    for k in FACTORS:
        cmd = [sys.executable, __file__, "--_one", str(k), "--device", a.device, "--size",
               str(a.size), "--batch", str(a.batch), "--width", str(a.width), "--steps",
               str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
        timed = _child(cmd, dict(os.environ), k)
        if not gpu:  # CPU memory with every buffer mmapped (slower, so timed apart)
            mem = _child(cmd, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"), k)
            timed["peak_mib"] = mem["peak_mib"]
        results.append(timed)
        print(f"  factor {k} done", file=sys.stderr)
    r1 = results[0]
    print(f"training step: {a.batch} slices of {a.size} x {a.size} (phantom), width {a.width}, "
          f"MAE + soft Dice, AdamW; {r1['device']}, torch {r1['torch']}; "
          f"median of {a.steps} steps after {a.warmup} warm-up, each factor in a fresh process")
    print()
    print("factor  input     step s  slices/s  x factor 1  peak MiB/step  / factor 1")
    for r in results:
        print(f"{r['factor']:>6}  {r['input']:>3}x{r['input']:<3}  {r['step_s']:>8.3f}  "
              f"{r['slices_per_s']:>8.1f}  {r['slices_per_s'] / r1['slices_per_s']:>10.2f}  "
              f"{r['peak_mib']:>13.1f}  {r['peak_mib'] / r1['peak_mib']:>10.3f}")


if __name__ == "__main__":
    main()
