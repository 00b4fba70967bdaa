"""Bad bytes on disk must give a DataError that names the file: never another exception."""
import io
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, strategies as st

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from unet_np.data.io import DataError, read_image, read_mask  # noqa: E402


def _valid_png():
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _valid_png()
FULL = np.moveaxis(np.array(Image.open(io.BytesIO(PNG))), -1, 0) / np.float32(255.0)
SUFFIXES = [".png", ".jpg", ".bmp", ".gif", ".jpeg"]


def _try(reader, data, suffix):
    """Write data to a fresh file, read it; return the array or the DataError."""
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="fuzz_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return reader(path)
        except DataError as e:
            assert os.path.basename(path) in str(e), str(e)
            assert e.path == path
            return e
    finally:
        os.unlink(path)


@given(st.binary(max_size=600), st.sampled_from(SUFFIXES))
def test_random_bytes(data, suffix):
    for reader in (read_image, read_mask):
        out = _try(reader, data, suffix)
        assert isinstance(out, (DataError, np.ndarray))


@given(st.binary(max_size=300), st.sampled_from(SUFFIXES))
def test_random_bytes_behind_a_png_signature(data, suffix):
    out = _try(read_image, PNG[:8] + data, suffix)
    assert isinstance(out, (DataError, np.ndarray))


@given(st.integers(0, len(PNG) - 1))
def test_truncated_png(n):
    out = _try(read_image, PNG[:n], ".png")
    if isinstance(out, np.ndarray):
        # Pillow stops once it has every pixel, so a cut near the end (in the last CRC or the
        # IEND chunk) goes unnoticed; the pixels must then be the right ones
        assert n > len(PNG) // 2
        np.testing.assert_array_equal(out, FULL)
    out = _try(read_mask, PNG[:n], ".png")
    assert isinstance(out, DataError)  # a colour image is no mask, and truncated data neither


@given(st.integers(8, len(PNG) - 1), st.integers(1, 255))
def test_corrupted_png_byte(pos, flip):
    data = bytearray(PNG)
    data[pos] ^= flip
    out = _try(read_image, bytes(data), ".png")
    assert isinstance(out, (DataError, np.ndarray))


def test_truncated_in_the_middle_is_an_error():
    out = _try(read_image, PNG[: len(PNG) // 2], ".png")
    assert isinstance(out, DataError) and "cannot read image" in str(out)


# Fuzzed instance label images: non-contiguous ids, id 0 only, 65535; written as 16-bit PNG / TIFF
# and read back exactly (read_labels), and as masks (read_mask_info) without losing an id.
from hypothesis import settings  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from unet_np.data.io import read_labels, read_mask_info, write_labels  # noqa: E402

IDS = st.one_of(st.just(0), st.just(65535), st.integers(1, 65535), st.sampled_from([1, 2, 7, 300]))
LABELS = hnp.arrays(np.int64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                    elements=IDS)


@settings(max_examples=40, deadline=None)
@given(LABELS, st.sampled_from([".png", ".tif"]))
def test_fuzzed_label_images_round_trip(lab, suffix):
    if suffix == ".tif":
        pytest.importorskip("tifffile")
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="fuzz_lab_")
    os.close(fd)
    try:
        write_labels(path, lab)
        assert np.array_equal(read_labels(path), lab)
        vals = set(np.unique(lab).tolist()) - {0}
        try:
            m, conv, _ = read_mask_info(path)
        except DataError as e:              # only a 0/65535 mask with a few stray values
            assert 65535 in vals and "unexpected mask values" in str(e)
            assert 2 * np.count_nonzero(lab == 65535) >= np.count_nonzero(lab)
            return
        if not vals:
            assert conv == "empty" and not m.any()
        elif vals == {65535}:
            assert conv == "binary255" and np.array_equal(m, lab > 0)
        else:
            assert np.array_equal(m, lab), conv   # every id kept, 65535 among them
    finally:
        os.unlink(path)


def test_label_image_of_id_zero_only(tmp_path):
    path = write_labels(tmp_path / "zero.png", np.zeros((5, 6), np.int64))
    assert not read_labels(path).any() and read_mask_info(path)[1] == "empty"
