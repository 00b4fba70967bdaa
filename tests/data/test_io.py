import struct
import sys
import types
import zlib

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from unet_np.data import io as dio  # noqa: E402
from unet_np.data import (DataError, SegmentationDataset, batches, find_pairs,  # noqa: E402
                          load_folder, match_files, normalize_image, read_image, read_mask,
                          read_mask_info, write_image, write_mask)


def save(path, arr, mode=None):
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    im.save(path)
    return path


def touch_images(folder, names, size=(4, 5)):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        save(folder / n, np.zeros(size, np.uint8))


# ------------------------------------------------------------------------------- matching

def test_find_pairs_tolerates_suffixes(tmp_path):
    touch_images(tmp_path / "img", ["a.png", "b.png", "c.jpg", "D.png", "e.bmp", "f.tif"])
    touch_images(tmp_path / "msk", ["a_mask.png", "b-label.png", "c_gt.png", "d_seg.png",
                                    "e.png", "f-mask.png"])
    (tmp_path / "msk" / "notes.txt").write_text("not an image")
    pairs = find_pairs(tmp_path / "img", tmp_path / "msk")
    got = [(i.name, m.name) for i, m in pairs]
    assert got == [("a.png", "a_mask.png"), ("b.png", "b-label.png"), ("c.jpg", "c_gt.png"),
                   ("D.png", "d_seg.png"), ("e.bmp", "e.png"), ("f.tif", "f-mask.png")]


def test_find_pairs_reports_unmatched_by_name(tmp_path):
    touch_images(tmp_path / "img", ["a.png", "lonely.png"])
    touch_images(tmp_path / "msk", ["a_mask.png", "lonley_mask.png"])
    with pytest.raises(DataError) as e:
        find_pairs(tmp_path / "img", tmp_path / "msk")
    assert "lonely.png" in str(e.value) and "lonley_mask.png" in str(e.value)
    rep = match_files(tmp_path / "img", tmp_path / "msk")
    assert [p.name for p in rep.unmatched_images] == ["lonely.png"]
    assert [p.name for p in rep.unmatched_masks] == ["lonley_mask.png"]


def test_find_pairs_ambiguous_and_same_folder(tmp_path):
    touch_images(tmp_path / "img", ["a.png", "a.jpg"])
    touch_images(tmp_path / "msk", ["a.png"])
    with pytest.raises(DataError, match="a.jpg"):
        find_pairs(tmp_path / "img", tmp_path / "msk")
    touch_images(tmp_path / "both", ["x.png", "x_mask.png", "y.png", "y_label.png"])
    pairs = find_pairs(tmp_path / "both", tmp_path / "both")
    assert [(i.name, m.name) for i, m in pairs] == [("x.png", "x_mask.png"),
                                                     ("y.png", "y_label.png")]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_folder(tmp_path / "nowhere", tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_folder(tmp_path / "empty", tmp_path / "masks")
    with pytest.raises(DataError, match="nomasks"):
        find_pairs(tmp_path / "empty", tmp_path / "nomasks")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        find_pairs(tmp_path / "file.png", tmp_path / "masks")


# ------------------------------------------------------------------------------- images

def test_read_image_modes(tmp_path):
    rng = np.random.default_rng(0)
    g8 = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (5, 7)).astype(np.uint16)
    cases = {
        "g8.png": (g8, None, g8[None] / 255.0),
        "rgb.png": (rgb, None, np.moveaxis(rgb, -1, 0) / 255.0),
        "rgba.png": (rgba, None, np.moveaxis(rgba, -1, 0) / 255.0),
        "g16.png": (g16, None, g16[None] / 65535.0),
        "rgb.bmp": (rgb, None, np.moveaxis(rgb, -1, 0) / 255.0),
        "la.png": (np.stack([g8, g8[::-1]], -1), None, np.stack([g8, g8[::-1]]) / 255.0),
        "bw.png": (g8 > 128, None, (g8 > 128)[None].astype(float)),
    }
    for name, (arr, mode, want) in cases.items():
        x = read_image(save(tmp_path / name, arr, mode))
        assert x.dtype == np.float32 and x.shape == want.shape, name
        np.testing.assert_allclose(x, want, atol=1e-6, err_msg=name)
    # indexed colour: read as its colours
    pal_im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal_im.save(tmp_path / "p.png")
    x = read_image(tmp_path / "p.png")
    np.testing.assert_allclose(x, np.moveaxis(np.array(pal_im.convert("RGB")), -1, 0) / 255.0,
                               atol=1e-6)
    # JPEG is lossy: only roughly equal
    save(tmp_path / "j.jpg", rgb)
    assert read_image(tmp_path / "j.jpg").shape == (3, 5, 7)


def _png_chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def test_zero_size_and_bad_files(tmp_path):
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 0, 0, 0, 0))
           + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""))
    (tmp_path / "zero.png").write_bytes(png)
    with pytest.raises(DataError, match="zero.png"):
        read_image(tmp_path / "zero.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(DataError, match="text.png"):
        read_image(tmp_path / "text.png")
    with pytest.raises(DataError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    Image.new("CMYK", (3, 2), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert read_image(tmp_path / "cmyk.jpg").shape == (3, 2, 3)


def test_tiff_without_tifffile_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile -> ImportError
    (tmp_path / "a.tif").write_bytes(b"II*\x00")
    for reader in (read_image, read_mask):
        with pytest.raises(DataError) as e:
            reader(tmp_path / "a.tif")
        assert "pip install tifffile" in str(e.value) and "a.tif" in str(e.value)


def _fake_tifffile(arr, axes):
    class Series:
        def __init__(self):
            self.axes = axes

        def asarray(self):
            if arr is None:
                raise RuntimeError("corrupt TIFF")
            return arr

    class TiffFile:
        def __init__(self, path):
            self.series = [Series()]

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    return types.SimpleNamespace(TiffFile=TiffFile)


def test_tiff_through_tifffile(tmp_path, monkeypatch):
    p = tmp_path / "a.tiff"
    p.write_bytes(b"")
    rgb16 = np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3) * 1000
    monkeypatch.setitem(sys.modules, "tifffile", _fake_tifffile(rgb16, "YXS"))
    np.testing.assert_allclose(read_image(p), np.moveaxis(rgb16, -1, 0) / 65535.0, atol=1e-7)
    chans = np.random.default_rng(0).random((6, 4, 5)).astype(np.float32)
    monkeypatch.setitem(sys.modules, "tifffile", _fake_tifffile(chans, "CYX"))
    np.testing.assert_array_equal(read_image(p), chans)
    monkeypatch.setitem(sys.modules, "tifffile", _fake_tifffile(chans, ""))
    np.testing.assert_array_equal(read_image(p), chans)
    monkeypatch.setitem(sys.modules, "tifffile", _fake_tifffile(np.zeros((0, 5), np.uint8), "YX"))
    with pytest.raises(DataError, match="zero-size"):
        read_image(p)
    monkeypatch.setitem(sys.modules, "tifffile", _fake_tifffile(None, "YX"))
    with pytest.raises(DataError, match="a.tiff"):
        read_image(p)
    labels = np.array([[0, 1, 2], [3, 300, 0]], dtype=np.uint16)
    monkeypatch.setitem(sys.modules, "tifffile", _fake_tifffile(labels, "YX"))
    lab, conv, _ = read_mask_info(p)
    assert conv == "labels" and lab.dtype == np.int64
    np.testing.assert_array_equal(lab, labels)


# ------------------------------------------------------------------------------- masks

def test_mask_conventions(tmp_path):
    m = np.zeros((6, 6), np.uint8)
    m[1:4, 2:5] = 1
    lab, conv, _ = read_mask_info(save(tmp_path / "01.png", m))
    assert conv == "binary01" and lab.dtype == np.int64
    np.testing.assert_array_equal(lab, m)
    lab, conv, _ = read_mask_info(save(tmp_path / "255.png", m * 255))
    assert conv == "binary255"
    np.testing.assert_array_equal(lab, m)
    lab, conv, _ = read_mask_info(save(tmp_path / "bw.png", m.astype(bool)))
    assert conv == "binary255"
    np.testing.assert_array_equal(lab, m)
    labels = (np.arange(36).reshape(6, 6) % 4).astype(np.uint8)
    lab, conv, _ = read_mask_info(save(tmp_path / "lab.png", labels))
    assert conv == "labels"
    np.testing.assert_array_equal(lab, labels)
    lab, conv, _ = read_mask_info(save(tmp_path / "zero.png", np.zeros((3, 3), np.uint8)))
    assert conv == "empty" and not lab.any()
    # grey saved as RGB is still grey
    np.testing.assert_array_equal(read_mask(save(tmp_path / "g.png", np.stack([m * 255] * 3, -1))),
                                  m)
    # 16-bit labels
    l16 = (np.arange(36).reshape(6, 6) * 20).astype(np.uint16)
    np.testing.assert_array_equal(read_mask(save(tmp_path / "l16.png", l16)), l16)


def test_stray_value_in_binary_mask_is_named(tmp_path):
    m = np.zeros((6, 6), np.uint8)
    m[2:4, 2:4] = 255
    m[0, 0] = 128
    with pytest.raises(DataError) as e:
        read_mask(save(tmp_path / "stray.png", m))
    assert "stray.png" in str(e.value) and "128" in str(e.value)


def test_palette_masks(tmp_path):
    idx = (np.arange(30).reshape(5, 6) % 3).astype(np.uint8)
    im = Image.fromarray(idx).convert("P")
    pal = [0, 0, 0, 255, 0, 0, 0, 255, 0]
    im.putpalette(pal + [0] * (768 - len(pal)))
    im.save(tmp_path / "p.png")
    lab, conv, fpal = read_mask_info(tmp_path / "p.png")
    assert conv == "palette" and fpal[:3] == [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    np.testing.assert_array_equal(lab, idx)
    # RGB colour masks through a palette given by the user; an indexed PNG is then read by colour
    colours = [(0, 0, 0), (0, 255, 0), (255, 0, 0)]  # note: a different order from the file's
    rgb = np.array(colours, np.uint8)[idx]
    lab, conv, _ = read_mask_info(save(tmp_path / "c.png", rgb), palette=colours)
    assert conv == "rgb"
    np.testing.assert_array_equal(lab, idx)
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png", palette=colours),
                                  np.array([0, 2, 1])[idx])
    np.testing.assert_array_equal(read_mask(tmp_path / "c.png", palette={(0, 0, 0): 0,
                                                                          (0, 255, 0): 5,
                                                                          (255, 0, 0): 2}),
                                  np.array([0, 5, 2])[idx])
    rgb[1, 1] = (12, 34, 56)
    save(tmp_path / "odd.png", rgb)
    with pytest.raises(DataError) as e:
        read_mask(tmp_path / "odd.png", palette=colours)
    assert "odd.png" in str(e.value) and "(12, 34, 56)" in str(e.value)
    with pytest.raises(DataError, match="palette="):
        read_mask(tmp_path / "odd.png")


@pytest.mark.parametrize("convention", ["binary255", "binary01", "labels", "palette", "rgb"])
def test_write_mask_round_trip(tmp_path, convention):
    rng = np.random.default_rng(1)
    top = 2 if convention.startswith("binary") else 5
    lab = rng.integers(0, top, (7, 9))
    palette = [(0, 0, 0), (10, 200, 30), (200, 10, 30), (1, 2, 3), (250, 250, 0)]
    p = write_mask(tmp_path / "m.png", lab, convention, palette=palette)
    got, conv, _ = read_mask_info(p, palette=palette if convention == "rgb" else None)
    np.testing.assert_array_equal(got, lab)
    assert conv == convention
    if convention == "binary255":
        assert set(np.unique(np.array(Image.open(p)))) == {0, 255}


def test_write_mask_errors(tmp_path):
    with pytest.raises(ValueError):
        write_mask(tmp_path / "m.png", np.array([[0, 2]]), "binary255")
    with pytest.raises(ValueError):
        write_mask(tmp_path / "m.jpg", np.array([[0, 1]]), "binary255")
    with pytest.raises(ValueError):
        write_mask(tmp_path / "m.png", np.array([[0, 1]]), "nonsense")
    with pytest.raises(ValueError):
        write_mask(tmp_path / "m.png", np.array([[0, -1]]), "labels")
    np.testing.assert_array_equal(
        read_mask(write_mask(tmp_path / "big.png", np.array([[0, 1000]]), "labels")),
        [[0, 1000]])


# ------------------------------------------------------------------------------- load_folder

def make_folder(tmp_path, n=4, size=(8, 10), convention="binary255", seed=0, channels=1):
    rng = np.random.default_rng(seed)
    idir, mdir = tmp_path / "images", tmp_path / "masks"
    masks = []
    for i in range(n):
        img = rng.random((channels,) + size)
        write_image(idir / f"s{i}.png", img)
        m = rng.integers(0, 2 if convention.startswith("binary") else 3, size)
        write_mask(mdir / f"s{i}_mask.png", m, convention)
        masks.append(m)
    return idir, mdir, masks


def test_load_folder_basics(tmp_path):
    idir, mdir, masks = make_folder(tmp_path, channels=3)
    ds = load_folder(idir, mdir)
    assert len(ds) == 4 and ds.names == ["s0", "s1", "s2", "s3"]
    assert ds.num_classes == 2 and ds.in_channels == 3 and ds.mask_convention == "binary255"
    for x, m, want in zip(ds.images, ds.masks, masks):
        assert x.dtype == np.float32 and x.shape == (3, 8, 10)
        np.testing.assert_allclose(x.mean(axis=(1, 2)), 0.0, atol=1e-5)
        np.testing.assert_allclose(x.std(axis=(1, 2)), 1.0, atol=1e-4)
        assert m.dtype == np.int64
        np.testing.assert_array_equal(m, want)
    d = ds.diagnostics()
    assert sum(d["class_pixels"].values()) == 4 * 80
    assert d["class_pixels"][1] == sum(int(m.sum()) for m in masks)
    assert "class 1" in str(d)
    ds2 = load_folder(idir, mdir, normalize="dataset")
    allpix = np.concatenate([x.reshape(3, -1) for x in ds2.images], axis=1)
    np.testing.assert_allclose(allpix.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(allpix.std(axis=1), 1.0, atol=1e-4)
    assert ds2.mean.shape == (3,) and ds2.std.shape == (3,)
    raw = read_image(idir / "s0.png")
    np.testing.assert_allclose(normalize_image(raw, "dataset", ds2.mean, ds2.std), ds2.images[0],
                               atol=1e-6)
    ds3 = load_folder(idir, mdir, normalize=None)
    np.testing.assert_allclose(ds3.images[0], raw)


def test_load_folder_labels_and_palette(tmp_path):
    idir, mdir, _ = make_folder(tmp_path / "a", convention="labels")
    ds = load_folder(idir, mdir)
    assert ds.mask_convention == "labels" and ds.num_classes == 3
    idir, mdir, _ = make_folder(tmp_path / "b", convention="palette")
    ds = load_folder(idir, mdir)
    assert ds.mask_convention == "palette" and ds.palette[:3] == dio.default_palette(3)


def test_load_folder_lists_every_problem(tmp_path):
    idir, mdir, _ = make_folder(tmp_path, n=5)
    save(mdir / "s1_mask.png", np.zeros((3, 3), np.uint8))           # size mismatch
    bad = np.zeros((8, 10), np.uint8)
    bad[0, :3] = (0, 128, 255)
    save(mdir / "s2_mask.png", bad)                                   # stray grey level
    (idir / "s3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")       # corrupt image
    write_image(idir / "orphan.png", np.zeros((1, 8, 10)))             # image without mask
    with pytest.raises(DataError) as e:
        load_folder(idir, mdir)
    msg = str(e.value)
    for name in ("s1_mask.png", "s2_mask.png", "s3.png", "orphan.png", "128"):
        assert name in msg
    ds = load_folder(idir, mdir, strict=False)
    assert ds.names == ["s0", "s4"]
    d = ds.diagnostics()
    assert d["unmatched_images"] == ["orphan.png"]
    assert [r[0] for r in d["size_mismatches"]] == ["s1.png"]
    assert [r[0] for r in d["unexpected_values"]] == ["s2_mask.png"]
    assert [r[0] for r in d["unreadable"]] == ["s3.png"]
    text = str(d)
    assert "orphan.png" in text and "s1.png" in text and "s2_mask.png" in text


def test_load_folder_mixed_conventions_and_channels(tmp_path):
    idir, mdir, _ = make_folder(tmp_path / "a", n=2)
    write_mask(mdir / "s1_mask.png", np.array([[0, 1, 2] * 3 + [0]] * 8), "labels")
    with pytest.raises(DataError, match="mix"):
        load_folder(idir, mdir)
    idir, mdir, _ = make_folder(tmp_path / "b", n=3)
    write_image(idir / "s2.png", np.zeros((3, 8, 10)))
    with pytest.raises(DataError, match="s2.png: image has 3 channels"):
        load_folder(idir, mdir)
    idir, mdir, _ = make_folder(tmp_path / "c", n=2)
    save(mdir / "s0_mask.png", (np.arange(80).reshape(8, 10) % 40 * 3).astype(np.uint8))
    with pytest.raises(DataError, match="max_classes"):
        load_folder(idir, mdir, max_classes=100)


# ------------------------------------------------------------------------------- batches

def test_batches_shapes_order_and_weights():
    rng = np.random.default_rng(0)
    imgs = rng.random((5, 2, 8, 8)).astype(np.float32)
    masks = rng.integers(0, 2, (5, 8, 8))
    ds = SegmentationDataset.from_arrays(imgs, masks, normalize=None)
    out = list(batches(ds, 2, shuffle=False))
    assert [b[0].shape for b in out] == [(2, 2, 8, 8), (2, 2, 8, 8), (1, 2, 8, 8)]
    assert out[0][0].dtype == np.float32 and out[0][1].dtype == np.int64
    np.testing.assert_array_equal(np.concatenate([b[1] for b in out]), masks)
    a = [b[1] for b in batches(ds, 2, rng=3)]
    b = [b[1] for b in batches(ds, 2, rng=3)]
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert len(list(batches(ds, 2, drop_last=True, rng=0))) == 2
    ds.compute_weights()
    x, y, w = next(batches(ds, 5, rng=1))
    assert w.shape == (5, 8, 8) and w.dtype == np.float32
    # every sample appears once per pass
    seen = np.concatenate([b[0] for b in batches((imgs, masks), 2, rng=7)])
    assert sorted(map(bytes, seen)) == sorted(map(bytes, imgs))


def test_batches_crop_to_common_size():
    rng = np.random.default_rng(0)
    imgs = [rng.random((1, h, w)).astype(np.float32) for h, w in [(10, 12), (8, 15), (9, 9)]]
    masks = [(x[0] > 0.5).astype(np.int64) for x in imgs]
    for shuffle in (True, False):
        for x, y in batches((imgs, masks), 3, shuffle=shuffle, rng=0):
            assert x.shape == (3, 1, 8, 9) and y.shape == (3, 8, 9)
            np.testing.assert_array_equal(y, x[:, 0] > 0.5)  # the same window for both
    x, y = next(batches((imgs, masks), 3, shuffle=False, crop=8, multiple_of=4))
    assert x.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(x[0], imgs[0][:, 1:9, 2:10])  # centred
    with pytest.raises(DataError, match="sample 1: image is 8x15"):
        list(batches((imgs, masks), 3, shuffle=False, crop=(10, 10)))


def test_batches_with_augmentation():
    from unet_np.data.augment import elastic, flip_rotate
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 3, (4, 16, 16))
    imgs = masks[:, None].astype(np.float32)
    for x, y in batches((imgs, masks), 2, rng=0, augment=[flip_rotate]):
        np.testing.assert_array_equal(x[:, 0], y)
    for x, y in batches((imgs, masks), 2, rng=0, augment=elastic):
        assert x.shape == (2, 1, 16, 16) and set(np.unique(y)) <= {0, 1, 2}


def test_load_folder_rgb_masks_with_palette(tmp_path):
    colours = [(0, 0, 0), (255, 0, 0), (0, 0, 255), (9, 9, 9)]
    rng = np.random.default_rng(2)
    for i in range(2):
        write_image(tmp_path / "im" / f"a{i}.png", rng.random((3, 6, 7)))
        write_mask(tmp_path / "gt" / f"a{i}_gt.png", rng.integers(0, 3, (6, 7)), "rgb",
                   palette=colours)
    ds = load_folder(tmp_path / "im", tmp_path / "gt", palette=colours)
    assert ds.mask_convention == "rgb" and ds.num_classes == 4 and ds.palette == colours
    ds = load_folder(tmp_path / "im", tmp_path / "gt",
                     palette={(0, 0, 0): 0, (255, 0, 0): 2, (0, 0, 255): 1})
    assert ds.palette == [(0, 0, 0), (0, 0, 255), (255, 0, 0)] and ds.num_classes == 3
    p = write_mask(tmp_path / "out.png", ds.masks[0], ds.mask_convention, ds.palette)
    np.testing.assert_array_equal(read_mask(p, palette=ds.palette), ds.masks[0])


def test_without_pillow_the_error_names_the_fix(tmp_path, monkeypatch):
    p = save(tmp_path / "a.png", np.zeros((3, 3), np.uint8))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match="pip install Pillow") as e:
        read_image(p)
    assert "a.png" in str(e.value)


# ------------------------------------------------------------------------------- 16-bit label images

def _ids_image(rng=None, shape=(30, 40)):
    """A label image holding 0, 1..300, 65535 and random ids up to 65535."""
    rng = rng or np.random.default_rng(0)
    lab = rng.integers(0, 65536, shape).astype(np.int64)
    lab.reshape(-1)[:302] = np.r_[0, np.arange(1, 301), 65535]
    return lab


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_label_images_keep_every_id(tmp_path, suffix):
    if suffix == ".tif":
        pytest.importorskip("tifffile")
    lab = _ids_image()
    path = dio.write_labels(tmp_path / f"lab{suffix}", lab)
    got = dio.read_labels(path)
    assert got.dtype == np.int64 and np.array_equal(got, lab)
    m, conv, _ = read_mask_info(path)           # as a mask: the ids are kept, 65535 among them
    assert conv == "labels" and np.array_equal(m, lab)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_written_by_others(tmp_path, suffix):
    """A 16-bit PNG from Pillow, a 16-bit TIFF from tifffile, with nuclei-like ids 1..300 and 65535."""
    lab = np.zeros((40, 40), np.uint16)
    lab[:20, :15] = np.arange(1, 301).reshape(20, 15)
    lab[30:, 30:] = 65535
    path = tmp_path / f"m{suffix}"
    if suffix == ".png":
        Image.fromarray(lab).save(path)
    else:
        tifffile = pytest.importorskip("tifffile")
        tifffile.imwrite(path, lab)
    assert np.array_equal(read_mask(path), lab) and np.array_equal(dio.read_labels(path), lab)


def test_16bit_binary_with_stray_values_still_refused(tmp_path):
    m = np.zeros((20, 20), np.uint16)
    m[2:18, 2:18] = 65535
    m[2, 2:18] = 30000                       # an anti-aliased edge: 65535 is most of the foreground
    path = tmp_path / "aa.png"
    Image.fromarray(m).save(path)
    with pytest.raises(DataError, match="unexpected mask values"):
        read_mask(path)


def test_read_labels_refuses_what_is_no_label_image(tmp_path):
    save(tmp_path / "rgb.png", np.dstack([np.arange(20, dtype=np.uint8).reshape(4, 5)] * 2 +
                                         [np.zeros((4, 5), np.uint8)]))
    with pytest.raises(DataError, match="rgb.png: an instance label image must be one grayscale"):
        dio.read_labels(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="65535"):
        dio.write_labels(tmp_path / "big.png", np.array([[0, 70000]]))
    with pytest.raises(ValueError, match=".tif, .tiff or .png"):
        dio.write_labels(tmp_path / "x.jpg", np.array([[0, 1]]))


def test_write_labels_is_whole_or_nothing(tmp_path, monkeypatch):
    path = dio.write_labels(tmp_path / "keep.png", np.array([[0, 7]]))
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError):
        dio.write_labels(path, np.array([[0, 9]]))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def _instance_folder(root, n=4, size=40, scale=300):
    from unet_np.data import touching_cells
    x, _, inst = touching_cells(n, size, seed=3, gap=False)
    idir, mdir = root / "images", root / "masks"
    idir.mkdir(parents=True)
    mdir.mkdir(parents=True)
    labs = []
    for i in range(n):
        write_image(idir / f"c{i}.png", x[i])
        lab = np.where(inst[i] > 0, inst[i] * scale + 1, 0)
        dio.write_labels(mdir / f"c{i}.png", lab)
        labs.append(lab)
    return idir, mdir, labs


def test_load_folder_refuses_instance_labels_unless_told(tmp_path):
    idir, mdir, labs = _instance_folder(tmp_path)
    with pytest.raises(DataError) as e:
        load_folder(idir, mdir)
    msg = str(e.value)
    assert "instance label images" in msg and "--instances" in msg and "--classes" in msg
    assert e.value.instance_problem in msg and "\n" not in msg
    ds = load_folder(idir, mdir, instances=True, border=1)
    assert ds.num_classes == 3 and ds.mask_convention == "instances" and ds.instance_border == 1
    from unet_np.data import instance_targets
    for lab, got, t in zip(labs, ds.instances, ds.masks):
        assert np.array_equal(got, lab) and np.array_equal(t, instance_targets(lab, 1))
    d = ds.diagnostics()
    assert d["instances"]["objects"] == sum(len(np.unique(a)) - 1 for a in labs)
    assert "instance label images" in str(d)
    w = ds.compute_weights()                      # the weight map of the true instances
    from unet_np.data import instance_weight_map
    np.testing.assert_allclose(w[0], instance_weight_map(labs[0], targets=ds.masks[0]))
    ds2 = load_folder(idir, mdir, instances=False, max_classes=70000)   # classes, as told
    assert ds2.instances is None and ds2.num_classes == max(int(a.max()) for a in labs) + 1


def test_load_folder_instances_from_binary_masks(tmp_path):
    idir, mdir = tmp_path / "i", tmp_path / "m"
    idir.mkdir()
    mdir.mkdir()
    m = np.zeros((16, 16), np.int64)
    m[1:5, 1:5] = 1
    m[8:14, 8:14] = 1                              # two separate blobs of one value
    write_image(idir / "a.png", np.zeros((1, 16, 16)))
    write_mask(mdir / "a.png", m, "binary255")
    ds = load_folder(idir, mdir, instances=True)
    assert len(np.unique(ds.instances[0])) == 3   # 0 and one id per blob
    assert ds.diagnostics()["instances"]["from_components"] == 1


def test_semantic_masks_load_as_before(tmp_path):
    from unet_np.data import shapes, write_folder
    x, m = shapes(4, 32, seed=0)
    idir, mdir = write_folder(tmp_path / "s", x, m)
    ds = load_folder(idir, mdir)
    assert ds.instances is None and ds.num_classes == 3
    with pytest.raises(ValueError, match="instances must be"):
        load_folder(idir, mdir, instances="yes")
