"""Training data: phantom and manifest sources, the source grid, augmentation, model inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from EPDSegmentationLib.core.epd import downsample_pair
from EPDSegmentationLib.core.windowing import DEFAULT_WINDOWS, window_channels
from training.data import (AIR_HU, Augment, SliceDataset, SliceRecord, manifest_records,
                           median_pixel_mm, model_inputs, phantom_records, to_source_grid)


@pytest.fixture(scope="module")
def phantom():
    return phantom_records(3, 2, size=32, seed=0, val_fraction=0.34)


def test_phantom_records_split_by_subject(phantom):
    assert len(phantom["train"]) == 4 and len(phantom["val"]) == 2
    train_subjects = {r.subject for r in phantom["train"]}
    assert not train_subjects & {r.subject for r in phantom["val"]}
    r = phantom["train"][0]
    assert r.hu.shape == r.labels.shape == (32, 32)
    assert r.hu.dtype == np.float32 and r.labels.dtype == np.uint8
    assert r.pixel_mm[0] == r.pixel_mm[1] > 0


def test_phantom_records_are_the_written_dataset(tmp_path, phantom):
    """The in-memory phantom is what write_dataset puts on disk (same subjects and split)."""
    from training.phantom import write_dataset

    manifest = write_dataset(tmp_path, 3, 2, seed=0, size=32, val_fraction=0.34, progress=False)
    disk = manifest_records(manifest, ("train", "val"))
    for split in ("train", "val"):
        assert len(disk[split]) == len(phantom[split])
        for a, b in zip(sorted(disk[split], key=lambda r: r.subject), phantom[split]):
            assert np.array_equal(a.labels, b.labels)
            # the NRRD stores int16 HU
            assert np.allclose(a.hu, b.hu, atol=0.51)
            assert a.pixel_mm == pytest.approx(b.pixel_mm)


def test_kidney_contact_records_are_the_written_dataset(tmp_path):
    """With the torso anatomy and kidney_contact, the in-memory phantom is still what
    write_dataset(..., kidney_contact=...) writes (the card's "same_as" says so), and it
    differs from the phantom without it."""
    from training.phantom import write_dataset

    kw = dict(levels=("L1", "L2"), kidney_contact=1.0)
    manifest = write_dataset(tmp_path, 2, 1, seed=0, size=64, val_fraction=0.5,
                             progress=False, **kw)
    disk = manifest_records(manifest, ("train", "val"))
    mem = phantom_records(2, 1, 64, 0, 0.5, **kw)
    plain = phantom_records(2, 1, 64, 0, 0.5, levels=("L1", "L2"))
    for split in ("train", "val"):
        for a, b, c in zip(sorted(disk[split], key=lambda r: r.subject), mem[split],
                           plain[split]):
            assert np.array_equal(a.labels, b.labels) and np.allclose(a.hu, b.hu, atol=0.51)
            assert not np.array_equal(b.labels, c.labels)
    with pytest.raises(ValueError, match="torso anatomy"):
        write_dataset(tmp_path / "x", 2, 1, size=32, progress=False, kidney_contact=0.5)


def test_source_grid_resamples_to_one_spacing_and_pads_with_air():
    hu = np.full((40, 40), 50.0, np.float32)
    lab = np.ones((40, 40), np.uint8)
    recs = [SliceRecord(hu, lab, (1.0, 1.0), "a", "a"),
            SliceRecord(hu[:20, :20].copy(), lab[:20, :20].copy(), (1.0, 1.0), "b", "b")]
    out_hu, out_lab, size = to_source_grid(recs, 2.0)
    assert size == (20, 20)            # 40 px at 1 mm -> 20 px at 2 mm
    assert np.allclose(out_hu[0], 50.0) and np.all(out_lab[0] == 1)
    # the 20 x 20 slice is 10 x 10 at 2 mm, centred and padded with air / background
    assert np.all(out_lab[1, 5:15, 5:15] == 1) and out_lab[1].sum() == 100
    assert out_hu[1, 0, 0] == AIR_HU
    assert median_pixel_mm(recs) == 1.0
    _, _, fixed = to_source_grid(recs, 2.0, (16, 24))
    assert fixed == (16, 24)


def test_tissue_codes_are_placed_as_the_labels_and_only_phantoms_have_them(phantom):
    """The phantom's tissue codes (which organ a pixel is) land on the source grid where its
    labels do: their classes agree with the labels but for partial-volume edge pixels (a
    code is the pixel's centre subpixel, a label its majority); a real scan has none."""
    from training.data import tissues_on_grid
    from training.phantom.tissues import CLASS_OF

    recs = phantom["train"]
    assert all(r.tissues is not None and r.tissues.shape == r.labels.shape for r in recs)
    mm = median_pixel_mm(recs)
    _, lab, size = to_source_grid(recs, mm)
    tissues = tissues_on_grid(recs, mm, size)
    assert tissues.shape == lab.shape and tissues.dtype == np.uint8
    agree = (CLASS_OF[tissues] == lab).mean()
    assert agree > 0.93         # 32 x 32 slices: many pixels are edges
    # a record without codes (a real scan) gives none for the set
    plain = SliceRecord(recs[0].hu, recs[0].labels, recs[0].pixel_mm, "x", "x")
    assert tissues_on_grid(list(recs) + [plain], mm, size) is None
    with pytest.raises(ValueError, match="tissues"):
        SliceDataset(*to_source_grid(recs, mm)[:2], tissues=tissues[:, :-1])


def test_augmentation_depends_only_on_seed_epoch_and_index(phantom):
    hu, lab, _ = to_source_grid(phantom["train"], median_pixel_mm(phantom["train"]))
    ds = SliceDataset(hu, lab, Augment(flip=0.5, crop=1.0, blur=1.0), seed=3)
    first = [ds[i] for i in range(len(ds))]
    again = SliceDataset(hu, lab, Augment(flip=0.5, crop=1.0, blur=1.0), seed=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, (again[i] for i in range(len(ds)))))
    ds.set_epoch(1)
    assert not all(torch.equal(first[i][0], ds[i][0]) for i in range(len(ds)))
    # labels stay labels, shapes stay
    h, lab1 = ds[0]
    assert h.shape == lab1.shape == hu.shape[1:] and lab1.dtype == torch.uint8
    assert int(lab1.max()) <= 5
    plain = SliceDataset(hu, lab)
    assert torch.equal(plain[1][0], torch.from_numpy(hu[1]))


def test_flip_mirrors_image_and_labels_together():
    hu = np.arange(12, dtype=np.float32).reshape(3, 4)
    lab = (np.arange(12).reshape(3, 4) % 6).astype(np.uint8)
    aug = Augment(flip=1.0, crop=0.0, blur=0.0)
    h, l = aug(hu, lab, np.random.default_rng(0))
    assert np.array_equal(h, hu[:, ::-1]) and np.array_equal(l, lab[:, ::-1])


@pytest.mark.parametrize("label_mode, image_mode", [("epd", "average"), ("nearest", "bilinear")])
def test_model_inputs_window_then_downsample(label_mode, image_mode):
    rng = np.random.default_rng(0)
    hu = rng.normal(-50, 200, (2, 12, 10)).astype(np.float32)
    lab = rng.integers(0, 6, (2, 12, 10)).astype(np.uint8)
    x, q = model_inputs(torch.from_numpy(hu), torch.from_numpy(lab), factor=2,
                        label_mode=label_mode, image_mode=image_mode, windows=DEFAULT_WINDOWS)
    ex, eq = downsample_pair(window_channels(hu, DEFAULT_WINDOWS), lab, 6, 2,
                             label_mode=label_mode, image_mode=image_mode)
    assert x.shape == (2, 3, 6, 5) and q.shape == (2, 6, 6, 5)
    assert np.allclose(x.numpy(), ex, atol=1e-6) and np.allclose(q.numpy(), eq, atol=1e-6)


def test_lowres_blurs_the_image_like_coarser_pixels_and_leaves_the_rest():
    """lowres shrinks and re-enlarges the HU (pixel-scale noise goes, the mean stays, labels
    stay); switching it on changes no other augmentation's random choices."""
    rng = np.random.default_rng(1)
    h0 = rng.normal(40.0, 15.0, (64, 64)).astype(np.float32)
    l0 = rng.integers(0, 6, (64, 64)).astype(np.uint8)
    off = Augment(flip=0.5, crop=0.5, blur=0.0)
    on = Augment(flip=0.5, crop=0.5, blur=0.0, lowres=1.0, lowres_factor=(3.0, 3.0))
    a_h, a_l = off(h0, l0, np.random.default_rng(7))
    b_h, b_l = on(h0, l0, np.random.default_rng(7))
    assert np.array_equal(a_l, b_l)  # same flip and crop, labels untouched
    detail = lambda x: np.abs(np.diff(x, axis=1)).mean()  # noqa: E731
    assert detail(b_h) < 0.5 * detail(a_h)
    assert abs(float(b_h.mean()) - float(a_h.mean())) < 0.02 * float(np.abs(a_h).mean())
    assert b_h.shape == a_h.shape and b_h.dtype == np.float32


def test_tissue_hu_shifts_muscle_and_organs_only():
    """tissue_hu moves the HU of muscle pixels and of soft-tissue organ pixels by one offset
    each; fat, bone and air keep theirs; the other augmentations' choices are unchanged."""
    hu = np.array([[40.0, 60.0, -100.0, 700.0, -1000.0, 45.0]], np.float32)
    lab = np.array([[1, 5, 3, 5, 0, 1]], np.uint8)  # MUS, organ, SAT, bone, air, MUS
    off = Augment(flip=0.0, crop=0.0, blur=0.0)
    on = Augment(flip=0.0, crop=0.0, blur=0.0, tissue_hu=1.0, muscle_shift_hu=(-20.0, -20.0),
                 organ_shift_hu=(15.0, 15.0))
    a, la = off(hu, lab, np.random.default_rng(3))
    b, lb = on(hu, lab, np.random.default_rng(3))
    assert np.array_equal(a, hu) and np.array_equal(la, lb)
    assert np.allclose(b - a, [[-20.0, 15.0, 0.0, 0.0, 0.0, -20.0]])


def test_manifest_slices_come_in_the_network_orientation(tmp_path):
    """A case stored in RAS+ order (rows posterior -> anterior, columns left -> right, as
    NIfTI from TotalSegmentator) is read as the radiological view that inference gives the
    network (core/orientation.py): the same slices as the phantom-ordered original."""
    from EPDSegmentationLib.core.volume import Volume
    from EPDSegmentationLib.io import read_labels, read_manifest, read_volume
    from EPDSegmentationLib.io.images import write_volume
    from EPDSegmentationLib.io.manifest import write_manifest
    from training.phantom import write_dataset

    manifest = write_dataset(tmp_path / "orig", 2, 2, seed=0, size=32, val_fraction=0.5,
                             progress=False)
    rows = []
    for i, row in enumerate(read_manifest(manifest)):
        vol = read_volume(row["image"])
        lab = read_labels(row["label"], like=vol)
        ras = np.diag([1.0, 1.0, 1.0, 1.0])
        ras[:3, :3] = np.diag(vol.spacing)
        img = write_volume(Volume(vol.array[:, ::-1, ::-1].copy(), ras), tmp_path / f"c{i}.nii.gz")
        seg = write_volume(Volume(lab.array[:, ::-1, ::-1].copy(), ras.copy()),
                           tmp_path / f"c{i}-label.nii.gz")
        rows.append(dict(row, image=img, label=seg))
    flipped = manifest_records(write_manifest(rows, tmp_path / "ras.csv"), ("train", "val"))
    orig = manifest_records(manifest, ("train", "val"))
    for split in ("train", "val"):
        assert len(flipped[split]) == len(orig[split]) > 0
        for a, b in zip(flipped[split], orig[split]):
            assert np.array_equal(a.labels, b.labels)
            assert np.allclose(a.hu, b.hu, atol=0.51)
