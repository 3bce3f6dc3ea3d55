"""Run a trained model on a CT volume: the one inference path of the CLI, the Slicer module
and evaluation.

For every requested axial slice (a (J, I) plane of the (K, J, I) volume):
1. resample to the model's source spacing (card pixel_mm / factor), so the network sees
   anatomy at the scale it learned (bilinear, antialiased when shrinking);
2. window the HU into the card's input channels (windowing.window_channels);
3. downsample by the card's factor with the card's image mode (epd.epd_image or
   epd.bilinear_image);
4. predict class probabilities in batches (the network pads to a multiple of 32 itself);
5. upsample the soft maps to the resampled grid (epd.upsample_soft) and resample them back
   to the input grid (bilinear, so they stay probabilities that sum to one).

torch is imported inside the functions: importing this module needs NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .epd import bilinear_image, epd_image, upsample_soft
from .windowing import window_channels

#: Relative spacing difference below which a slice is used as it is (no resampling).
SPACING_TOLERANCE = 1e-3


class Cancelled(Exception):
    """Raised by predict_volume when should_cancel() returns True between batches."""


class DeviceError(RuntimeError):
    """A requested device is not available; the message says why."""


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


def prepare_slices(hu: np.ndarray, pixel_mm: Sequence[float], card: Mapping[str, Any]):
    """HU slices (n, J, I) at pixel_mm (row, col) -> (network input float32 (n, channels, h, w),
    the resampled full-resolution shape (rows, cols)) following the card."""
    hu = np.asarray(hu, np.float32)
    work = resampled_shape(hu.shape[-2:], pixel_mm, source_pixel_mm(card))
    hu_work = resample_planes(hu, work)
    channels = window_channels(hu_work, card["windows"])
    k = int(card["factor"])
    if card["image_mode"] == "average":
        x = epd_image(channels, k)
    else:
        x = bilinear_image(channels, k)
    return np.ascontiguousarray(x, np.float32), work


def restore_probabilities(probs: np.ndarray, work_shape: Sequence[int],
                          input_shape: Sequence[int], card: Mapping[str, Any]) -> np.ndarray:
    """Network output (n, C, h, w) -> probabilities (n, C, *input_shape) on the input grid."""
    full = upsample_soft(probs, tuple(work_shape), int(card["factor"]))
    return resample_planes(full, tuple(input_shape))


# ----------------------------------------------------------------------------- prediction


def _is_oom(exc: BaseException, torch) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def run_network(model, x: np.ndarray, device, batch_size: int, notes: List[str], *,
                progress: Optional[Callable[[int, int], None]] = None,
                should_cancel: Optional[Callable[[], bool]] = None,
                done_offset: int = 0, total: Optional[int] = None):
    """Probabilities float32 (n, C, h, w) for network input x (n, channels, h, w).

    On out-of-memory the batch is halved and retried; at batch size 1 the model moves to the
    CPU. Each retry is recorded in ``notes``. Returns (probabilities, device, batch size)."""
    import torch

    n = x.shape[0]
    total = n if total is None else total
    out = None
    i = 0
    model.to(device)
    model.eval()
    while i < n:
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled after {done_offset + i} of {total} slices")
        chunk = x[i:i + batch_size]
        try:
            with torch.inference_mode():
                p = model(torch.from_numpy(chunk).to(device)).float().cpu().numpy()
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
        if out is None:
            out = np.empty((n,) + p.shape[1:], np.float32)
        out[i:i + len(chunk)] = p
        i += len(chunk)
        if progress is not None:
            progress(done_offset + i, total)
    return out, device, batch_size


def predict_volume(hu: np.ndarray, pixel_mm: Sequence[float], model, card: Mapping[str, Any], *,
                   device: Any = "auto", batch_size: int = 8,
                   slices: Optional[Sequence[int]] = None,
                   progress: Optional[Callable[[int, int], None]] = None,
                   should_cancel: Optional[Callable[[], bool]] = None,
                   ijk_to_ras: Optional[Any] = None) -> Prediction:
    """Class probabilities for slices of a CT volume.

    hu: (K, J, I) HU; pixel_mm: (row, col) = (J, I) spacing in mm; model, card: from
    model_io.load_model; device: "auto", "cuda", "mps", "cpu" or a torch.device;
    slices: indices K (default all). progress(done, total) is called after each batch;
    should_cancel() is checked between batches and raises Cancelled. ijk_to_ras (4, 4):
    the volume's geometry; when given, slices stored in another in-plane orientation than
    the network's (anterior up, patient's right on the left: orientation.network_flips)
    are flipped into it and the probabilities flipped back (None: used as stored).
    """
    import torch

    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) == 0:
        raise ValueError(f"hu must be a non-empty (K, J, I) volume; got shape {hu.shape}")
    if hu.dtype.kind not in "iuf":
        raise ValueError(f"hu must be numeric HU values; got dtype {hu.dtype}")
    pixel_mm = tuple(float(v) for v in pixel_mm)
    if len(pixel_mm) != 2 or not all(np.isfinite(v) and v > 0 for v in pixel_mm):
        raise ValueError(f"pixel_mm must be (row mm, column mm), both > 0; got {pixel_mm!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if slices is None:
        slices = list(range(hu.shape[0]))
    else:
        slices = [int(k) for k in slices]
        bad = [k for k in slices if not 0 <= k < hu.shape[0]]
        if bad:
            raise ValueError(f"slice index {bad[0]} outside the volume's 0..{hu.shape[0] - 1}")
        if not slices:
            raise ValueError("no slices requested")
    notes: List[str] = []
    if isinstance(device, torch.device):
        dev = device
        notes.append(f"device {dev} (given)")
    else:
        dev, reason = select_device(device)
        notes.append(f"device {dev}: {reason}")
    flip_rows = flip_cols = False
    if ijk_to_ras is not None:
        from .orientation import network_flips

        flip_rows, flip_cols, flip_notes = network_flips(ijk_to_ras)
        notes.extend(flip_notes)
    src = source_pixel_mm(card)
    work = resampled_shape(hu.shape[-2:], pixel_mm, src)
    if work != tuple(hu.shape[-2:]):
        notes.append(f"slices resampled from {pixel_mm[0]:.3g} x {pixel_mm[1]:.3g} mm "
                     f"({hu.shape[1]} x {hu.shape[2]}) to the model's {src[0]:.3g} x "
                     f"{src[1]:.3g} mm ({work[0]} x {work[1]})")

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
        planes = hu[idx]
        if flip_rows:
            planes = planes[:, ::-1]
        if flip_cols:
            planes = planes[:, :, ::-1]
        x, work = prepare_slices(np.ascontiguousarray(planes), pixel_mm, card)
        probs, dev, batch_size = run_network(model, x, dev, batch_size, notes,
                                             progress=progress, should_cancel=should_cancel,
                                             done_offset=done, total=n)
        full = restore_probabilities(probs, work, hu.shape[1:], card)  # (n, C, J, I)
        if flip_rows:
            full = full[:, :, ::-1]
        if flip_cols:
            full = full[:, :, :, ::-1]
        out[:, g0:g0 + len(idx)] = np.moveaxis(full, 1, 0)
        done += len(idx)
    return Prediction(out, slices, str(dev), notes)
