"""io.deflate: the gzip backend of the streamed readers and writers (ISA-L, or zlib where
it is missing, as it may be inside Slicer) writes and reads standard gzip, so files are the
same to every reader whichever backend made them."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from EPDSegmentationLib.io import deflate

BACKENDS = ["zlib", "isal"]


def _available(name):
    try:
        deflate.backend(name)
    except ValueError:
        pytest.skip(f"gzip backend {name} is not installed")


@pytest.fixture(scope="module")
def data():
    """Label-map-like bytes: long runs with noisy stretches (what the outputs hold)."""
    rng = np.random.default_rng(0)
    a = np.zeros((8, 64, 80), np.int8) - 108
    a[:, 10:50, 20:70] = rng.integers(-108, 109, (8, 40, 50))
    return a.tobytes()


@pytest.mark.parametrize("name", BACKENDS)
def test_compressor_writes_standard_gzip(name, data):
    _available(name)
    z = deflate.compressor(name)
    stream = z.compress(data[:1000]) + z.compress(data[1000:]) + z.flush()
    assert stream[:2] == b"\x1f\x8b"
    assert gzip.decompress(stream) == data
    assert len(stream) < len(data) / 2


@pytest.mark.parametrize("name", BACKENDS)
def test_reader_reads_any_gzip_and_refuses_corrupt_data(name, data, tmp_path):
    _available(name)
    path = tmp_path / "x.gz"
    path.write_bytes(b"HEAD" + gzip.compress(data, 6))
    with open(path, "rb") as raw:
        raw.seek(4)
        fh = deflate.reader(raw, name)
        fh.seek(1000)
        assert fh.read(5000) == data[1000:6000]
        assert fh.read() == data[6000:]
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 20)
    with open(path, "rb") as raw, pytest.raises((OSError, EOFError) + deflate.ERRORS):
        deflate.reader(raw, name).read()


def test_backend_choice():
    assert deflate.backend() in BACKENDS
    with pytest.raises(ValueError, match="unknown gzip backend"):
        deflate.backend("lzma")


@pytest.mark.parametrize("name", BACKENDS)
def test_streamed_nrrd_reads_back_alike_with_either_backend(name, tmp_path):
    """The same slices through nrrd_slices with each backend: pynrrd reads them back equal,
    and open_volume (the streamed reader, on the default backend) too."""
    import nrrd

    from EPDSegmentationLib.io.nrrd_stream import nrrd_slices
    from EPDSegmentationLib.io.sources import open_volume

    _available(name)
    arr = np.random.default_rng(1).integers(-1024, 1500, (6, 20, 24)).astype(np.int16)
    fields = {"space": "left-posterior-superior", "space origin": [0.0, 0.0, 0.0],
              "space directions": np.diag([0.7, 0.8, 2.0]), "kinds": ["domain"] * 3}
    path = tmp_path / f"{name}.nrrd"
    with nrrd_slices(path, arr.shape, np.int16, fields, gzip_backend=name) as out:
        out.write(arr[:2])
        out.fill(1, 7)
        out.write(arr[3:])
    want = arr.copy()
    want[2] = 7
    got, header = nrrd.read(str(path), index_order="C")
    assert header["encoding"] == "gzip"
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(open_volume(path)[list(range(6))], want.astype(np.float32))


def test_without_isal_zlib_serves(monkeypatch, tmp_path):
    """Where isal is missing (Slicer's Python unless installed) the default is zlib, and
    the streamed reader still reads gzip data."""
    from EPDSegmentationLib.core.volume import Volume, ijk_to_ras_matrix
    from EPDSegmentationLib.io import write_volume
    from EPDSegmentationLib.io.sources import open_volume

    monkeypatch.setattr(deflate, "_isal_zlib", None)
    monkeypatch.setattr(deflate, "_igzip", None)
    assert deflate.backend() == "zlib"
    with pytest.raises(ValueError, match="not installed"):
        deflate.backend("isal")
    arr = np.random.default_rng(2).integers(-1000, 1000, (5, 16, 18)).astype(np.float32)
    path = write_volume(Volume(arr, ijk_to_ras_matrix((0.8, 0.8, 2.0), (0.0, 0.0, 0.0))), tmp_path / "ct.nii.gz",
                        dtype="int16")
    np.testing.assert_array_equal(open_volume(path)[list(range(5))], arr)
