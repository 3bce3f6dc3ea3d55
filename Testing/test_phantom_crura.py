"""crura_front (training.phantom.torso.draw_aorta_and_crura): the diaphragm crura drawn from
the front of the upper lumbar vertebral bodies, beside the aorta, not from the bodies'
sides where the real psoas lies; 0 is the phantom as before."""

from __future__ import annotations

import numpy as np
import pytest

from training.phantom.anatomy import subject_from_seed
from training.phantom.generate import make_slice
from training.phantom.raster import Canvas
from training.phantom.tissues import CODE
from training.phantom.torso import draw_torso, has_crura_front, level_centre


def _crus_pixels(seed: int, level: str, share: float):
    """(x, y) mm of the diaphragm pixels within 45 mm of the vertebral body's centre, and
    the geometry, of subject ``seed`` at the middle of ``level``."""
    s = subject_from_seed(seed)
    cv = Canvas(384, s.fov_mm)
    g = draw_torso(cv, s, level_centre(s, level), crura_front=share)
    xs = cv.centres_mm() - cv.shift[0]
    ys = cv.centres_mm() - cv.shift[1]
    rows, cols = np.nonzero(cv.codes == CODE["diaphragm"])
    x, y = xs[cols], ys[rows]
    near = np.hypot(x, y - g.y_vb) < 45.0
    return x[near], y[near], g


@pytest.mark.parametrize("seed", [3, 11])
def test_crura_leave_the_side_of_the_vertebral_body(seed):
    """At L2 the default crus lies beside the body, behind its front (the psoas' place);
    with crura_front=1 nothing of it lies there, and it lies nearer the midline."""
    for level in ("L1", "L2"):
        x0, y0, g = _crus_pixels(seed, level, 0.0)
        x1, y1, _ = _crus_pixels(seed, level, 1.0)
        assert x0.size > 0 and x1.size > 0
        front = g.y_vb - g.vb_ry * g.vb_size
        half = g.vb_rx * g.vb_size
        beside = lambda x, y: (np.abs(x) > 0.8 * half) & (y > front + 3.0)  # noqa: E731
        if level == "L2":
            assert beside(x0, y0).sum() > 5
        assert beside(x1, y1).sum() == 0
        assert np.abs(x1).mean() < np.abs(x0).mean()


def test_zero_is_the_phantom_as_before_and_the_share_is_drawn_per_subject():
    from training.data import phantom_records

    base = make_slice(3, anatomy="torso", level="L2", size=64, supersample=2)
    same = make_slice(3, anatomy="torso", level="L2", size=64, supersample=2, crura_front=0.0)
    assert np.array_equal(base.hu, same.hu) and np.array_equal(base.tissues, same.tissues)
    moved = make_slice(3, anatomy="torso", level="L2", size=64, supersample=2, crura_front=1.0)
    assert not np.array_equal(base.tissues, moved.tissues)
    share = np.mean([has_crura_front(subject_from_seed(s), 0.5) for s in range(200)])
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError, match="0..1"):
        has_crura_front(subject_from_seed(3), 1.5)
    with pytest.raises(ValueError, match="torso"):
        phantom_records(1, 1, size=64, crura_front=0.5)


def test_write_dataset_checks_every_option_alike(tmp_path):
    """write_dataset refuses a torso-only option without levels (psoas_apart included, which
    it once let pass) and a share outside 0..1, as phantom_records does, before writing."""
    from training.phantom.dataset import write_dataset

    for kw, match in (({"crura_front": 1.0}, "torso"), ({"psoas_apart": 0.5}, "torso"),
                      ({"flank_sat": 2.0}, "0..1")):
        with pytest.raises(ValueError, match=match):
            write_dataset(tmp_path / "d", 1, 1, size=32, **kw)
    assert not (tmp_path / "d").exists()
