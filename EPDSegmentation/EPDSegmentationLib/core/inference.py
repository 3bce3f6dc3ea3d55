"""Run a trained model on a CT volume: the one inference path of the CLI, the Slicer module
and evaluation.

For every requested axial slice (a (J, I) plane of the (K, J, I) volume):
0. with the card's field of view, pad it with air where its content fills more of its rows
   than the training phantoms' did (core/field.py; cropped back at the end);
1. resample to the model's source spacing (card pixel_mm / factor), so the network sees
   anatomy at the scale it learned (bilinear, antialiased when shrinking);
2. window the HU into the card's input channels (windowing.window_channels);
3. downsample by the card's factor with the card's image mode (epd.epd_image or
   epd.bilinear_image);
4. predict class probabilities in batches (the network pads to a multiple of 32 itself);
5. upsample the soft maps to the resampled grid (epd.upsample_soft; or guided by the
   slice's HU where the card says so, core/upsampling.py) and resample them back to the
   input grid (bilinear, so they stay probabilities that sum to one).

torch is imported inside the functions: importing this module needs NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import field as field_of_view
from . import upsampling
from .calibration import calibrate
from .epd import bilinear_image, check_up_shape, epd_image, upsample_soft
from .errors import DeviceError
from .orientation import network_flips
from .windowing import window_channels

#: Relative spacing difference below which a slice is used as it is (no resampling).
SPACING_TOLERANCE = 1e-3


class Cancelled(Exception):
    """Raised by predict_volume when should_cancel() returns True between batches."""



@dataclass
class Prediction:
    """probabilities: float32 (C, n, J, I) on the input grid for the n requested slices;
    slices: their indices K; device: where the network ran (the last device used);
    notes: what happened along the way (device choice, resampling, out-of-memory retries)."""

    probabilities: np.ndarray
    slices: List[int]
    device: str
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- device


def _mps_available(torch) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _cuda_absent_reason(torch) -> str:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    return f"torch has CUDA {torch.version.cuda} but no CUDA GPU is visible (driver or CUDA_VISIBLE_DEVICES)"


def select_device(requested: str = "auto"):
    """(torch.device, reason) for "auto", "cuda", "cuda:N", "mps" or "cpu".

    "auto" takes CUDA, then MPS, then the CPU and says why; a forced device that is absent
    raises DeviceError (a RuntimeError) saying why it is absent."""
    import torch

    req = str(requested).strip().lower()
    if req == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"CUDA GPU {torch.cuda.get_device_name(0)}"
        why = [_cuda_absent_reason(torch)]
        if _mps_available(torch):
            return torch.device("mps"), "Apple MPS (" + why[0] + ")"
        why.append("MPS is not available")
        return torch.device("cpu"), "CPU: " + "; ".join(why)
    if req == "cpu":
        return torch.device("cpu"), "CPU (requested)"
    if req == "cuda" or req.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {requested!r} requested, but {_cuda_absent_reason(torch)}")
        dev = torch.device(req)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {requested!r} requested, but only "
                               f"{torch.cuda.device_count()} CUDA device(s) exist")
        return dev, f"CUDA GPU {torch.cuda.get_device_name(dev.index or 0)} (requested)"
    if req == "mps":
        if not _mps_available(torch):
            raise DeviceError("device 'mps' requested, but MPS is not available (needs Apple "
                               "silicon, macOS 12.3+ and a torch build with MPS)")
        return torch.device("mps"), "Apple MPS (requested)"
    raise ValueError(f"device must be 'auto', 'cuda', 'cuda:N', 'mps' or 'cpu'; got {requested!r}")


# ----------------------------------------------------------------------------- geometry


def source_pixel_mm(card: Mapping[str, Any]) -> Tuple[float, float]:
    """Spacing (row, col) in mm the model's data had before downsampling: pixel_mm / factor."""
    k = int(card["factor"])
    return float(card["pixel_mm"][0]) / k, float(card["pixel_mm"][1]) / k


def resampled_shape(shape: Sequence[int], pixel_mm: Sequence[float],
                    target_mm: Sequence[float]) -> Tuple[int, int]:
    """(rows, cols) covering the same field of view at target_mm (unchanged within tolerance)."""
    out = []
    for n, s, t in zip(shape, pixel_mm, target_mm):
        if abs(s - t) <= SPACING_TOLERANCE * t:
            out.append(int(n))
        else:
            out.append(max(1, int(round(n * s / t))))
    return out[0], out[1]


def network_cells(shape: Sequence[int], pixel_mm: Sequence[float],
                  card: Mapping[str, Any]) -> Tuple[int, int]:
    """(h, w) of the network's grid for slices of ``shape`` at pixel_mm: the resampled grid
    (resampled_shape) in windows of the card's factor, partial ones at the far edges."""
    k = int(card["factor"])
    rows, cols = resampled_shape(shape, pixel_mm, source_pixel_mm(card))
    return -(-rows // k), -(-cols // k)


def resample_planes(x, shape: Sequence[int], *, labels: bool = False):
    """Resample (..., H, W) planes (NumPy or torch) to ``shape`` over the same field of view:
    pixel edges map to edges (align_corners=False). Bilinear, antialiased when shrinking;
    nearest for label maps. Returns the same kind as given (float32, or the labels' dtype)."""
    import torch
    from torch.nn import functional as F

    shape = (int(shape[0]), int(shape[1]))
    is_numpy = isinstance(x, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(x)) if is_numpy else x
    if tuple(t.shape[-2:]) == shape:
        out = t if labels else t.float()
    else:
        lead = t.shape[:-2]
        flat = t.reshape((-1, 1) + tuple(t.shape[-2:]))
        if labels:
            out = F.interpolate(flat.float(), size=shape, mode="nearest-exact").to(t.dtype)
        else:
            shrink = shape[0] < t.shape[-2] or shape[1] < t.shape[-1]
            out = F.interpolate(flat.float(), size=shape, mode="bilinear", align_corners=False,
                                antialias=shrink)
        out = out.reshape(tuple(lead) + shape)
    return out.numpy() if is_numpy else out


def prepare_slices(hu: np.ndarray, pixel_mm: Sequence[float], card: Mapping[str, Any],
                   keep_hu: bool = False):
    """HU slices (n, J, I) at pixel_mm (row, col) -> (network input float32 (n, channels, h, w),
    the resampled full-resolution shape (rows, cols)) following the card; with ``keep_hu``
    also the resampled HU float32 (n, rows, cols), the guide of HU-guided upsampling, made
    once for both."""
    hu = np.asarray(hu, np.float32)
    work = resampled_shape(hu.shape[-2:], pixel_mm, source_pixel_mm(card))
    hu_work = resample_planes(hu, work)
    channels = window_channels(hu_work, card["windows"])
    k = int(card["factor"])
    if card["image_mode"] == "average":
        x = epd_image(channels, k)
    else:
        x = bilinear_image(channels, k)
    x = np.ascontiguousarray(x, np.float32)
    return (x, work, hu_work) if keep_hu else (x, work)


#: slices windowed and averaged at once by prepare_slices_torch
_PREPARE_SLICES = 2


def prepare_slices_torch(hu: np.ndarray, pixel_mm: Sequence[float], card: Mapping[str, Any],
                         keep_hu: bool = False):
    """prepare_slices in torch on the CPU, for inference: (network input float32 torch
    tensor (n, channels, h, w), the resampled shape (rows, cols)); with ``keep_hu`` also the
    resampled HU float32 (n, rows, cols), the guide of HU-guided upsampling, made
    once for both. The windowing is the same
    float32 arithmetic; the window mean (image mode "average") is F.avg_pool2d with the
    partial windows at the far edges averaged over the pixels they hold, as epd_image, but
    summed in float32 rather than float64: within a few float32 steps of it (3e-7 in the
    0..1 channels, tested), far below anything the network tells apart, for a third
    (factor 2) to a seventh (factor 4) of the mean's cost (16 slices of 512 x 512). torch's
    kernels run on every core in place of NumPy's one."""
    import torch
    from torch.nn import functional as F

    k = int(card["factor"])
    t = torch.from_numpy(np.ascontiguousarray(hu, np.float32))
    work = resampled_shape(t.shape[-2:], pixel_mm, source_pixel_mm(card))
    if card["image_mode"] != "average":
        x = torch.from_numpy(prepare_slices(hu, pixel_mm, card)[0])
        return (x, work, resample_planes(t, work)) if keep_hu else (x, work)
    if k == 1:
        full = resample_planes(t, work)
        x = window_channels(full, card["windows"]).contiguous()
        return (x, work, full) if keep_hu else (x, work)
    # _PREPARE_SLICES at a time, so that the windowed full-resolution channels stay in the
    # cache (16 slices at once: 50 MB at 512 x 512): 12 to 14 ms against 16.5 a 16-slice
    # slab at factor 4, the same values
    parts, kept = [], []
    for i in range(0, max(1, int(t.shape[0])), _PREPARE_SLICES):
        planes = resample_planes(t[i:i + _PREPARE_SLICES], work)
        if keep_hu:
            kept.append(planes)
        parts.append(F.avg_pool2d(window_channels(planes, card["windows"]), k, stride=k,
                                  ceil_mode=True))
    x = parts[0] if len(parts) == 1 else torch.cat(parts)
    if not keep_hu:
        return x, work
    return x, work, kept[0] if len(kept) == 1 else torch.cat(kept)


def restore_probabilities(probs: np.ndarray, work_shape: Sequence[int],
                          input_shape: Sequence[int], card: Mapping[str, Any],
                          guide: Optional[np.ndarray] = None) -> np.ndarray:
    """Network output (n, C, h, w) -> probabilities (n, C, *input_shape) on the input grid.
    guide: the slices' HU (n, *work_shape) on the resampled grid (prepare_slices' keep_hu),
    needed when the card's maps are upsampled guided by the HU (core/upsampling.py) and the
    input grid is finer than the network's (upsampling.applies)."""
    if upsampling.applies(card, probs.shape[-2:], input_shape):
        import torch

        guide = _need_guide(guide)
        out = restore_probabilities_torch(torch.from_numpy(np.ascontiguousarray(probs)),
                                          work_shape, input_shape, card,
                                          torch.from_numpy(np.ascontiguousarray(guide)))
        return out.numpy()
    full = upsample_soft(probs, tuple(work_shape), int(card["factor"]))
    return resample_planes(full, tuple(input_shape))


def _need_guide(guide):
    if guide is None:
        raise ValueError("this model's card upsamples its maps guided by the HU "
                         "(core/upsampling.py): pass the slices' HU on the resampled grid")
    return guide


# ----------------------------------------------------------------------------- prediction


#: How far outside 0..1 a probability may lie (float rounding of a softmax or its resampling).
PROBABILITY_TOLERANCE = 1e-3


def check_probability_range(p) -> None:
    """ValueError unless the torch tensor p holds finite values in 0..1 (to
    PROBABILITY_TOLERANCE): what a model must return. Checked on the network's own output,
    before upsampling: bilinear upsampling and resampling take convex combinations, so
    they keep the range, and the check costs 1/k^2 of one on the full grid."""
    import torch

    if p.numel() == 0:
        return
    lo, hi = torch.aminmax(p)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))) \
            or float(lo) < -PROBABILITY_TOLERANCE or float(hi) > 1 + PROBABILITY_TOLERANCE:
        raise ValueError(f"probabilities must be finite and lie in 0..1; found "
                         f"{float(lo):.4g}..{float(hi):.4g}")


def _is_oom(exc: BaseException, torch) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def forward(model, t, mirror: bool = True):
    """The network's probabilities (n, C, h, w) float32 for a batch t (n, channels, h, w) on
    the model's device. ``mirror``: the mean of the predictions for the slices and for their
    left-right mirror images (flipped back), as nnU-Net's test-time mirroring does: twice the
    network's time. The networks are trained with left-right flips (training.data.Augment),
    so the mirror image is a slice like those they learned from; the mean of two softmax
    outputs still sums to one. Measured in docs/model.md (mirror averaging)."""
    p = model(t).float()
    if mirror:
        p = (p + model(t.flip(-1)).float().flip(-1)) * 0.5
    return p


def run_network(model, x, device, batch_size: int, notes: List[str], *,
                progress: Optional[Callable[[int, int], None]] = None,
                should_cancel: Optional[Callable[[], bool]] = None,
                done_offset: int = 0, total: Optional[int] = None, as_tensor: bool = False,
                mirror: bool = True):
    """Probabilities float32 (n, C, h, w) for network input x (n, channels, h, w), a NumPy
    array or a CPU torch tensor; ``mirror``: averaged with the mirror images' (forward).

    On out-of-memory the batch is halved and retried; at batch size 1 the model moves to the
    CPU. Each retry is recorded in ``notes``. Returns (probabilities, device, batch size):
    a NumPy array, or with ``as_tensor`` a torch tensor left on the (last) device, so that
    upsampling and argmax can follow there without a round trip through host memory."""
    import torch

    n = x.shape[0]
    total = n if total is None else total
    parts = []
    i = 0
    if any(t.device != device for t in model.parameters()):
        model.to(device)            # a walk over every module: not once per slab
    model.eval()
    while i < n:
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled after {done_offset + i} of {total} slices")
        chunk = x[i:i + batch_size]
        try:
            with torch.inference_mode():
                t = torch.from_numpy(chunk) if isinstance(chunk, np.ndarray) else chunk
                p = forward(model, t.to(device), mirror)
                p = p if as_tensor else p.cpu().numpy()
        except RuntimeError as exc:
            if not _is_oom(exc, torch):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if batch_size > 1:
                batch_size = max(1, batch_size // 2)
                notes.append(f"out of memory on {device}: retrying with batch size {batch_size}")
                continue
            if device.type != "cpu":
                notes.append(f"out of memory on {device} at batch size 1: continuing on the CPU")
                device = torch.device("cpu")
                model.to(device)
                continue
            raise RuntimeError(f"out of memory on the CPU even at batch size 1 for a "
                               f"{tuple(chunk.shape[-2:])} slice") from exc
        parts.append(p)
        i += len(chunk)
        if progress is not None:
            progress(done_offset + i, total)
    if as_tensor:
        out = parts[0] if len(parts) == 1 else torch.cat([t.to(device) for t in parts])
    else:
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out, device, batch_size


def upsample_soft_fast(probs, work_shape: Sequence[int], factor: int):
    """epd.upsample_soft on a torch tensor (n, C, h, w) -> (n, C, *work_shape), on its
    device, as one bilinear F.interpolate (align_corners=False, scale exactly k, cropped):
    output pixel j samples low-resolution coordinate (j + 0.5) / k - 0.5, clamped at the
    edges, the same taps as upsample_soft (equal to float32 rounding; tested). About 50
    times faster on the CPU than gathering the taps with index_select."""
    from torch.nn import functional as F

    k = int(factor)
    rows, cols = check_up_shape(tuple(probs.shape), tuple(work_shape), (k, k))
    if k == 1:
        return probs.float()
    up = F.interpolate(probs.float(), scale_factor=(k, k), mode="bilinear",
                       align_corners=False, recompute_scale_factor=False)
    return up[..., :rows, :cols]


def restore_probabilities_torch(probs, work_shape: Sequence[int], input_shape: Sequence[int],
                                card: Mapping[str, Any], guide=None):
    """restore_probabilities on torch tensors, on their device: network output (n, C, h, w)
    -> probabilities (n, C, *input_shape) float32 (equal to the NumPy path to float
    rounding). guide: torch (n, *work_shape) HU, for a card with HU-guided upsampling
    (used where upsampling.applies)."""
    if upsampling.applies(card, probs.shape[-2:], input_shape):
        up = upsampling.guided(card)
        full = upsampling.guided_upsample(
            probs, _need_guide(guide), int(card["factor"]), sigma_hu=float(up["sigma_hu"]),
            sigma_cells=float(up["sigma_cells"]), radius_cells=int(up["radius_cells"]))
    else:
        full = upsample_soft_fast(probs, tuple(work_shape), int(card["factor"]))
    return resample_planes(full, tuple(input_shape))


@dataclass
class Deferred:
    """The network's output for a slab, restored to the input grid only when asked, a few
    slices at a time: core.stream makes each slice's outputs from its restored planes
    while they are still in the core's cache (on the CPU 30 % cheaper than restoring the
    slab whole and passing over it once per output, docs/benchmarks.md), and the
    network's thread is spared the upsampling.

    probs: torch (n, C, h, w) on ``device``, already range-checked; work: the resampled
    grid (rows, cols) the network's input came from; input_shape: the input grid (J, I);
    flips: (rows, columns) to flip back out of the network's orientation; guide: the slab's
    HU on the resampled grid (n, rows, cols) torch, in the network's orientation, for a
    card with HU-guided upsampling (None otherwise); padding: the air added round the
    slices in the network's orientation (core/field.py), cropped off after restoring, so
    input_shape is the padded grid."""

    probs: Any
    work: Tuple[int, int]
    input_shape: Tuple[int, int]
    card: Mapping[str, Any]
    flips: Tuple[bool, bool] = (False, False)
    guide: Any = None
    padding: Tuple[Tuple[int, int], Tuple[int, int]] = ((0, 0), (0, 0))

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(C, n, J, I), as the restored probabilities' (on the grid before any padding)."""
        n, c = int(self.probs.shape[0]), int(self.probs.shape[1])
        (t, b), (l, r) = self.padding
        return (c, n, int(self.input_shape[0]) - t - b, int(self.input_shape[1]) - l - r)

    @property
    def device(self):
        return self.probs.device

    def planes(self, start: int, stop: int):
        """Probabilities of slices start..stop-1 of the slab on the input grid: torch float32
        (C, stop - start, J, I) on the device (restore_probabilities_torch, flipped back)."""
        guide = None if self.guide is None else self.guide[start:stop]
        full = restore_probabilities_torch(self.probs[start:stop], self.work,
                                           self.input_shape, self.card, guide)  # (n, C, J, I)
        (t, b), (l, r) = self.padding
        if t or b or l or r:
            full = full[..., t:full.shape[-2] - b, l:full.shape[-1] - r]
        dims = [d for d, f in ((2, self.flips[0]), (3, self.flips[1])) if f]
        if dims:
            full = full.flip(dims)
        return full.transpose(0, 1)

    def restore(self):
        """All the slab's probabilities (C, n, J, I) on the input grid."""
        return self.planes(0, int(self.probs.shape[0]))


def network_slab(hu: np.ndarray, pixel_mm: Sequence[float], model, card: Mapping[str, Any],
                 device, batch_size: int, notes: List[str],
                 flips: Tuple[bool, bool] = (False, False), **network):
    """One slab of HU slices (n, J, I) through the network -> (Deferred: its output, to be
    restored to the input grid; the device the network ended on; the batch size that
    worked). ValueError if the network's output is not finite in 0..1
    (check_probability_range).

    The network input is prepared on the host. flips: (rows, columns) to flip into the
    network's orientation (orientation.network_flips) and back. ``network``: progress,
    should_cancel, done_offset, total, mirror, passed to run_network. With the card's
    field (core/field.py) each slice is padded with air by its own content, and slices
    padded alike run together (a Grouped output)."""
    flip_rows, flip_cols = flips
    if flip_rows or flip_cols:
        hu = np.ascontiguousarray(hu[:, ::-1 if flip_rows else 1, ::-1 if flip_cols else 1])
    share = field_of_view.content_share(card)
    if share is None:
        return _network_part(hu, field_of_view.NO_PADDING, pixel_mm, model, card, device,
                             batch_size, notes, flips, **network)
    groups: Dict[Any, List[int]] = {}
    for i in range(hu.shape[0]):
        groups.setdefault(field_of_view.field_padding(hu[i:i + 1], pixel_mm, card),
                          []).append(i)
    if any(p != field_of_view.NO_PADDING for p in groups):
        note = field_of_view.describe(share)
        if note not in notes:
            notes.append(note)
    if len(groups) == 1:
        (padding,) = groups
        return _network_part(hu, padding, pixel_mm, model, card, device, batch_size, notes,
                             flips, **network)
    done = int(network.pop("done_offset", 0))
    total = network.pop("total", None)
    total = done + hu.shape[0] if total is None else total
    parts = []
    for padding, idx in groups.items():
        low, device, batch_size = _network_part(
            hu[idx], padding, pixel_mm, model, card, device, batch_size, notes, flips,
            done_offset=done, total=total, **network)
        parts.append((idx, low))
        done += len(idx)
    return Grouped(parts, hu.shape[0]), device, batch_size


def _network_part(hu, padding, pixel_mm, model, card, device, batch_size, notes, flips,
                  **network):
    """network_slab for slices (n, J, I) already in the network's orientation, padded with
    ``padding`` (core/field.py) here and cropped back in the Deferred."""
    hu = field_of_view.pad_slab(hu, padding)
    # HU-guided upsampling needs the slab's HU on the resampled grid (a float32 copy, a
    # quarter of the soft maps' size at factor 2), resampled once with the network's input
    guided = upsampling.applies(card, network_cells(hu.shape[1:], pixel_mm, card),
                                hu.shape[1:])
    x, work, *kept = prepare_slices_torch(hu, pixel_mm, card, keep_hu=guided)
    probs, device, batch_size = run_network(model, x, device, batch_size, notes,
                                            as_tensor=True, **network)
    check_probability_range(probs)
    probs = calibrate(probs, card, pixel_mm)       # the card's class priors, if it has them
    low = Deferred(probs, tuple(work), tuple(int(v) for v in hu.shape[1:]), card,
                   (bool(flips[0]), bool(flips[1])), kept[0] if kept else None, padding)
    return low, device, batch_size


@dataclass
class Grouped:
    """A slab's output in parts, Deferred's interface: parts [(the slab's slice positions,
    their Deferred)], n slices in all (network_slab, slices padded differently)."""

    parts: List[Tuple[List[int], Deferred]]
    n: int

    def __post_init__(self):
        # each slab position -> (its part, its index there)
        self._where = {pos: (low, k) for idx, low in self.parts for k, pos in enumerate(idx)}

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        c, _, j, i = self.parts[0][1].shape
        return (c, self.n, j, i)

    @property
    def device(self):
        return self.parts[-1][1].device

    def planes(self, start: int, stop: int):
        """Probabilities of slices start..stop-1: torch float32 (C, stop - start, J, I)."""
        import torch

        return torch.cat([low.planes(k, k + 1).to(self.device)
                          for low, k in (self._where[s] for s in range(start, stop))], dim=1)

    def restore(self):
        """All the slab's probabilities (C, n, J, I) on the input grid."""
        return self.planes(0, self.n)


def predict_slab(hu: np.ndarray, pixel_mm: Sequence[float], model, card: Mapping[str, Any],
                 device, batch_size: int, notes: List[str],
                 flips: Tuple[bool, bool] = (False, False), **network):
    """One slab of HU slices (n, J, I) -> (probabilities as a torch tensor (C, n, J, I)
    float32 on the device the network ended on, that device, the batch size that worked):
    network_slab, restored whole. The soft maps are upsampled and resampled back to the
    input grid on the device."""
    low, device, batch_size = network_slab(hu, pixel_mm, model, card, device, batch_size,
                                           notes, flips, **network)
    return low.restore(), device, batch_size


def check_slices(slices: Optional[Sequence[int]], n_slices: int) -> List[int]:
    """The slice indices K to process (all when None); ValueError if one is outside
    0..n_slices-1 or none are given."""
    if slices is None:
        return list(range(n_slices))
    slices = [int(k) for k in slices]
    bad = [k for k in slices if not 0 <= k < n_slices]
    if bad:
        raise ValueError(f"slice index {bad[0]} outside the volume's 0..{n_slices - 1}")
    if not slices:
        raise ValueError("no slices requested")
    return slices


def _check_inputs(hu: np.ndarray, pixel_mm: Sequence[float], batch_size) -> Tuple[float, float]:
    if len(hu.shape) != 3 or min(hu.shape) == 0:
        raise ValueError(f"hu must be a non-empty (K, J, I) volume; got shape {hu.shape}")
    if hu.dtype.kind not in "iuf":
        raise ValueError(f"hu must be numeric HU values; got dtype {hu.dtype}")
    pixel_mm = tuple(float(v) for v in pixel_mm)
    if len(pixel_mm) != 2 or not all(np.isfinite(v) and v > 0 for v in pixel_mm):
        raise ValueError(f"pixel_mm must be (row mm, column mm), both > 0; got {pixel_mm!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    return pixel_mm[0], pixel_mm[1]


def _start_notes(device, hu_shape, pixel_mm, card) -> Tuple[Any, List[str]]:
    """(torch.device, notes) with the device choice and any resampling said in words."""
    import torch

    notes: List[str] = []
    if isinstance(device, torch.device):
        dev = device
        notes.append(f"device {dev} (given)")
    else:
        dev, reason = select_device(device)
        notes.append(f"device {dev}: {reason}")
    src = source_pixel_mm(card)
    work = resampled_shape(hu_shape[-2:], pixel_mm, src)
    if work != tuple(hu_shape[-2:]):
        notes.append(f"slices resampled from {pixel_mm[0]:.3g} x {pixel_mm[1]:.3g} mm "
                     f"({hu_shape[1]} x {hu_shape[2]}) to the model's {src[0]:.3g} x "
                     f"{src[1]:.3g} mm ({work[0]} x {work[1]})")
    if upsampling.guided(card) is not None:
        cells = network_cells(hu_shape[-2:], pixel_mm, card)
        notes.append(upsampling.describe(card) if upsampling.applies(card, cells, hu_shape[-2:])
                     else "soft maps upsampled bilinearly: the slices' pixels are not smaller "
                          "than the network's, so their HU cannot guide the edges")
    return dev, notes


def _flips(ijk_to_ras, notes: List[str]) -> Tuple[bool, bool]:
    """(flip rows, flip columns) into the network's orientation for a volume's geometry
    (None: as stored), with the reason added to notes."""
    if ijk_to_ras is None:
        return False, False
    flip_rows, flip_cols, flip_notes = network_flips(ijk_to_ras)
    notes.extend(flip_notes)
    return flip_rows, flip_cols


def slab_predictor(hu, pixel_mm: Sequence[float], model, card: Mapping[str, Any],
                   *, device: Any = "auto", batch_size: int = 8, ijk_to_ras: Any = None,
                   mirror: bool = True):
    """A predict(slices, progress, should_cancel) callable for stream.stream_slabs: the
    probabilities (C, n, J, I) of the listed slices of ``hu`` (K, J, I) as a torch tensor on
    the device, the device's name and the notes so far. hu: an array, or anything with
    ``shape``, ``dtype`` and ``hu[list of slices]`` -> (n, J, I) HU (io.sources' volumes,
    read slab by slab). An out-of-memory fallback (smaller
    batch, then the CPU) found in one slab is kept for the next ones. ijk_to_ras (4, 4):
    the volume's geometry; slices stored in another in-plane orientation than the
    network's (anterior up, patient's right on the left: orientation.network_flips) are
    flipped into it and the probabilities flipped back (None: used as stored). ``mirror``:
    mirror averaging (forward).

    ``predict.deferred`` takes the same arguments and returns the network's output
    unrestored (a Deferred) in place of the probabilities: core.stream restores it slice
    by slice as it makes the outputs."""
    if not (hasattr(hu, "shape") and hasattr(hu, "dtype") and hasattr(hu, "__getitem__")):
        hu = np.asarray(hu)
    pixel_mm = _check_inputs(hu, pixel_mm, batch_size)
    dev, notes = _start_notes(device, hu.shape, pixel_mm, card)
    flips = _flips(ijk_to_ras, notes)
    state: Dict[str, Any] = {"device": dev, "batch": batch_size}

    def deferred(slices: Sequence[int], progress=None, should_cancel=None):
        idx = check_slices(slices, hu.shape[0])
        low, state["device"], state["batch"] = network_slab(
            hu[idx], pixel_mm, model, card, state["device"], state["batch"], notes,
            flips=flips, progress=progress, should_cancel=should_cancel, mirror=mirror)
        return low, str(state["device"]), list(notes)

    def predict(slices: Sequence[int], progress=None, should_cancel=None):
        low, dev_name, dev_notes = deferred(slices, progress, should_cancel)
        return low.restore(), dev_name, dev_notes

    # tells core.stream the range was checked on the network's output (network_slab), and
    # how to get that output unrestored (stream restores it a slice at a time)
    predict.range_checked = True
    predict.deferred = deferred
    return predict


def predict_volume(hu: np.ndarray, pixel_mm: Sequence[float], model, card: Mapping[str, Any], *,
                   device: Any = "auto", batch_size: int = 8,
                   slices: Optional[Sequence[int]] = None,
                   progress: Optional[Callable[[int, int], None]] = None,
                   should_cancel: Optional[Callable[[], bool]] = None,
                   ijk_to_ras: Any = None, mirror: bool = True) -> Prediction:
    """Class probabilities for slices of a CT volume, held whole in memory (for a few slices,
    evaluation and tests; ``segment`` streams slabs through stream.stream_slabs instead).

    hu: (K, J, I) HU; pixel_mm: (row, col) = (J, I) spacing in mm; model, card: from
    model_io.load_model; device: "auto", "cuda", "mps", "cpu" or a torch.device;
    slices: indices K (default all). progress(done, total) is called after each batch;
    should_cancel() is checked between batches and raises Cancelled. ijk_to_ras (4, 4):
    the volume's geometry, for the flips into the network's orientation (slab_predictor);
    None: used as stored. mirror: mirror averaging (forward).
    """
    hu = np.asarray(hu)
    pixel_mm = _check_inputs(hu, pixel_mm, batch_size)
    slices = check_slices(slices, hu.shape[0])
    dev, notes = _start_notes(device, hu.shape, pixel_mm, card)
    flips = _flips(ijk_to_ras, notes)
    n = len(slices)
    C = int(card["architecture"]["num_classes"])
    out = np.empty((C, n) + tuple(hu.shape[1:]), np.float32)
    done = 0
    # Prepare a few batches at a time so memory stays bounded on long volumes.
    group = max(1, batch_size) * 4
    for g0 in range(0, n, group):
        idx = slices[g0:g0 + group]
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled after {done} of {n} slices")
        full, dev, batch_size = predict_slab(hu[idx], pixel_mm, model, card, dev, batch_size,
                                             notes, flips=flips, progress=progress,
                                             should_cancel=should_cancel, done_offset=done,
                                             total=n, mirror=mirror)
        out[:, g0:g0 + len(idx)] = full.cpu().numpy()
        done += len(idx)
    return Prediction(out, slices, str(dev), notes)
