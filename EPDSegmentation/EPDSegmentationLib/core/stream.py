"""Segment a volume slab by slab: the one streaming path of ``epdseg segment`` and the Slicer
module, so that memory is bounded by a slab and not by the scan.

For each slab of selected slices (a few batches of the network), ``predict`` gives the
class probabilities on the input grid (C, n, J, I), as a torch tensor on the device that ran
the network (or a NumPy array), or, through ``predict.deferred``, the network's own output
to be restored to that grid here, one slice at a time (inference.Deferred). On that device,
without a round trip through host memory, this module takes the argmax (hard labels),
encodes the soft maps as Slicer's 8-bit fractional values and sums the body-composition
statistics per slice and class. Only what each output needs comes back to the host, in its
compact form:

    labels uint8 (n, J, I); codes int8 (C - 1, n, J, I) in -108..108 (Slicer's fractional
    labelmap, probability 0 -> -108, 1 -> 108; a view of (n, J, I, C - 1), the order the
    .seg.nrrd stores); probabilities float32 (C, n, J, I) only
    when asked; sums: bodycomp.SUM_KEYS, float64 (n, C) each; uncertainty float64 (n,):
    each slice's mean normalised entropy (core.adapt.slice_uncertainty, the measure the
    slices to correct are ranked by), from the same probabilities: no extra network pass.

The caller writes each slab out and drops it; ``Accumulator`` keeps the sums, notes and
device across slabs. torch is imported inside the functions.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .adapt import suggest_slices
from .bodycomp import SUM_KEYS, concatenate_sums, measures_from_sums, slice_sums, with_uncertainty
from .fractional import FRACTIONAL_MAX, FRACTIONAL_MIN, encode_fractional
from .heap import start_stream, trim_heap
from .inference import PROBABILITY_TOLERANCE, Cancelled, check_probability_range
from .indices import PROTOCOL_KEYS, protocol_plane_sums, with_protocol

#: Slices per slab in ``segment``: two default batches. Memory per slab is about
#: 6 x 4 bytes x slices x J x I for the probabilities, plus the network's own.
SLAB_SLICES = 16
#: Slices the per-case table marks to correct first (as the panel's "Correct first").
N_SUGGEST = 3

Predict = Callable[..., Any]


@dataclass
class Slab:
    """The outputs of one slab of selected slices (``slices``, indices K, ascending)."""

    slices: List[int]
    labels: np.ndarray
    codes: Optional[np.ndarray]
    probabilities: Optional[np.ndarray]
    sums: Dict[str, np.ndarray]
    uncertainty: Optional[np.ndarray] = None
    #: the slab's HU-protocol sums, when asked for: as indices.protocol_slice_sums gives them
    protocol: Optional[Dict[str, np.ndarray]] = None
    #: the HU (n, J, I) the slab was measured on (read only: the source's array)
    hu: Optional[np.ndarray] = None


@dataclass
class Accumulator:
    """What outlives the slabs: the per-slice sums (small: 6 x 6 float64 per slice), the
    per-slice uncertainty, the notes (each once) and the device the network last ran on."""

    slices: List[int] = field(default_factory=list)
    sums: List[Dict[str, np.ndarray]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    device: str = ""
    uncertainty: List[np.ndarray] = field(default_factory=list)
    protocol: List[Dict[str, np.ndarray]] = field(default_factory=list)

    def rows(self, spacing_mm: Sequence[float], n_suggest: int = N_SUGGEST):
        """bodycomp rows (per slice and tissue, then "all") for every slice seen so far,
        with each slice's uncertainty and the n_suggest slices to correct first
        (bodycomp.with_uncertainty; the rule of core.adapt.suggest_slices) and, when every
        slab was made with them, the HU-protocol measures (indices.with_protocol)."""
        rows = measures_from_sums(concatenate_sums(self.sums), spacing_mm, self.slices)
        if self.protocol and len(self.protocol) == len(self.sums):
            rows = with_protocol(rows, self.slices, self.protocol, spacing_mm)
        if len(self.uncertainty) != len(self.sums) or any(u is None for u in self.uncertainty):
            return rows                                 # slabs made without it
        scores = np.concatenate(self.uncertainty) if self.uncertainty else np.zeros(0)
        return with_uncertainty(rows, self.slices, scores,
                                suggest_slices(scores, n_suggest, slices=self.slices))


_SCRATCH = threading.local()


def _scratch(slot: str, shape) -> np.ndarray:
    """An empty float32 array of ``shape``: in an output_pool thread its own buffer for
    ``slot``, kept for the next slice (fewer allocations per slice in the one heap that
    keep_freed_memory makes all threads share, which fragments as they allocate,
    docs/benchmarks.md); elsewhere a new one, so nothing outlives the call."""
    if not getattr(_SCRATCH, "keep", False):
        return np.empty(shape, np.float32)
    held = getattr(_SCRATCH, slot, None)
    if held is None or held.shape != tuple(shape):
        held = np.empty(shape, np.float32)
        setattr(_SCRATCH, slot, held)
    return held


# Two implementations of each per-slice output, equal to float rounding (tested): NumPy's
# for the CPU (measured faster there, docs/benchmarks.md) and torch's for the GPU, on the
# device that ran the network.


def encode_fractional_torch(p):
    """core.fractional.encode_fractional in torch, on p's device (GPUs): probabilities
    (any shape) -> int8 codes, the same float32 steps."""
    import torch

    steps = FRACTIONAL_MAX - FRACTIONAL_MIN
    # one scratch tensor, the rest in place; clamping the codes rather than the
    # probabilities gives the same values (p*216-108 is monotonic) and saves a pass
    q = p.float().mul(steps)
    return q.add_(FRACTIONAL_MIN).clamp_(FRACTIONAL_MIN, FRACTIONAL_MAX).round_().to(torch.int8)


#: the stream's probabilities are range-checked to PROBABILITY_TOLERANCE (check_probability_range;
#: upsampling and resampling keep the range), close enough to 0..1 that their codes need no
#: clamping (0.25 ms a 512 x 512 slice of 5 classes)
_CODES_CLAMP = PROBABILITY_TOLERANCE * (FRACTIONAL_MAX - FRACTIONAL_MIN) >= 0.5


def encode_fractional_numpy(p: np.ndarray, out: np.ndarray) -> None:
    """core.fractional.encode_fractional into ``out`` (a view of a slab's codes), computed
    in this output thread's scratch (the CPU), for range-checked probabilities."""
    encode_fractional(p, out, _scratch("codes", np.shape(p)), clamp=_CODES_CLAMP)


def argmax_torch(p):
    """Hard labels uint8 from probabilities (C, ...) in torch, on their device (GPUs): the
    first class wins a tie, as np.argmax. torch.max's indices, 5 times faster than
    torch.argmax over the outer class axis."""
    import torch

    return torch.max(p, dim=0).indices.to(torch.uint8)


def argmax_numpy(p: np.ndarray) -> np.ndarray:
    """np.argmax(p, axis=0) as uint8 for finite probabilities p (C, ...), C <= 255 (the
    CPU): a running maximum over the classes, a later class taking a pixel only where it
    is strictly greater (so the first wins a tie). The label is updated by arithmetic
    (maximum with c times the comparison: every earlier label is below c), not by a masked
    write: on a 512 x 512 slice of 6 classes about 0.5 ms against 5 ms for torch.max or
    np.argmax (docs/benchmarks.md)."""
    best = p[0].copy()
    labels = np.zeros(p.shape[1:], np.uint8)
    step = np.empty(p.shape[1:], np.uint8)
    for c in range(1, p.shape[0]):
        np.greater(p[c], best, out=step.view(np.bool_))
        np.multiply(step, np.uint8(c), out=step)
        np.maximum(labels, step, out=labels)
        np.maximum(best, p[c], out=best)
    return labels


def entropy_torch(p) -> np.ndarray:
    """Per-slice uncertainty float64 (n,) of probabilities p (C, n, J, I) in torch, on their
    device (GPUs): each slice's mean_entropy_numpy. One slice at a time: the scratch stays
    one slice's size."""
    import torch

    C = int(p.shape[0])
    out = np.zeros(int(p.shape[1]), np.float64)
    for s in range(out.size):
        q = p[:, s].float().clamp(1e-7, 1.0)
        out[s] = float(-(q * torch.log(q)).sum(dim=0).mean()) / float(np.log(C))
    return out


#: values per float32 dot product in mean_entropy_numpy (on a 512 x 512 slice of 6 classes
#: within 4e-8 of the float64 sum)
_DOT = 2048


def mean_entropy_numpy(p: np.ndarray) -> float:
    """The uncertainty of one slice (the CPU): the mean over its pixels of the normalised
    entropy of its probabilities p (C, J, I) (entropy in nats / ln C, 0..1), as
    core.adapt.slice_uncertainty: clipped to 1e-7..1, -sum p ln p / ln C. sum p ln p is
    taken as float32 dot products of _DOT values each (one batched BLAS call, which
    multiplies and adds in one pass: 1.21 against 1.44 ms a 512 x 512 slice of 6 classes for
    a product array and its pairwise sum, docs/benchmarks.md), added in float64. NumPy's
    log measured 3 times faster than torch's on the CPU."""
    q = np.clip(p, np.float32(1e-7), np.float32(1.0), out=_scratch("q", p.shape),
                dtype=np.float32).reshape(-1)
    lq = np.log(q, out=_scratch("log q", p.shape).reshape(-1))
    whole = q.size // _DOT * _DOT
    total = np.matmul(q[:whole].reshape(-1, 1, _DOT),
                      lq[:whole].reshape(-1, _DOT, 1)).sum(dtype=np.float64)
    total += float(np.dot(q[whole:], lq[whole:]))
    return -float(total) / (q.size // p.shape[0] * float(np.log(p.shape[0])))


def slab_sums(p, hu, labels) -> Dict[str, np.ndarray]:
    """bodycomp.slice_sums on torch tensors, on their device: p (C, n, J, I) float
    probabilities, hu (n, J, I) HU, labels (n, J, I) their argmax. float64 (n, C) each.

    Per slice, one float64 matrix product of [probabilities; one-hot of the labels]
    (2C, J*I) with [1, HU, HU^2] (J*I, 3) gives all six sums (float64 throughout, as
    bodycomp; only the summation order differs). For GPUs: on the CPU NumPy's
    bodycomp.slice_sums is faster."""
    import torch

    C, n = int(p.shape[0]), int(p.shape[1])
    out = {k: np.zeros((n, C), np.float64) for k in SUM_KEYS}
    classes = torch.arange(C, device=p.device, dtype=torch.uint8).reshape(C, 1)
    for s in range(n):  # one slice at a time keeps the float64 scratch small
        h = hu[s].reshape(-1).to(torch.float64)
        powers = torch.stack([torch.ones_like(h), h, h * h], dim=1)        # (J*I, 3)
        weights = torch.cat([p[:, s].reshape(C, -1).to(torch.float64),
                             (labels[s].reshape(1, -1) == classes).to(torch.float64)])
        vals = (weights @ powers).cpu().numpy()                             # (2C, 3)
        for i, key in enumerate(SUM_KEYS):
            out[key][s] = vals[(i // 3) * C:(i // 3 + 1) * C, i % 3]
    return out


def slab_outputs(probabilities, hu: np.ndarray, slices: Sequence[int], *, codes: bool = True,
                 probabilities_out: bool = False, protocol: bool = False,
                 range_checked: bool = False, pool: Optional[ThreadPoolExecutor] = None,
                 workers: int = 1, kernels: str = "auto") -> Slab:
    """One Slab from probabilities (C, n, J, I) (torch tensor on any device, NumPy, or an
    inference.Deferred: the network's output, restored here a slice at a time) and the HU
    (n, J, I) of the same slices. Checks shape, and range as bodycomp does unless
    ``range_checked`` (inference.slab_predictor checks the network's low-resolution output,
    which upsampling cannot take out of range). protocol: also the slab's HU-protocol sums
    (as indices.protocol_slice_sums gives them; made per slice, indices.protocol_plane_sums).

    One slice at a time, every output is made from its planes (C, J, I) while they are in
    the core's cache: on the CPU, restoring the whole slab (16 slices, 100 MB at 512 x 512)
    and passing over it once per output cost 40 % more (docs/benchmarks.md). On the CPU,
    with ``pool`` (output_pool), ``workers`` threads, one core each, take the slices one at a
    time: NumPy's kernels are single-threaded. kernels: "auto" (NumPy on the CPU,
    torch elsewhere) or "torch" (torch's, what GPUs run, on any device: the tests run the
    GPU path on the CPU so)."""
    import torch

    deferred = hasattr(probabilities, "planes")
    p = probabilities if deferred or isinstance(probabilities, torch.Tensor) \
        else torch.from_numpy(np.ascontiguousarray(probabilities))
    n = len(slices)
    shape = tuple(int(v) for v in p.shape)
    if len(shape) != 4 or shape[1] != n or shape[2:] != tuple(hu.shape[1:]):
        raise ValueError(f"the model returned probabilities of shape {shape}; "
                         f"expected (C, {n}) + {tuple(hu.shape[1:])}")
    if not deferred:
        if not p.is_floating_point():
            raise ValueError(f"probabilities must be floating point; got {p.dtype}")
        if not range_checked:
            check_probability_range(p)
    C = shape[0]
    labels = np.empty((n,) + shape[2:], np.uint8)
    # the codes as the .seg.nrrd stores them, classes fastest (n, J, I, C - 1), seen as
    # (C - 1, n, J, I): the workers reorder them, not the writer's thread
    code_maps = np.moveaxis(np.empty((n,) + shape[2:] + (C - 1,), np.int8), -1, 0) \
        if codes else None
    host = np.empty(shape, np.float32) if probabilities_out else None
    entropy = np.zeros(n, np.float64)
    parts: List[Any] = [None] * n
    protocol_parts = np.empty((n, len(PROTOCOL_KEYS), 2), np.float64) if protocol else None

    taken = [0]
    lock = threading.Lock()

    def next_slice() -> int:
        with lock:
            taken[0] += 1
            return taken[0] - 1

    def cpu_slices() -> None:
        # each worker takes the next slice not yet taken, so that none waits long for one
        # given more work or less of a core (with half a slab each, one waited 56 to 124 ms
        # in all over a 100-slice factor-4 case's slabs; now 26 to 56)
        while True:
            s = next_slice()
            if s >= n:
                return
            q = p.planes(s, s + 1) if deferred else p[:, s:s + 1]           # (C, 1, J, I)
            qn = q.numpy()[:, 0]                                            # (C, J, I)
            labels[s] = argmax_numpy(qn)
            parts[s] = slice_sums(qn[:, None], hu[s:s + 1], labels[s:s + 1], checked=True)
            if code_maps is not None:
                encode_fractional_numpy(qn[1:], code_maps[:, s])
            if host is not None:
                host[:, s] = qn
            if protocol_parts is not None:
                protocol_parts[s] = protocol_plane_sums(qn, hu[s])
            entropy[s] = mean_entropy_numpy(qn)

    if kernels not in ("auto", "torch"):
        raise ValueError(f"kernels must be 'auto' or 'torch'; got {kernels!r}")
    if p.device.type == "cpu" and kernels == "auto":    # NumPy's measured faster there
        runs = max(1, min(int(workers), n)) if pool is not None else 1
        if runs == 1:
            cpu_slices()
        else:
            for job in [pool.submit(cpu_slices) for _ in range(runs)]:
                job.result()
    else:
        for s in range(n):
            q = p.planes(s, s + 1) if deferred else p[:, s:s + 1]
            lab = argmax_torch(q)
            parts[s] = slab_sums(q, torch.from_numpy(np.ascontiguousarray(hu[s:s + 1]))
                                 .to(q.device), lab)
            labels[s] = lab[0].cpu().numpy()
            if code_maps is not None:
                code_maps[:, s] = encode_fractional_torch(q[1:, 0]).cpu().numpy()
            if host is not None or protocol_parts is not None:
                plane = q[:, 0].float().cpu().numpy()
                if host is not None:
                    host[:, s] = plane
                if protocol_parts is not None:
                    protocol_parts[s] = protocol_plane_sums(plane, hu[s])
            entropy[s] = entropy_torch(q)[0]
    sums = concatenate_sums(parts)
    protocol_sums = None if protocol_parts is None else \
        {key: protocol_parts[:, i] for i, key in enumerate(PROTOCOL_KEYS)}
    return Slab(list(slices), labels, code_maps, host, sums, entropy, protocol_sums, hu)


def _single_threaded_torch(ready: threading.Barrier) -> None:
    """A pool thread's torch kernels on one core. torch's setting is per thread once the
    thread has taken the global one (its first call does), so that is done first; the
    global one set_num_threads also changes, output_pool restores."""
    import torch

    torch.get_num_threads()             # this thread's lazy start, from the global value
    torch.set_num_threads(1)
    _SCRATCH.keep = True
    ready.wait()


@contextmanager
def output_pool(workers: Optional[int] = None) -> Iterator[Tuple[ThreadPoolExecutor, int]]:
    """(pool, workers) for slab_outputs on the CPU: ``workers`` threads (default: the
    threads torch runs the network on), each with single-threaded torch, so that the
    outputs of a slab use every core once while the network waits."""
    import torch

    threads = torch.get_num_threads()           # the calling thread's
    n = max(1, int(workers if workers is not None else threads))
    ready = threading.Barrier(n + 1)
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="epd-outputs",
                            initializer=_single_threaded_torch, initargs=(ready,)) as pool:
        for _ in range(n):                      # start every thread now
            pool.submit(int)
        ready.wait()
        torch.set_num_threads(threads)          # the global setting back as it was
        yield pool, n


def _slabs(slices: Sequence[int], size: int) -> List[List[int]]:
    """Runs of ``size`` slices, the last cut so that it holds at most a quarter slab: its
    outputs are the ones nothing overlaps (stream_slabs), so a short last slab shortens
    the run's tail."""
    out = [list(slices[i:i + size]) for i in range(0, len(slices), size)]
    tail = max(1, size // 4)
    if out and len(out[-1]) > tail:
        last = out.pop()
        out += [last[:-tail], last[-tail:]]
    return out


def stream_slabs(hu, slices: Sequence[int], predict: Predict, *,
                 slab_slices: int = SLAB_SLICES, codes: bool = True,
                 probabilities: bool = False, protocol: bool = False,
                 accumulator: Optional[Accumulator] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 should_cancel: Optional[Callable[[], bool]] = None) -> Iterator[Slab]:
    """Yield one Slab per ``slab_slices`` of the sorted, distinct ``slices`` of hu (K, J, I):
    an array, or a volume read by slabs (io.sources: ``hu[list]`` -> (n, J, I) HU, the
    slab the predictor just read kept, so it is read once).

    predict(slices, progress, should_cancel) -> (probabilities (C, n, J, I), device name,
    notes) (inference.slab_predictor, or the Slicer module's predictor). The accumulator,
    when given, collects slices, sums, notes and device as slabs pass. progress(done, total)
    in slices after each batch; should_cancel() between slabs and batches raises Cancelled.

    On the CPU the work goes in two alternating phases, each on every core: the network
    on a slab (torch's threads), then the slab's outputs (argmax, codes, sums,
    uncertainty) shared out among output_pool's threads, one slice each at a time. While
    the outputs are made, a source with ``prefetch`` (io.sources) reads the next slab and
    the caller writes the slab before (gzip threads). Run beside the network instead, the
    same work stalled its threads, which wait for each other at every layer
    (docs/benchmarks.md). On a GPU the outputs are made on the device and the next slab is
    read while the network runs. Slabs come out in order; predict, progress and
    should_cancel are called from the calling thread only (the Slicer module's progress
    touches Qt). At most two slabs' probabilities are held at once.
    """
    if not isinstance(slab_slices, int) or slab_slices < 1:
        raise ValueError(f"slab_slices must be a positive int; got {slab_slices!r}")
    order = sorted(set(int(k) for k in slices))
    acc = accumulator if accumulator is not None else Accumulator()
    total = len(order)
    checked = bool(getattr(predict, "range_checked", False))
    # the network's output unrestored, when the predictor offers it (inference.slab_predictor):
    # the worker then restores it slice by slice, off the network's thread
    run = getattr(predict, "deferred", None) or predict
    progress = _monotonic(progress)     # the network runs a slab ahead of the outputs
    done = 0
    pending = None         # (future or Slab, device, notes) of the slab before
    chunks = _slabs(order, slab_slices)
    prefetch = getattr(hu, "prefetch", None)        # io.sources: read the next slab ahead
    start_stream()
    late_read = True        # read ahead after the network (CPU) or before it (GPUs)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="epd-slab") as pool, \
            output_pool() as (opool, nworkers):
        for i, chunk in enumerate(chunks):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled after {done} of {total} slices")
            offset = done

            def batch_progress(n_done, _total, offset=offset):
                if progress is not None:
                    progress(offset + int(n_done), total)

            # this slab read (or taken from the read ahead); predict then finds it kept by
            # the source
            hu_chunk = hu[chunk]
            ahead = chunks[i + 1] if prefetch is not None and i + 1 < len(chunks) else None
            if ahead is not None and not late_read:
                prefetch(ahead)
            probs, device, notes = run(chunk, batch_progress, should_cancel)
            args = (probs, hu_chunk, chunk)
            kwargs = dict(codes=codes, probabilities_out=probabilities, protocol=protocol,
                          range_checked=checked)
            # NumPy arrays (other predictors) and CPU tensors; NumPy 2's .device is "cpu"
            on_cpu = getattr(getattr(probs, "device", None), "type", "cpu") == "cpu"
            if on_cpu:
                # the outputs on every core while the network waits: running beside it
                # stalled the network's threads (docs/benchmarks.md)
                job = pool.submit(slab_outputs, *args, pool=opool, workers=nworkers, **kwargs)
            else:
                job = slab_outputs(*args, **kwargs)
            del probs, args, hu_chunk
            if ahead is not None and late_read:
                prefetch(ahead)             # read while the outputs are made
            late_read = on_cpu
            if pending is not None:
                yield _collect(pending, acc, total, progress)   # written meanwhile too
            if isinstance(job, Future):
                job.result()                # before the network's next slab; raises now
            pending = (job, device, notes)
            done += len(chunk)
        if pending is not None:
            yield _collect(pending, acc, total, progress)


def _monotonic(progress):
    """progress(done, total) that never goes back (None stays None)."""
    if progress is None:
        return None
    shown = [-1]

    def report(n_done: int, total: int) -> None:
        if n_done > shown[0]:
            shown[0] = n_done
            progress(n_done, total)

    return report


def _collect(pending, acc: Accumulator, total: int, progress) -> Slab:
    """The Slab of a (future or Slab, device, notes), added to the accumulator."""
    job, device, notes = pending
    slab = job.result() if isinstance(job, Future) else job
    trim_heap()         # the slab before is freed by now
    acc.device = str(device)
    acc.notes.extend(note for note in notes if note not in acc.notes)
    acc.slices.extend(slab.slices)
    acc.sums.append(slab.sums)
    acc.uncertainty.append(slab.uncertainty)
    if slab.protocol is not None:
        acc.protocol.append(slab.protocol)
    if progress is not None:
        progress(len(acc.slices), total)
    return slab

