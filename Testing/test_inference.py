"""Inference on CPU with a small random-weight model saved through save_model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from EPDSegmentationLib.core.epd import epd_image, upsample_soft
from EPDSegmentationLib.core.inference import (Cancelled, DeviceError, Prediction, predict_volume,
                                          prepare_slices, resampled_shape, run_network,
                                          select_device, source_pixel_mm)
from EPDSegmentationLib.core.model_io import load_model
from EPDSegmentationLib.core.windowing import DEFAULT_WINDOWS, window_channels


@pytest.fixture(scope="module")
def saved_model(tiny_model_path):
    return load_model(tiny_model_path)


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    hu = rng.normal(-100, 300, (5, 40, 52)).astype(np.float32)
    hu[:, 10:30, 12:40] = 40.0  # a block of soft tissue in air-like noise
    return hu


def test_probabilities_on_the_input_grid(saved_model, volume):
    model, card = saved_model
    calls = []
    pred = predict_volume(volume, (0.8, 0.8), model, card, device="cpu", batch_size=2,
                          progress=lambda done, total: calls.append((done, total)))
    assert isinstance(pred, Prediction)
    assert pred.probabilities.shape == (6, 5, 40, 52)
    assert pred.probabilities.dtype == np.float32
    assert np.allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)
    assert pred.slices == [0, 1, 2, 3, 4] and pred.device == "cpu"
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_same_spacing_is_exactly_window_downsample_predict_upsample(saved_model, volume):
    """At the model's source spacing nothing is resampled: the documented pipeline by hand."""
    model, card = saved_model
    assert source_pixel_mm(card) == (0.8, 0.8)
    pred = predict_volume(volume, (0.8, 0.8), model, card, device="cpu", slices=[3, 1],
                          mirror=False)
    x = epd_image(window_channels(volume[[3, 1]], DEFAULT_WINDOWS), 2)
    with torch.no_grad():
        p = model(torch.from_numpy(x)).numpy()
    expected = np.moveaxis(upsample_soft(p, (40, 52), 2), 1, 0)
    assert pred.slices == [3, 1]
    assert np.allclose(pred.probabilities, expected, atol=1e-6)
    assert not any("resampled" in n for n in pred.notes)


def test_mirror_averaging_is_the_mean_with_the_mirror_images_prediction(saved_model, volume):
    """The default: the mean of the network's output for each slice and, flipped back, for
    its left-right mirror image; --no-mirror (mirror=False) is the plain output."""
    model, card = saved_model
    x = epd_image(window_channels(volume[[3, 1]], DEFAULT_WINDOWS), 2)
    with torch.no_grad():
        plain = model(torch.from_numpy(x)).numpy()
        mirrored = model(torch.from_numpy(np.ascontiguousarray(x[..., ::-1]))).numpy()[..., ::-1]
    want = {False: plain, True: (plain + mirrored) / 2}
    assert np.abs(want[True] - want[False]).max() > 1e-3       # the tiny model is not symmetric
    for mirror in (True, False, None):                          # None: the default
        kw = {} if mirror is None else {"mirror": mirror}
        got, _, _ = run_network(model, x, torch.device("cpu"), 1, [], **kw)
        np.testing.assert_allclose(got, want[mirror is not False], atol=1e-6)
        pred = predict_volume(volume, (0.8, 0.8), model, card, device="cpu", slices=[3, 1],
                              **kw)
        expected = np.moveaxis(upsample_soft(want[mirror is not False], (40, 52), 2), 1, 0)
        np.testing.assert_allclose(pred.probabilities, expected, atol=1e-6)


def test_other_spacing_is_resampled_to_the_models_scale(saved_model, volume):
    model, card = saved_model
    # 0.4 mm pixels: the network sees half as many source pixels per axis, then 1/2 of that
    x, work = prepare_slices(volume[:1], (0.4, 0.4), card)
    assert work == (20, 26) and x.shape == (1, 3, 10, 13)
    pred = predict_volume(volume, (0.4, 0.4), model, card, device="cpu", slices=[0])
    assert pred.probabilities.shape == (6, 1, 40, 52)
    assert np.allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)
    assert any("resampled from 0.4 x 0.4 mm" in n for n in pred.notes)
    assert resampled_shape((100, 80), (0.8008, 1.2), (0.8, 0.8)) == (100, 120)


def test_cancel_between_batches(saved_model, volume):
    model, card = saved_model
    seen = []

    def should_cancel():
        return len(seen) >= 1

    with pytest.raises(Cancelled, match="cancelled after 2 of 5 slices"):
        predict_volume(volume, (0.8, 0.8), model, card, device="cpu", batch_size=2,
                       progress=lambda d, t: seen.append(d), should_cancel=should_cancel)
    assert seen == [2]


class OutOfMemoryAbove(torch.nn.Module):
    """Wraps a network and fails like an exhausted device for batches above ``limit``."""

    def __init__(self, net, limit):
        super().__init__()
        self.net, self.limit = net, limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_out_of_memory_halves_the_batch_and_records_it(saved_model, volume):
    model, card = saved_model
    x, _ = prepare_slices(volume, (0.8, 0.8), card)
    notes = []
    got, dev, bs = run_network(OutOfMemoryAbove(model, 2), x, torch.device("cpu"), 8, notes,
                               mirror=False)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.allclose(got, expected, atol=1e-6)
    assert bs == 2
    assert notes == ["out of memory on cpu: retrying with batch size 4",
                     "out of memory on cpu: retrying with batch size 2"]
    with pytest.raises(RuntimeError, match="out of memory on the CPU even at batch size 1"):
        run_network(OutOfMemoryAbove(model, 0), x, torch.device("cpu"), 2, [])


def test_device_selection_explains_itself():
    dev, reason = select_device("auto")
    assert isinstance(dev, torch.device) and reason
    if not torch.cuda.is_available():
        assert dev.type in ("cpu", "mps") and "CUDA" in reason
        with pytest.raises(DeviceError, match="'cuda' requested, but"):
            select_device("cuda")
    assert select_device("cpu")[0].type == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        select_device("tpu")


def test_bad_input_is_named(saved_model, volume):
    model, card = saved_model
    with pytest.raises(ValueError, match=r"\(K, J, I\)"):
        predict_volume(volume[0], (0.8, 0.8), model, card, device="cpu")
    with pytest.raises(ValueError, match="pixel_mm"):
        predict_volume(volume, (0.8, 0), model, card, device="cpu")
    with pytest.raises(ValueError, match="slice index 9 outside"):
        predict_volume(volume, (0.8, 0.8), model, card, device="cpu", slices=[1, 9])
    with pytest.raises(ValueError, match="batch_size"):
        predict_volume(volume, (0.8, 0.8), model, card, device="cpu", batch_size=0)


# ----------------------------------------------------------------------------- streaming


def _reference_rows(path, model, card, idx):
    """Areas and HU the pre-streaming code computed (commit 8aea6c1): the whole selection's
    probabilities (n, C, J, I) through prepare_slices, run_network and the NumPy
    restore_probabilities, then bodycomp.tissue_measures on them."""
    from EPDSegmentationLib.core.bodycomp import tissue_measures
    from EPDSegmentationLib.core.inference import restore_probabilities
    from EPDSegmentationLib.io import read_volume

    vol = read_volume(path)
    si, sj, _ = vol.spacing
    x, work = prepare_slices(vol.array[idx], (sj, si), card)
    probs, _, _ = run_network(model, x, torch.device("cpu"), 8, [])
    full = np.moveaxis(restore_probabilities(probs, work, vol.array.shape[1:], card), 1, 0)
    return tissue_measures(full, vol.array, vol.spacing, idx), full


def _csv_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_measures(got, want, pixel_cm2):
    assert [(str(r["slice"]), r["tissue"]) for r in got] == \
        [(str(r["slice"]), r["tissue"]) for r in want]
    for g, w in zip(got, want):
        for key in ("area_cm2", "volume_cm3", "hu_mean", "hu_sd"):
            if w[key] != w[key]:                      # NaN: an empty cell
                assert g[key] == "", (g, key)
            else:
                assert float(g[key]) == pytest.approx(w[key], rel=2e-5, abs=1e-6), (g, key)
        # argmax of maps equal to float rounding: at most a pixel may tip to a neighbour
        assert float(g["hard_area_cm2"]) == pytest.approx(w["hard_area_cm2"],
                                                          abs=1.01 * pixel_cm2), g


@pytest.fixture(scope="module")
def stream_cases(tmp_path_factory, phantom_ct):
    """A NIfTI and a DICOM series of the same 4 phantom slices (96 x 96, resampled by the
    tiny model from their own pixel size to its 0.8 mm)."""
    from EPDSegmentationLib.io import write_dicom_series, write_volume

    hu, _ = phantom_ct(5, 4, 96, 5.0)
    root = tmp_path_factory.mktemp("stream")
    write_volume(hu, root / "ct.nii.gz")
    write_dicom_series(hu, root / "ct_dicom")
    return root


@pytest.mark.parametrize("slices, slab, extra", [
    (None, 3, {}),                                    # the whole volume, slabs of 3 and 1
    ("2", 16, {}),                                    # one selected slice
    pytest.param("0,2-3", 2, {"probabilities": True, "dicom_seg": True, "overlay_slice": 2},
                 marks=pytest.mark.slow),                         # every output
])
def test_streamed_segment_gives_the_areas_of_the_whole_volume_code(
        stream_cases, saved_model, tmp_path, slices, slab, extra):
    """segment_case, streamed slab by slab, writes the areas, volumes and HU statistics the
    pre-streaming code computed from whole-volume probabilities; the soft .seg.nrrd and the
    optional probability NRRD hold those probabilities too."""
    pytest.importorskip("highdicom")
    from EPDSegmentationLib.cli.segment import Case, segment_case
    from EPDSegmentationLib.io import read_seg_nrrd, read_volume

    model, card = saved_model
    src = stream_cases / ("ct_dicom" if extra.get("dicom_seg") else "ct.nii.gz")
    result = segment_case(Case("ct", src), tmp_path, model, card, device="cpu", slices=slices,
                          slab_slices=slab, **extra)
    assert result.ok, result.message + result.traceback
    vol = read_volume(src)
    idx = result.slices
    assert idx == ([0, 1, 2, 3] if slices is None else [2] if slices == "2" else [0, 2, 3])
    want, probs = _reference_rows(src, model, card, idx)
    _assert_same_measures(_csv_rows(tmp_path / "ct_bodycomp.csv"), want,
                          vol.pixel_area_mm2 / 100)
    soft = read_seg_nrrd(tmp_path / "ct_soft.seg.nrrd").meta["fractions"]
    np.testing.assert_allclose(soft[1:, idx], probs[1:], atol=0.5 / 216 + 1e-6)
    others = [k for k in range(vol.array.shape[0]) if k not in idx]
    assert not soft[1:, others].any()
    assert (tmp_path / "ct_probabilities.nrrd").exists() == bool(extra.get("probabilities"))
    if extra.get("probabilities"):
        import SimpleITK as sitk

        p = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ct_probabilities.nrrd")))
        np.testing.assert_allclose(np.moveaxis(p, -1, 0)[:, idx], probs, atol=1e-5)
        assert (tmp_path / "ct_prob_seg.dcm").is_file() and (tmp_path / "ct_overlay.png").is_file()


def test_streamed_memory_does_not_grow_with_the_slices(saved_model, tmp_path):
    """Host (NumPy/Python) allocations of a streamed run, reading included, grow from 24 to 96
    slices by less than half the volume's growth: nothing the size of the scan is held, not
    even the volume, which is read slab by slab (tracemalloc; torch's own allocations are
    not traced, the probabilities slab stays the same size anyway). Both runs are longer
    than what the pipeline holds at once (a slab ahead, 16 slices queued for gzip per
    output)."""
    import tracemalloc

    from EPDSegmentationLib.cli.segment import Case, segment_case
    from EPDSegmentationLib.core.volume import Volume
    from EPDSegmentationLib.io import write_volume

    model, card = saved_model
    rng = np.random.default_rng(1)
    m = np.diag([0.8, 0.8, 2.0, 1.0])
    peaks = {}
    # a first run pays one-off costs (imports, caches) that would hide growth in a later one
    for n in (8, 24, 96):
        hu = rng.normal(-200, 300, (n, 128, 128)).astype(np.int16)
        hu[:, 0, 0], hu[:, 1, 1] = -1000, 400
        write_volume(Volume(hu, m), tmp_path / f"v{n}.nrrd")
        tracemalloc.start()
        result = segment_case(Case(f"v{n}", tmp_path / f"v{n}.nrrd"), tmp_path / "out", model,
                              card, device="cpu", slab_slices=4, batch_size=4)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.ok, result.message + result.traceback
    # 72 more slices: holding the volume whole would add 72 x 128 x 128 float32 = 4.5 MiB,
    # its probabilities 6 times that; the peaks differ by what is in flight when they occur
    # (slabs read ahead, queued for gzip: 0.6 to 0.8 MiB measured) and the per-slice sums
    assert peaks[96] - peaks[24] < 2 * 2**20, peaks


@pytest.mark.parametrize("k, shape", [(2, (64, 64)), (4, (61, 58)), (3, (10, 11)), (1, (5, 6))])
def test_fast_upsampling_equals_upsample_soft(k, shape):
    """One F.interpolate (scale exactly k, cropped) samples what epd.upsample_soft samples,
    partial windows at the far edges included."""
    from EPDSegmentationLib.core.inference import upsample_soft_fast

    rng = np.random.default_rng(k)
    low = rng.random((2, 6, -(-shape[0] // k), -(-shape[1] // k))).astype(np.float32)
    got = upsample_soft_fast(torch.from_numpy(low), shape, k).numpy()
    np.testing.assert_allclose(got, upsample_soft(low, shape, k), atol=3e-7)


def test_device_sums_and_labels_equal_bodycomp():
    """The torch sums (used on GPUs) and bodycomp.slice_sums (the CPU) equal the sums by
    their definition, and the torch labels np.argmax, ties included (the first class
    wins)."""
    from EPDSegmentationLib.core.bodycomp import slice_sums
    from EPDSegmentationLib.core.stream import argmax_numpy, argmax_torch, slab_sums

    rng = np.random.default_rng(0)
    p = rng.random((6, 3, 20, 16)).astype(np.float32)
    p[:, :, :5] = 0.2                                   # ties between all classes
    p[2:, :, 5:8] = 0.3                                 # ties between classes 2..5
    p /= p.sum(0)
    hu = rng.normal(0, 300, (3, 20, 16))
    labels = argmax_torch(torch.from_numpy(p))           # GPUs'
    np.testing.assert_array_equal(labels.numpy(), np.argmax(p, 0))
    np.testing.assert_array_equal(argmax_numpy(p), np.argmax(p, 0))      # the CPU's
    got = slab_sums(torch.from_numpy(p), torch.from_numpy(hu), labels)
    # float64 throughout, from the definition
    p64, lab = p.astype(np.float64), np.argmax(p, 0)
    onehot = (lab[None] == np.arange(6).reshape(6, 1, 1, 1)).astype(np.float64)
    exact, scale = {}, {}
    for prefix, w in (("p", p64), ("n", onehot)):
        for suffix, m in (("", 0), ("_hu", 1), ("_hu2", 2)):
            exact[prefix + suffix] = (w * hu ** m).sum((2, 3)).T
            scale[prefix + suffix] = (w * np.abs(hu) ** m).sum((2, 3)).T
    numpy_sums = slice_sums(p, hu)
    for key, want in exact.items():
        np.testing.assert_allclose(got[key], want, rtol=1e-12, atol=1e-9)
        # NumPy's soft sums add float32 partials of 1024 pixels (HU rounded to float32, about 1e-7
        # of the sum of the magnitudes); its hard ones are float64
        tol = 1e-6 * scale[key] if key[0] == "p" else 1e-12 * scale[key] + 1e-9
        assert (np.abs(numpy_sums[key] - want) <= tol).all(), key


@pytest.mark.parametrize("k, shape, pixel", [(4, (3, 61, 58), 0.8), (2, (2, 64, 64), 0.4),
                                             (3, (2, 10, 11), 0.9), (1, (2, 7, 9), 0.3)])
def test_torch_input_preparation_equals_prepare_slices(k, shape, pixel):
    """The inference path prepares the network input in torch (window, then avg_pool2d in
    float32 with partial windows at the far edges): what prepare_slices (NumPy, epd_image,
    float64 means) gives to a few float32 steps, resampling included; the windowing is
    bit for bit the same (factor 1: no mean)."""
    from EPDSegmentationLib.core.inference import prepare_slices_torch

    card = {"factor": k, "image_mode": "average", "windows": DEFAULT_WINDOWS,
            "pixel_mm": (0.8 * k, 0.8 * k)}
    hu = np.random.default_rng(k).normal(-100, 400, shape).astype(np.float32)
    want, work, want_hu = prepare_slices(hu, (pixel, pixel), card, keep_hu=True)
    got, got_work, got_hu = prepare_slices_torch(hu, (pixel, pixel), card, keep_hu=True)
    assert got_work == work and got.dtype == torch.float32
    if k == 1:
        np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=3e-7)
    # the kept HU (the guide of HU-guided upsampling) on the grid the input is averaged from
    assert want_hu.shape == got_hu.shape == (shape[0], *work)
    np.testing.assert_allclose(got_hu.numpy(), want_hu, rtol=0, atol=1e-3)
    assert prepare_slices(hu, (pixel, pixel), card)[0].tobytes() == want.tobytes()


def test_network_batch_counts_factor_1_slices():
    from EPDSegmentationLib.cli.segment import network_batch

    assert [network_batch(8, {"factor": k}) for k in (1, 2, 4)] == [8, 32, 128]


class Shifted(torch.nn.Module):
    """A network whose output is its wrapped network's plus ``shift`` (NaN for None)."""

    def __init__(self, net, shift):
        super().__init__()
        self.net, self.shift = net, shift

    def forward(self, x):
        return self.net(x) + (float("nan") if self.shift is None else self.shift)


@pytest.mark.parametrize("shift", [1.5, -1.0, None])
def test_a_model_out_of_range_is_refused_before_upsampling(saved_model, volume, shift):
    """The range check is made once on the network's own output (slab_predictor), and by
    the stream itself for a predictor that does not make it."""
    from EPDSegmentationLib.core.inference import slab_predictor
    from EPDSegmentationLib.core.stream import stream_slabs

    model, card = saved_model
    bad = Shifted(model, shift)
    predict = slab_predictor(volume, (0.8, 0.8), bad, card, device="cpu", batch_size=2)
    assert predict.range_checked
    with pytest.raises(ValueError, match="finite and lie in 0..1; found (nan|-0.9|1.5)"):
        list(stream_slabs(volume, [0, 1, 2], predict))

    def plain(slices, progress=None, should_cancel=None):     # another predictor
        good = slab_predictor(volume, (0.8, 0.8), model, card, device="cpu")
        probs, device, notes = good(slices)
        return probs + (float("nan") if shift is None else shift), device, notes

    with pytest.raises(ValueError, match="finite and lie in 0..1"):
        list(stream_slabs(volume, [0, 1, 2], plain))


def test_slices_restored_one_at_a_time_give_the_outputs_of_the_slab_restored_whole(
        saved_model, volume):
    """The stream restores the network's output a slice at a time (predict.deferred, in the
    worker): every output equals that of the slab restored whole (what any other predictor
    hands over), with the planes flipped into the network's orientation and resampled."""
    from EPDSegmentationLib.core.inference import slab_predictor
    from EPDSegmentationLib.core.stream import stream_slabs

    model, card = saved_model
    ras = np.diag([0.7, 0.7, 2.5, 1.0])        # stored RAS+: both in-plane axes flipped
    predict = slab_predictor(volume, (0.7, 0.7), model, card, device="cpu", batch_size=2,
                             ijk_to_ras=ras)
    assert hasattr(predict, "deferred")
    low, _, notes = predict.deferred([0, 2])
    assert low.flips == (True, True) and any("resampled" in n for n in notes)
    assert low.shape == (len(card["classes"]), 2) + volume.shape[1:]

    def whole(slices, progress=None, should_cancel=None):       # no .deferred
        return predict(slices, progress, should_cancel)

    kw = dict(slab_slices=3, probabilities=True, protocol=True)
    got = list(stream_slabs(volume, [0, 1, 2, 4], predict, **kw))
    ref = list(stream_slabs(volume, [0, 1, 2, 4], whole, **kw))
    assert [s.slices for s in got] == [s.slices for s in ref]
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.uncertainty, b.uncertainty, rtol=1e-6)
        for key in a.sums:
            np.testing.assert_allclose(a.sums[key], b.sums[key], rtol=1e-6, atol=1e-6)
        for key in a.protocol:
            np.testing.assert_allclose(a.protocol[key], b.protocol[key], rtol=1e-6)


def test_stream_progress_never_goes_back_and_slabs_come_in_order(saved_model, volume):
    """The network runs a slab ahead of the outputs (a worker thread): progress still only
    grows, ends at the total, and the slabs come out in order with their own HU."""
    from EPDSegmentationLib.core.inference import slab_predictor
    from EPDSegmentationLib.core.stream import Accumulator, stream_slabs

    model, card = saved_model
    predict = slab_predictor(volume, (0.8, 0.8), model, card, device="cpu", batch_size=1)
    seen, acc = [], Accumulator()
    slabs = list(stream_slabs(volume, [4, 0, 1, 3], predict, slab_slices=2, accumulator=acc,
                              progress=lambda d, t: seen.append((d, t))))
    # the last slab is cut to a quarter slab at most (one slice here): the tail nothing
    # overlaps
    assert [s.slices for s in slabs] == [[0, 1], [3], [4]] and acc.slices == [0, 1, 3, 4]
    assert seen == sorted(seen) and len(set(seen)) == len(seen) and seen[-1] == (4, 4)
    whole = predict_volume(volume, (0.8, 0.8), model, card, device="cpu", slices=[0, 1, 3, 4])
    for slab in slabs:
        np.testing.assert_array_equal(slab.hu, volume[slab.slices])
        idx = [whole.slices.index(k) for k in slab.slices]
        np.testing.assert_array_equal(slab.labels, np.argmax(whole.probabilities[:, idx], 0))


def test_fractional_codes_equal_on_every_path():
    """The 8-bit codes: core.fractional's (the files' and the Slicer nodes'), the CPU
    stream's (into a classes-fastest view) and torch's (GPUs) agree value for value with
    round(216 p - 108) of p clipped to 0..1 first (float32, half to even), on steps' halves
    and on values just outside 0..1 (within the range check's tolerance)."""
    from EPDSegmentationLib.core.fractional import decode_fractional, encode_fractional
    from EPDSegmentationLib.core.stream import encode_fractional_numpy, encode_fractional_torch
    from EPDSegmentationLib.mrml.segmentation import encode_fractional as mrml_encode

    rng = np.random.default_rng(3)
    p = np.concatenate([rng.random(4000), (np.arange(433) / 432.0), [-1e-3, -1e-9, 1 + 1e-9,
                                                                    1 + 1e-3]]).astype(np.float32)
    want = np.rint(np.clip(p, 0, 1) * np.float32(216) - np.float32(108)).astype(np.int8)
    got = encode_fractional(p)
    np.testing.assert_array_equal(got, want)
    assert set(np.unique(want)) == set(range(-108, 109))
    assert mrml_encode is encode_fractional
    np.testing.assert_array_equal(encode_fractional_torch(torch.from_numpy(p)).numpy(), want)
    out = np.zeros(p.shape, np.int8)
    encode_fractional_numpy(p, out)
    np.testing.assert_array_equal(out, want)
    planes = p[:4000].reshape(5, 20, 40)
    inter = np.zeros((20, 40, 5), np.int8)
    encode_fractional(planes, np.moveaxis(inter, -1, 0))
    np.testing.assert_array_equal(inter, np.moveaxis(want[:4000].reshape(5, 20, 40), 0, -1))
    assert np.abs(decode_fractional(got) - np.clip(p, 0, 1)).max() <= 0.5 / 216 + 1e-7


def test_slab_outputs_shared_across_workers_equal_one_worker(saved_model, volume):
    """On the CPU a slab's slices are shared out among the output pool's threads: the
    outputs equal those of one thread, the codes laid out as the .seg.nrrd stores them
    (classes fastest), and each pool thread runs torch on one core while the calling
    thread, and threads started later, keep their setting."""
    import threading

    from EPDSegmentationLib.core.inference import slab_predictor
    from EPDSegmentationLib.core.stream import output_pool, slab_outputs

    model, card = saved_model
    predict = slab_predictor(volume, (0.7, 0.7), model, card, device="cpu", batch_size=2)
    ks = [0, 1, 2, 4]
    low, _, _ = predict.deferred(ks)
    hu = volume[ks]
    one = slab_outputs(low, hu, ks, probabilities_out=True, protocol=True, range_checked=True)
    before = torch.get_num_threads()
    with output_pool(3) as (pool, n):
        assert n == 3
        assert {pool.submit(torch.get_num_threads).result() for _ in range(6)} == {1}
        assert torch.get_num_threads() == before
        shared = slab_outputs(low, hu, ks, probabilities_out=True, protocol=True,
                              range_checked=True, pool=pool, workers=n)
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [before]
    np.testing.assert_array_equal(shared.labels, one.labels)
    np.testing.assert_array_equal(shared.codes, one.codes)
    np.testing.assert_array_equal(shared.probabilities, one.probabilities)
    np.testing.assert_array_equal(shared.uncertainty, one.uncertainty)
    for key in one.sums:
        np.testing.assert_array_equal(shared.sums[key], one.sums[key])
    for key in one.protocol:
        np.testing.assert_array_equal(shared.protocol[key], one.protocol[key])
    assert shared.codes.shape == (len(card["classes"]) - 1, len(ks)) + volume.shape[1:]
    assert np.moveaxis(shared.codes, 0, -1).flags.c_contiguous


def test_gpu_kernels_give_the_cpu_outputs(saved_model, volume):
    """slab_outputs with torch's kernels (what a GPU runs; here on the CPU) gives the
    outputs of NumPy's: the same labels and codes, the sums and uncertainty to float
    rounding."""
    from EPDSegmentationLib.core.inference import slab_predictor
    from EPDSegmentationLib.core.stream import slab_outputs

    model, card = saved_model
    predict = slab_predictor(volume, (0.7, 0.7), model, card, device="cpu", batch_size=2)
    ks = [0, 1, 3]
    low, _, _ = predict.deferred(ks)
    hu = volume[ks]
    cpu = slab_outputs(low, hu, ks, probabilities_out=True, protocol=True, range_checked=True)
    gpu = slab_outputs(low, hu, ks, probabilities_out=True, protocol=True, range_checked=True,
                       kernels="torch")
    np.testing.assert_array_equal(gpu.labels, cpu.labels)
    np.testing.assert_array_equal(gpu.codes, cpu.codes)
    np.testing.assert_array_equal(gpu.probabilities, cpu.probabilities)
    np.testing.assert_allclose(gpu.uncertainty, cpu.uncertainty, rtol=1e-5)
    for key in cpu.sums:
        np.testing.assert_allclose(gpu.sums[key], cpu.sums[key], rtol=1e-6, atol=1e-6)
    for key in cpu.protocol:
        np.testing.assert_allclose(gpu.protocol[key], cpu.protocol[key], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="kernels"):
        slab_outputs(low, hu, ks, kernels="cuda")
