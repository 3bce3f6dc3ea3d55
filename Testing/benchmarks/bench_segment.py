"""Benchmark: ``epdseg segment`` end to end (read, stream slab by slab, write) on CPU/GPU.

Side by side in one run, each case in a fresh process:
  - time: a 512 x 512 x N volume (default 48 slices) with models at factors 1, 2 and 4;
    for each, the network alone on the same slices (prepared input, segment's batches) is
    timed in the same process after the run, as the floor: the rest of the time is the
    non-network share (reading, resampling, upsampling, argmax, sums, gzip, overlay); and
    the network's calls during the run itself are timed too ("in run"), which on a shared
    machine is the steadier measure of the share (the same moment, the same load);
  - memory (``--memory`` for this part alone): 60 and 600 slices of 512 x 512 at factor 4
    (a synthetic int16 gzip NRRD in a temporary folder, removed after): the peak RSS
    (VmHWM, reset before the call) over the segment_case call, reading included, above the
    RSS before it; "volume" is what the whole float32 volume would take, for scale;
  - gzip level: the soft .seg.nrrd's bytes of the factor-2 run compressed at levels 1, 6, 9.
The models have the bundled model's architecture, read from its card
(Resources/Models/EPDBodyComp_f2.json: EPDNet, width 8), with random weights, or with
``--trained`` the bundled model's weights at every factor: the network's speed and memory do
not depend on the weights, but the gzip compression of the outputs does (random weights
give noisy probabilities that compress slowly); ``--width`` changes only the width. The volume is the
bundled sample CT (phantom, 16 slices) repeated. The outputs are the defaults (hard and
fractional .seg.nrrd, CSV, PNG); ``--probabilities`` adds the float32 NRRD. The process start
(Python, torch import, model load) is timed separately.

    nice -n 5 python Testing/benchmarks/bench_segment.py               # CPU
    nice -n 5 python Testing/benchmarks/bench_segment.py --trained     # CPU, trained weights
    python Testing/benchmarks/bench_segment.py --device cuda           # GPU, when there is one
    python Testing/benchmarks/bench_segment.py --quick                 # tiny: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
from EPDSegmentationLib.cli.options import add_mirror_argument


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise OSError(field)


def bundled_architecture(width: Optional[int] = None):
    """The bundled model's ModelConfig, from its card; ``width`` replaces its width."""
    from dataclasses import replace

    from EPDSegmentationLib.core.model_card import ModelConfig, read_card
    from EPDSegmentationLib.core.resources import bundled_model_path

    config = ModelConfig.from_dict(read_card(bundled_model_path())["architecture"])
    return config if width is None else replace(config, width=width)


def make_volume(folder: Path, name: str, slices: int, size: int) -> str:
    """The bundled sample CT repeated to ``slices`` slices of size x size, as int16 NRRD."""
    from EPDSegmentationLib.core.resources import sample_ct_path
    from EPDSegmentationLib.core.volume import Volume
    from EPDSegmentationLib.io import read_volume, write_volume

    sample = read_volume(sample_ct_path())
    reps = -(-slices // sample.array.shape[0])
    arr = np.concatenate([sample.array] * reps)[:slices, :size, :size]
    write_volume(Volume(arr, sample.ijk_to_ras), folder / f"{name}.nrrd", dtype="int16")
    return str(folder / f"{name}.nrrd")


def make_model(folder: Path, k: int, size: int, config, trained: bool = False,
               plain_upsampling: bool = False) -> str:
    """A model of architecture ``config`` at factor k (real file format): random weights,
    or with ``trained`` the bundled model's weights (the same architecture; convolutions
    do not depend on the factor), whose outputs look like a segmentation's."""
    import torch

    from EPDSegmentationLib.core.model import build_model
    from EPDSegmentationLib.core.model_card import make_card
    from EPDSegmentationLib.core.model_io import save_model
    from EPDSegmentationLib.core.resources import sample_ct_path
    from EPDSegmentationLib.core.windowing import DEFAULT_WINDOWS
    from EPDSegmentationLib.io import read_volume

    src = read_volume(sample_ct_path()).spacing[0]
    torch.manual_seed(0)
    net = build_model(config)
    if trained:
        from EPDSegmentationLib.core.model_io import load_model
        from EPDSegmentationLib.core.resources import bundled_model_path

        net.load_state_dict(load_model(bundled_model_path())[0].state_dict())
    extra = {}
    if trained:     # and its class weights, upsampling and field, so segment does all it does
        bundled = load_model(bundled_model_path())[1]         # with the bundled model
        extra = {key: bundled[key] for key in ("calibration", "upsampling", "field")
                 if key in bundled}
        if plain_upsampling:
            extra.pop("upsampling", None)
    card = make_card(net.config.to_dict(), windows=DEFAULT_WINDOWS, factor=k,
                     label_mode="epd", image_mode="average", pixel_mm=(src * k, src * k),
                     input_size=(size // k, size // k),
                     training={"data": {}, "command": "benchmark", "seed": 0}, **extra)
    save_model(folder / f"model_f{k}", net, card)
    return str(folder / f"model_f{k}.safetensors")


def network_seconds(net, card, volume, device: str, batch: int, mirror: bool = True) -> float:
    """The network alone on every slice of the volume: input prepared beforehand (not
    timed), then run_network in the batches segment uses (segment.network_batch), outputs
    left on the device as segment does."""
    import torch

    from EPDSegmentationLib.cli.segment import network_batch
    from EPDSegmentationLib.core.inference import prepare_slices, run_network, select_device

    si, sj, _ = volume.spacing
    x = np.concatenate([prepare_slices(volume.array[i:i + 16], (sj, si), card)[0]
                        for i in range(0, volume.array.shape[0], 16)])
    dev = select_device(device)[0]
    batch = min(network_batch(batch, card), 16)     # a slab (stream.SLAB_SLICES) caps it
    run_network(net, x[:batch], dev, batch, [], mirror=mirror)     # warm-up (kernels, allocator)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, _, _ = run_network(net, x, dev, batch, [], as_tensor=True, mirror=mirror)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_here(case: str, model: str, device: str, batch: int, out: str,
                 network: bool = False, probabilities: bool = False,
                 heap: str = "keep", repeat: int = 1, mirror: bool = True) -> dict:
    t_start = time.perf_counter()
    import torch

    from EPDSegmentationLib.core.heap import keep_freed_memory

    if heap == "keep":          # as the epdseg process does (cli.main)
        keep_freed_memory()

    from EPDSegmentationLib.core.model_io import load_model
    from EPDSegmentationLib.cli.segment import Case, segment_case
    from EPDSegmentationLib.io import read_volume

    from EPDSegmentationLib.core import inference

    net, card = load_model(model)
    startup = time.perf_counter() - t_start
    run_network = inference.run_network
    in_run = {"s": 0.0}

    def timed_run_network(*a, **kw):
        """The network's share of this very run (the same moment, the same load): the
        wall time of every run_network call segment makes."""
        t = time.perf_counter()
        try:
            return run_network(*a, **kw)
        finally:
            in_run["s"] += time.perf_counter() - t

    inference.run_network = timed_run_network
    base = _rss_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:     # reset VmHWM to the RSS now
        f.write("5")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = segment_case(Case("bench", Path(case)), Path(out), net, card, device=device,
                          batch_size=batch, overwrite=True, probabilities=probabilities,
                          mirror=mirror)
    seconds = time.perf_counter() - t0
    if not result.ok:
        raise SystemExit(result.message + result.traceback)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent,
    # which holds the test volumes
    peak_kb = _rss_kb("VmHWM:")
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    volume = read_volume(case)
    row = {"seconds": seconds, "startup": startup, "slices": len(result.slices),
           "peak_mib": (peak_kb - base) / 1024, "gpu_mib": gpu,
           "volume_mib": volume.array.nbytes / 2**20, "device": result.device,
           "threads": torch.get_num_threads(), "network_in_run_s": in_run["s"],
           "network_s": float("nan"), "soft_mib": Path(out, "bench_soft.seg.nrrd").stat().st_size / 2**20}
    if network:
        # the same case again in this process, as the next case of a cohort run (no first-
        # call costs: library imports such as SimpleITK's, kernel set-up, thread start),
        # ``repeat`` times, each followed by the network alone: medians of alternate runs,
        # since a shared machine's speed drifts
        row["again_all"], row["network_all"] = [], []
        for _ in range(max(1, repeat)):
            t1 = time.perf_counter()
            again = segment_case(Case("bench", Path(case)), Path(out + "_again"), net, card,
                                 device=device, batch_size=batch, overwrite=True,
                                 probabilities=probabilities, mirror=mirror)
            row["again_all"].append(time.perf_counter() - t1)
            if not again.ok:
                raise SystemExit(again.message + again.traceback)
            row["network_all"].append(network_seconds(net, card, volume, device, batch,
                                                      mirror))
        row["seconds_again"] = float(np.median(row["again_all"]))
        row["network_s"] = float(np.median(row["network_all"]))
    return row


def measure(case: str, model: str, device: str, batch: int, out: str,
            network: bool = False, probabilities: bool = False, heap: str = "keep",
            repeat: int = 1, mirror: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--one", case, model, out, "--device", device,
           "--batch", str(batch), "--heap", heap, "--repeat", str(repeat)] \
        + (["--network"] if network else []) \
        + (["--probabilities"] if probabilities else []) \
        + ([] if mirror else ["--no-mirror"])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def gzip_levels(path: str) -> list:
    """(backend, level, seconds, MiB, raw MiB) compressing the raw data of a .seg.nrrd read
    back: zlib at levels 1, 6 and 9, and ISA-L's at 0 to 3 when installed (io.deflate)."""
    import nrrd

    from EPDSegmentationLib.io import deflate

    data = np.ascontiguousarray(nrrd.read(path, index_order="C")[0]).tobytes()
    tries = [("zlib", level) for level in (1, 6, 9)]
    if deflate.backend() == "isal":
        tries += [("isal", level) for level in (0, 1, 2, 3)]
    rows = []
    for name, level in tries:
        t0 = time.perf_counter()
        z = deflate.compressor(name, level)
        n = len(z.compress(data)) + len(z.flush())
        rows.append((name, level, time.perf_counter() - t0, n / 2**20, len(data) / 2**20))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--slices", type=int, default=48, help="slices of the time cases")
    parser.add_argument("--memory-slices", type=int, nargs=2, default=[60, 600])
    parser.add_argument("--memory-factor", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--width", type=int, default=None,
                        help="network width (default: the bundled model's, from its card)")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--trained", action="store_true",
                        help="the bundled model's trained weights at every factor instead of "
                             "random ones (not with --width): the network costs the same, "
                             "but its outputs compress like a real segmentation's")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write the float32 probability NRRD in every case")
    parser.add_argument("--quick", action="store_true",
                        help="3 slices of 128 x 128 (memory: 4 and 12), factors 1 and 2")
    parser.add_argument("--memory", "--memory-only", dest="memory_only", action="store_true",
                        help="only the memory cases (60 and 600 slices), no time cases")
    parser.add_argument("--heap", choices=("keep", "trim"), default="keep",
                        help="keep: freed memory reused, as the epdseg process does "
                             "(core.heap.keep_freed_memory); trim: given back after each "
                             "slab, as in Slicer's process")
    parser.add_argument("--repeat", type=int, default=5,
                        help="'again' runs, each followed by the network alone (medians)")
    add_mirror_argument(parser)         # as `epdseg segment --no-mirror`
    parser.add_argument("--plain-upsampling", action="store_true",
                        help="with --trained: without the bundled card's HU-guided upsampling "
                             "(bilinear, as before step 11), to measure what it costs")
    parser.add_argument("--network", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trained and args.width is not None:
        parser.error("--trained takes the bundled model's width; drop --width")
    if args.one:
        print(json.dumps(measure_here(*args.one[:2], args.device, args.batch, args.one[2],
                                      args.network, args.probabilities, args.heap,
                                      args.repeat, args.mirror)))
        return
    if args.quick:
        args.slices, args.size, args.factors = 3, 128, [1, 2]
        args.memory_slices, args.memory_factor, args.repeat = [4, 12], 2, 1

    import torch

    config = bundled_architecture(args.width)
    mk = args.memory_factor
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {k: make_model(tmp, k, args.size, config, trained=args.trained,
                                plain_upsampling=args.plain_upsampling)
                  for k in sorted(set(args.factors) | {mk})}
        volume = make_volume(tmp, "volume", args.slices, args.size)
        print(f"epdseg segment end to end: {args.size} x {args.size} volumes (bundled sample "
              f"repeated), the bundled model's architecture at width {config.width}"
              f"{'' if args.width is None else ' (--width)'}, "
              f"{'the bundled weights' if args.trained else 'random weights'}, batch "
              f"{args.batch}, device "
              f"{args.device}; {os.cpu_count()} cores, torch {torch.__version__} with "
              f"{torch.get_num_threads()} threads in every case; each case in a fresh "
              f"process; heap: {args.heap}; outputs: "
              f"default{' + --probabilities' if args.probabilities else ''}"
              f"; {'mirror averaging' if args.mirror else '--no-mirror'}"
              f"; load average at the start {os.getloadavg()[0]:.1f}", flush=True)
        rows = {}
        for k in ([] if args.memory_only else args.factors):
            rows[k] = measure(volume, models[k], args.device, args.batch,
                              str(tmp / f"out_f{k}"), network=True,
                              probabilities=args.probabilities, heap=args.heap,
                              repeat=args.repeat, mirror=args.mirror)
        k2 = 2 if 2 in args.factors else args.factors[-1]
        gz = [] if args.memory_only else gzip_levels(str(tmp / f"out_f{k2}" / "bench_soft.seg.nrrd"))
        mem = {}
        for n in args.memory_slices:
            path = make_volume(tmp, f"mem{n}", n, args.size)
            mem[n] = measure(path, models[mk], args.device, args.batch, str(tmp / f"mem{n}"),
                             probabilities=args.probabilities, heap=args.heap,
                             mirror=args.mirror)
            Path(path).unlink()
            print(f"{n} slices: {json.dumps(mem[n])}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f} (1 min), "
          f"{os.getloadavg()[1]:.1f} (5 min)")
    if rows:
        print_time(rows, args)
    print(f"\nmemory, factor {mk} (MiB; peak: the peak RSS over segment_case, reading "
          f"included; volume: the whole float32 volume, which is never held):")
    print(f"{'slices':>7} {'seconds':>8} {'volume':>8} {'peak':>8} {'x':>5} "
          f"{'soft .seg.nrrd':>14}")
    m0 = mem[args.memory_slices[0]]
    for n, r in mem.items():
        print(f"{n:7d} {r['seconds']:8.2f} {r['volume_mib']:8.1f} {r['peak_mib']:8.1f}"
              f" {r['peak_mib'] / m0['peak_mib']:5.2f} {r['soft_mib']:14.1f}")
    if gz:
        print(f"\ngzip of the factor-{k2} soft .seg.nrrd data ({gz[0][4]:.1f} MiB raw; the "
              f"outputs use {deflate_default()}):")
    for name, level, sec, mib, _ in gz:
        print(f"  {name} level {level}: {sec:6.2f} s, {mib:7.2f} MiB")


def deflate_default() -> str:
    from EPDSegmentationLib.io import deflate

    name = deflate.backend()
    return f"{name} level {deflate.LEVELS[name]}"


def print_time(rows: dict, args) -> None:
    ref = rows[args.factors[0]]
    print(f"\ntime, {args.slices} slices (network s: alone, the median of {args.repeat} "
          f"timings after the run; in run: the network's calls during the first run, and "
          f"the share of the rest; again: the same case once more in the same process, as "
          f"a cohort's next case, the median of {args.repeat} runs alternating with the "
          f"network's, and its non-network share against the network alone):")
    print(f"{'case':<18} {'seconds':>8} {'speed-up':>8} {'s/slice':>8} {'network s':>9} "
          f"{'non-network':>11} {'in run s':>8} {'rest':>6} {'again s':>8} {'again':>6} "
          f"{'peak MiB':>9} {'GPU MiB':>8} {'startup s':>9}")
    for k, r in rows.items():
        share = 1 - r["network_s"] / r["seconds"]
        rest = 1 - r["network_in_run_s"] / r["seconds"]
        again = r.get("seconds_again", float("nan"))
        print(f"{f'factor {k}':<18} {r['seconds']:8.2f} {ref['seconds'] / r['seconds']:8.2f}"
              f" {r['seconds'] / r['slices']:8.3f} {r['network_s']:9.2f} {share:11.1%}"
              f" {r['network_in_run_s']:8.2f} {rest:6.1%} {again:8.2f}"
              f" {1 - r['network_s'] / again:6.1%}"
              f" {r['peak_mib']:9.1f} {r['gpu_mib']:8.1f} {r['startup']:9.2f}")
    for k, r in rows.items():
        print(f"  factor {k}: again s " + " ".join(f"{v:.2f}" for v in r["again_all"])
              + "; network s " + " ".join(f"{v:.2f}" for v in r["network_all"]))


if __name__ == "__main__":
    main()
