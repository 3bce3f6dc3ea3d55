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
    labelmap, probability 0 -> -108, 1 -> 108); probabilities float32 (C, n, J, I) only
    when asked; sums: bodycomp.SUM_KEYS, float64 (n, C) each; uncertainty float64 (n,):
    each slice's mean normalised entropy (core.adapt.slice_uncertainty, the measure the
    slices to correct are ranked by), from the same probabilities: no extra network pass.

The caller writes each slab out and drops it; ``Accumulator`` keeps the sums, notes and
device across slabs. torch is imported inside the functions.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from .adapt import suggest_slices
from .bodycomp import SUM_KEYS, concatenate_sums, measures_from_sums, slice_sums, with_uncertainty
from .heap import start_stream, trim_heap
from .inference import Cancelled, check_probability_range
from .indices import protocol_slice_sums

#: Slices per slab in ``segment``: two default batches. Memory per slab is about
#: 6 x 4 bytes x slices x J x I for the probabilities, plus the network's own.
SLAB_SLICES = 16
#: Slicer's fractional labelmap range (mrml.segmentation, io.seg_nrrd use the same).
FRACTIONAL_MIN, FRACTIONAL_MAX = -108, 108
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
    #: indices.protocol_slice_sums of the slab, when asked for (the HU-protocol areas)
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
        (bodycomp.with_uncertainty; the rule of core.adapt.suggest_slices)."""
        rows = measures_from_sums(concatenate_sums(self.sums), spacing_mm, self.slices)
        if len(self.uncertainty) != len(self.sums) or any(u is None for u in self.uncertainty):
            return rows                                 # slabs made without it
        scores = np.concatenate(self.uncertainty) if self.uncertainty else np.zeros(0)
        return with_uncertainty(rows, self.slices, scores,
                                suggest_slices(scores, n_suggest, slices=self.slices))


def encode_fractional_torch(p):
    """Probabilities (torch, any shape) in 0..1 -> int8 Slicer fractional values; the same
    rounding as io.seg_nrrd and mrml.segmentation.encode_fractional (half to even)."""
    import torch

    steps = FRACTIONAL_MAX - FRACTIONAL_MIN
    # one scratch tensor, the rest in place; clamping the codes rather than the
    # probabilities gives the same values (p*216-108 is monotonic) and saves a pass
    q = p.float().mul(steps)
    return q.add_(FRACTIONAL_MIN).clamp_(FRACTIONAL_MIN, FRACTIONAL_MAX).round_().to(torch.int8)


def argmax_classes(p):
    """Hard labels uint8 (n, J, I) from probabilities (C, n, J, I), on their device: the
    first class wins a tie, as np.argmax. torch.max's indices, which measured 5 times
    faster on the CPU than torch.argmax over the outer class axis (16 against 83 ms per
    512 x 512 slice, docs/benchmarks.md)."""
    import torch

    return torch.max(p, dim=0).indices.to(torch.uint8)


def slice_entropy(p) -> np.ndarray:
    """Per-slice uncertainty float64 (n,) of probabilities p (C, n, J, I) (torch, on their
    device): the mean over the slice's pixels of the normalised entropy (entropy in nats /
    ln C, 0..1), as core.adapt.slice_uncertainty. One slice at a time: the scratch stays
    one slice's size."""
    import torch

    C = int(p.shape[0])
    out = np.zeros(int(p.shape[1]), np.float64)
    for s in range(out.size):
        q = p[:, s].float().clamp(1e-7, 1.0)
        out[s] = float(-(q * torch.log(q)).sum(dim=0).mean()) / float(np.log(C))
    return out


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
                 range_checked: bool = False) -> Slab:
    """One Slab from probabilities (C, n, J, I) (torch tensor on any device, NumPy, or an
    inference.Deferred: the network's output, restored here a slice at a time) and the HU
    (n, J, I) of the same slices. Checks shape, and range as bodycomp does unless
    ``range_checked`` (inference.slab_predictor checks the network's low-resolution output,
    which upsampling cannot take out of range). protocol: also the slab's HU-protocol sums
    (indices.protocol_slice_sums).

    One slice at a time, every output is made from its planes (C, J, I) while they are in
    the core's cache: on the CPU, restoring the whole slab (16 slices, 100 MB at 512 x 512)
    and passing over it once per output cost 40 % more (docs/benchmarks.md)."""
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
    code_maps = np.empty((C - 1,) + shape[1:], np.int8) if codes else None
    # one float32 host copy serves both the probability output and the protocol sums
    host = np.empty(shape, np.float32) if (probabilities_out or protocol) else None
    entropy = np.zeros(n, np.float64)
    parts = []
    on_cpu = p.device.type == "cpu"
    for s in range(n):
        q = p.planes(s, s + 1) if deferred else p[:, s:s + 1]               # (C, 1, J, I)
        lab = argmax_classes(q)
        if on_cpu:      # NumPy's sums measured faster there (bodycomp)
            parts.append(slice_sums(q.numpy(), hu[s:s + 1], lab.numpy(), checked=True))
        else:
            parts.append(slab_sums(q, torch.from_numpy(np.ascontiguousarray(hu[s:s + 1]))
                                   .to(q.device), lab))
        labels[s] = lab[0].cpu().numpy()
        if code_maps is not None:
            code_maps[:, s] = encode_fractional_torch(q[1:, 0]).cpu().numpy()
        if host is not None:
            host[:, s] = q[:, 0].float().cpu().numpy()
        entropy[s] = slice_entropy(q)[0]
    sums = concatenate_sums(parts)
    return Slab(list(slices), labels, code_maps, host if probabilities_out else None, sums,
                entropy, protocol_slice_sums(host, hu) if protocol else None, hu)


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

    On the CPU a slab's outputs (argmax, codes, sums) are made in a worker thread while
    the network runs on the next slab, and the caller writes the slab before (its gzip and
    NumPy work release the GIL too): the per-pixel work at full resolution is mostly
    single-threaded and the network's small layers do not keep both cores busy either
    (docs/benchmarks.md). Slabs come out in order; predict, progress and should_cancel are
    called from the calling thread only (the Slicer module's progress touches Qt). At most
    two slabs' probabilities are held at once. A source with ``prefetch`` (io.sources)
    reads the next slab while this one is predicted.
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
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="epd-slab") as pool:
        for i, chunk in enumerate(chunks):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled after {done} of {total} slices")
            offset = done

            def batch_progress(n_done, _total, offset=offset):
                if progress is not None:
                    progress(offset + int(n_done), total)

            # this slab read (or taken from the read ahead), the next one started, so that it
            # is read while the network runs; predict then finds this one kept by the source
            hu_chunk = hu[chunk]
            if prefetch is not None and i + 1 < len(chunks):
                prefetch(chunks[i + 1])
            probs, device, notes = run(chunk, batch_progress, should_cancel)
            args = (probs, hu_chunk, chunk)
            kwargs = dict(codes=codes, probabilities_out=probabilities, protocol=protocol,
                          range_checked=checked)
            # NumPy arrays (other predictors) and CPU tensors; NumPy 2's .device is "cpu"
            on_cpu = getattr(getattr(probs, "device", None), "type", "cpu") == "cpu"
            job = pool.submit(slab_outputs, *args, **kwargs) if on_cpu \
                else slab_outputs(*args, **kwargs)
            del probs, args, hu_chunk
            if pending is not None:
                yield _collect(pending, acc, total, progress)
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
