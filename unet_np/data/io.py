"""Reading and writing images and masks, one file at a time.

Images
    `read_image(path)` -> float32 (C, H, W). PNG / JPEG / BMP / GIF through Pillow, TIFF through
    tifffile (both imported only when a file needs them). Integer pixels are scaled to [0, 1] by the
    largest value of their type (8-bit / 255, 16-bit / 65535); floating-point TIFFs are kept as
    they are. Grayscale gives C = 1, RGB 3, RGBA 4, a multi-channel TIFF C.

Masks
    `read_mask(path, palette=None)` -> int64 (H, W) class labels. What the values mean is inferred
    per file and called the file's *convention*, kept so that predictions can be written back the
    way the training masks were (`write_mask`):

    =============  =============================================  ==============================
    convention     file                                           labels
    =============  =============================================  ==============================
    'binary255'    grayscale with values in {0, 255} (or 1-bit)   255 -> 1
    'binary01'     grayscale with values in {0, 1}                kept
    'labels'       grayscale integers 0..K-1 (8 or 16 bit)        kept
    'palette'      'P' mode PNG (indexed colour)                  the palette indices
    'rgb'          RGB colour mask, with `palette=` given         the colour's index in palette
    =============  =============================================  ==============================

    An all-zero mask fits every convention ('empty'). A grayscale 8-bit mask that holds 255 and
    also values other than 0 and 255 (a 0/255 mask with stray grey levels, e.g. anti-aliased or
    saved as JPEG) is refused: such values are almost never class labels. A 16-bit mask is a
    label image: 65535 beside other values is kept as an id (an instance label image's ids go up
    to 65535), unless 65535 covers most of the foreground (a 0/65535 mask with stray values,
    refused as in 8 bits). An RGB mask without a palette is refused, unless it is grey (R = G = B).

Instance label images
    `read_labels(path)` -> int64 (H, W) ids exactly as stored (no convention: 255 and 65535 are
    ids); `write_labels(path, labels)` writes 16-bit .tif (tifffile) or .png (Pillow), whole.

Every problem with a file raises `DataError` (a ValueError) whose message begins with the file's
path. `load_folder` collects every problem of a folder before raising, so one run lists them all.
Finding the files is files.py's job, the dataset built from them dataset.py's.
"""
import contextlib
import os
import uuid
from pathlib import Path

import numpy as np

from .files import DataError, IMAGE_EXTENSIONS, MASK_SUFFIXES  # noqa: F401 (re-exported)

__all__ = [
    "DataError", "IMAGE_EXTENSIONS", "MASK_SUFFIXES", "CONVENTIONS", "TIFF_EXTENSIONS",
    "read_image", "read_mask", "read_mask_info", "read_labels", "write_image", "write_mask",
    "write_labels", "whole_file",
    "default_palette",
]

TIFF_EXTENSIONS = (".tif", ".tiff")
CONVENTIONS = ("binary255", "binary01", "labels", "palette", "rgb")


def fail(path, what):
    """A DataError whose message starts with the file's path."""
    return DataError(f"{path}: {what}", path)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def _pil(path):
    try:
        from PIL import Image
    except ImportError:
        raise fail(path, "reading this file needs Pillow: pip install Pillow "
                          "(or, in a checkout, pip install '.[viz]')") from None
    return Image


def _open_pil(path, convert=None):
    """(array, mode, file palette or None) for the first frame of an image file.
    Any failure of Pillow (unknown format, corrupt or truncated data, decompression bomb ...) is
    turned into a DataError naming the file."""
    Image = _pil(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            pal = None
            if mode == "P" and convert is None:
                raw = im.getpalette() or []
                pal = [tuple(raw[i:i + 3]) for i in range(0, len(raw) - 2, 3)]
            if convert is not None and mode not in ("RGB", "RGBA"):
                im = im.convert(convert)
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            arr = np.array(im)
            out_mode = im.mode
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - everything Pillow raises on bad bytes
        raise fail(path, f"cannot read image ({type(exc).__name__}: {exc})") from exc
    return arr, out_mode, pal


def _tiff_axes_to_chw(path, arr, axes):
    """Any TIFF array -> (C, H, W): Y and X last, every other axis folded into channels."""
    if axes and len(axes) == arr.ndim and "Y" in axes and "X" in axes:
        order = [i for i, a in enumerate(axes) if a not in "YX"] + [axes.index("Y"),
                                                                     axes.index("X")]
        arr = np.transpose(arr, order)
        return arr.reshape((-1,) + arr.shape[-2:])
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        if arr.shape[-1] <= 4 < arr.shape[0]:
            return np.moveaxis(arr, -1, 0)
        return arr
    raise fail(path, f"cannot tell the channel axis of a TIFF of shape {arr.shape}")


def _read_tiff(path):
    try:
        import tifffile
    except ImportError:
        raise fail(path, "reading TIFF files needs tifffile: pip install tifffile") from None
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr = np.asarray(series.asarray())
            axes = getattr(series, "axes", "")
    except Exception as exc:  # noqa: BLE001
        raise fail(path, f"cannot read TIFF ({type(exc).__name__}: {exc})") from exc
    if arr.ndim < 2:
        raise fail(path, f"TIFF holds an array of shape {arr.shape}, not an image")
    if any(s == 0 for s in arr.shape):
        raise fail(path, f"zero-size image (shape {arr.shape})")
    return _tiff_axes_to_chw(path, arr, axes)


def scale_to_unit(path, arr):
    """Integer pixels -> [0, 1] by their type's largest value; floats kept (must be finite)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        return (arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)).astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise fail(path, "image has NaN or infinite pixels")
        return out
    raise fail(path, f"unsupported pixel type {arr.dtype}")


_PIL_IMAGE_MODES = ("1", "L", "LA", "RGB", "RGBA", "P", "I", "F", "CMYK", "YCbCr", "LAB", "HSV",
                    "I;16", "I;16L", "I;16B", "I;16N", "La", "RGBa", "RGBX")


def read_image(path):
    """One image file -> float32 (C, H, W); see the module docstring for formats and scaling."""
    path = Path(path)
    if path.suffix.lower() in TIFF_EXTENSIONS:
        arr = _read_tiff(path)
        if arr.shape[0] == 0:
            raise fail(path, f"zero-size image (shape {arr.shape})")
        return np.ascontiguousarray(scale_to_unit(path, arr))
    arr, mode, _ = _open_pil(path)
    if mode == "P":  # an indexed-colour image: its colours, not its indices
        arr, mode, _ = _open_pil(path, convert="RGBA" if _has_transparency(path) else "RGB")
    if mode not in _PIL_IMAGE_MODES:
        raise fail(path, f"unsupported image mode {mode!r}")
    if arr.size == 0 or arr.ndim < 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise fail(path, f"zero-size image (shape {arr.shape})")
    if mode == "I" and arr.size and 0 <= arr.min() and arr.max() <= 65535:
        arr = arr.astype(np.uint16)  # 16-bit data that Pillow widened to 32 bits
    chw = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return np.ascontiguousarray(scale_to_unit(path, chw))


def _has_transparency(path):
    Image = _pil(path)
    try:
        with Image.open(path) as im:
            return "transparency" in im.info
    except Exception:  # noqa: BLE001 - it was readable a moment ago; be safe
        return False


def _palette_lookup(path, rgb, palette):
    """(H, W, 3) colours -> class indices through palette (a list of RGB triples, index = class,
    or a dict {(r, g, b): class}); an unknown colour is a DataError naming file and colour."""
    if isinstance(palette, dict):
        items = [(tuple(int(c) for c in k), int(v)) for k, v in palette.items()]
    else:
        items = [(tuple(int(c) for c in col), i) for i, col in enumerate(palette)]
    if not items:
        raise fail(path, "the palette is empty")
    for col, _ in items:
        if len(col) != 3 or not all(0 <= c <= 255 for c in col):
            raise ValueError(f"palette colours must be RGB triples in 0..255, got {col}")
    codes = np.array([(r << 16) | (g << 8) | b for (r, g, b), _ in items], dtype=np.int64)
    classes = np.array([c for _, c in items], dtype=np.int64)
    if len(np.unique(codes)) != len(codes):
        raise ValueError("the palette lists one colour twice")
    order = np.argsort(codes)
    codes, classes = codes[order], classes[order]
    px = rgb[..., :3].astype(np.int64)
    px = (px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2]
    pos = np.clip(np.searchsorted(codes, px), 0, len(codes) - 1)
    known = codes[pos] == px
    if not known.all():
        bad, counts = np.unique(px[~known], return_counts=True)
        cols = [((int(c) >> 16) & 255, (int(c) >> 8) & 255, int(c) & 255) for c in bad[:5]]
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise fail(path, f"colour {cols[0]} is not in the palette ({int((~known).sum())} "
                          f"pixels of unknown colours: {cols}{more})")
    return classes[pos]


def _gray_convention(path, g, bits):
    """Grayscale integer mask -> (labels, convention)."""
    if g.size and g.min() < 0:
        raise fail(path, f"mask has negative values (min {int(g.min())})")
    vals = np.unique(g)
    top = (1 << bits) - 1
    if len(vals) == 1 and vals[0] == 0:
        return g.astype(np.int64), "empty"
    if np.all(np.isin(vals, (0, 1))):
        return g.astype(np.int64), "binary01"
    if np.all(np.isin(vals, (0, top))):
        return (g == top).astype(np.int64), "binary255"
    if top in vals and bits >= 16 and 2 * np.count_nonzero(g == top) < np.count_nonzero(g):
        # 16-bit files are label images (instance ids up to 65535): the top value is one id
        # among others. Only when it covers most of the foreground is it a 0/65535 binary mask
        # with stray grey levels (refused below).
        return g.astype(np.int64), "labels"
    if top in vals:
        odd = [int(v) for v in vals if v not in (0, top)]
        shown = ", ".join(map(str, odd[:8])) + (" ..." if len(odd) > 8 else "")
        raise fail(path, f"unexpected mask values: looks like a binary 0/{top} mask but also "
                          f"holds {shown} ({len(odd)} other values; anti-aliasing or JPEG?). "
                          f"Class labels must be 0..K-1, or use an indexed-colour PNG")
    return g.astype(np.int64), "labels"


def read_mask_info(path, palette=None):
    """(labels int64 (H, W), convention, file_palette) for one mask file.

    convention is one of CONVENTIONS or 'empty' (all zeros); file_palette is the list of RGB
    triples of an indexed-colour PNG (else None). With `palette` given (RGB triples, index =
    class), colour and indexed-colour masks are mapped by colour."""
    path = Path(path)
    file_pal = None
    if path.suffix.lower() in TIFF_EXTENSIONS:
        arr = _read_tiff(path)  # (C, H, W)
        if arr.shape[0] in (3, 4) and (palette is not None or not _is_gray(arr[:3])):
            arr, mode = np.moveaxis(arr, 0, -1), "RGB"
        elif arr.shape[0] in (1, 3, 4):
            arr, mode = arr[0], "L"
        else:
            raise fail(path, f"a mask must have one channel, this TIFF has {arr.shape[0]}")
        bits = 8 if arr.dtype == np.uint8 else 16
    else:
        arr, mode, file_pal = _open_pil(path)
        if mode == "P" and palette is not None:
            arr, mode, _ = _open_pil(path, convert="RGB")
        bits = 16 if mode.startswith("I") else 8
    if arr.size == 0 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise fail(path, f"zero-size mask (shape {arr.shape})")
    if mode == "P":
        return arr.astype(np.int64), "palette", file_pal
    if mode == "1":
        return arr.astype(np.int64), ("binary255" if arr.any() else "empty"), None
    if mode in ("RGB", "RGBA", "RGBX"):
        if palette is not None:
            return _palette_lookup(path, arr, palette), "rgb", None
        if _is_gray(np.moveaxis(arr[..., :3], -1, 0)):
            arr, mode = arr[..., 0], "L"
        else:
            cols = np.unique(arr[..., :3].reshape(-1, 3), axis=0)
            raise fail(path, f"colour mask ({len(cols)} colours, e.g. "
                              f"{tuple(int(c) for c in cols[min(1, len(cols) - 1)])}) needs "
                              f"palette= (a list of RGB triples, one per class)")
    elif mode in ("LA", "La"):
        arr, mode = arr[..., 0], "L"
    if mode == "F" or np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise fail(path, "mask has non-integer values")
        arr = arr.astype(np.int64)
    elif mode not in ("L", "I", "I;16", "I;16L", "I;16B", "I;16N"):
        raise fail(path, f"unsupported mask mode {mode!r}")
    if arr.ndim != 2:
        raise fail(path, f"a mask must be 2-D, got shape {arr.shape}")
    if mode == "I" and arr.size and arr.max() > 65535:
        bits = 32
    labels, conv = _gray_convention(path, arr, bits)
    return labels, conv, None


def read_labels(path):
    """One instance label image -> int64 (H, W) ids exactly as stored: 0 background, any other
    value one object (8-, 16- or 32-bit grayscale PNG / TIFF, or the indices of an indexed-colour
    PNG). No convention is inferred: 255 or 65535 is an id like any other. A colour, multi-channel
    or non-integer file is a DataError naming it."""
    path = Path(path)
    if path.suffix.lower() in TIFF_EXTENSIONS:
        arr = _read_tiff(path)
        if arr.shape[0] != 1:
            raise fail(path, f"an instance label image must have one channel, this TIFF has "
                              f"{arr.shape[0]}")
        arr, mode = arr[0], "L"
    else:
        arr, mode, _ = _open_pil(path)
    if mode in ("RGB", "RGBA", "RGBX") and arr.ndim == 3 and _is_gray(np.moveaxis(arr[..., :3],
                                                                                   -1, 0)):
        arr = arr[..., 0]
    elif mode in ("LA", "La"):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise fail(path, f"an instance label image must be one grayscale channel of integer ids, "
                          f"got a {mode} image of shape {arr.shape}")
    if arr.size == 0:
        raise fail(path, f"zero-size mask (shape {arr.shape})")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise fail(path, "instance label image has non-integer values")
    elif arr.dtype.kind not in "iub":
        raise fail(path, f"unsupported pixel type {arr.dtype} for a label image")
    if arr.min() < 0:
        raise fail(path, f"instance label image has negative values (min {int(arr.min())})")
    return arr.astype(np.int64)


def _is_gray(chw):
    return bool(np.all(chw[0] == chw[1]) and np.all(chw[0] == chw[2]))


def read_mask(path, palette=None):
    """One mask file -> int64 (H, W) class labels (see the module docstring)."""
    return read_mask_info(path, palette)[0]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def default_palette(n=256):
    """n distinct RGB colours: black for class 0, then well-separated hues (VOC-style bit mix)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


_WRITABLE = (".png", ".bmp", ".tif", ".tiff")


def _check_labels(labels):
    lab = np.asarray(labels)
    if lab.ndim != 2 or lab.size == 0:
        raise ValueError(f"labels must be a non-empty (H, W) array, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer) and lab.dtype != np.bool_:
        if not np.all(lab == np.round(lab)):
            raise ValueError("labels must be integers")
    lab = lab.astype(np.int64)
    if lab.min() < 0:
        raise ValueError(f"labels must be >= 0, got {int(lab.min())}")
    return lab


def write_mask(path, labels, convention="binary255", palette=None):
    """Write class labels (H, W) as a lossless image in a mask convention (see CONVENTIONS):
    'binary255' (0/255, 8-bit; 'empty' too), 'binary01' (0/1), 'labels' (8-bit, or 16-bit past
    255), 'palette' (indexed PNG with `palette` or default_palette()), 'rgb' (RGB colours from
    `palette`). The extension picks the format: .png (recommended), .bmp or .tif."""
    Image = _pil(path)
    path = Path(path)
    if path.suffix.lower() not in _WRITABLE:
        raise ValueError(f"{path}: masks are written losslessly as {', '.join(_WRITABLE)}")
    lab = _check_labels(labels)
    top = int(lab.max())
    if convention in ("binary255", "binary01", "empty"):
        if top > 1:
            raise ValueError(f"{path}: a binary mask convention needs labels 0/1, got max {top}")
        scale = 1 if convention == "binary01" else 255
        im = Image.fromarray((lab * scale).astype(np.uint8))
    elif convention == "labels":
        if top > 65535:
            raise ValueError(f"{path}: labels above 65535 cannot be written")
        im = Image.fromarray(lab.astype(np.uint8 if top <= 255 else np.uint16))
    elif convention == "palette":
        if top > 255:
            raise ValueError(f"{path}: an indexed PNG holds labels 0..255, got {top}")
        pal = list(palette) if palette is not None else default_palette()
        if len(pal) <= top:
            raise ValueError(f"{path}: label {top} has no colour in a palette of {len(pal)}")
        im = Image.fromarray(lab.astype(np.uint8))
        flat = [int(c) for col in pal[:256] for c in col]
        im = im.convert("P") if im.mode != "P" else im
        im.putpalette(flat + [0] * (768 - len(flat)))
    elif convention == "rgb":
        if palette is None:
            raise ValueError(f"{path}: the 'rgb' convention needs palette=")
        pal = np.asarray(list(palette), dtype=np.uint8).reshape(-1, 3)
        if len(pal) <= top:
            raise ValueError(f"{path}: label {top} has no colour in a palette of {len(pal)}")
        im = Image.fromarray(pal[lab])
    else:
        raise ValueError(f"unknown mask convention {convention!r}; one of {CONVENTIONS}")
    _save_whole(Image, im, path)
    return path


def write_labels(path, labels):
    """Write an instance label image (H, W), ids 0..65535, as a 16-bit file that keeps every id:
    .tif / .tiff through tifffile, .png through Pillow (16-bit grayscale). Written whole or not at
    all (whole_file). Returns the path."""
    path = Path(path)
    lab = _check_labels(labels)
    if int(lab.max()) > 65535:
        raise ValueError(f"{path}: ids above 65535 do not fit a 16-bit label image "
                         f"(got {int(lab.max())})")
    u16 = lab.astype(np.uint16)
    ext = path.suffix.lower()
    if ext in TIFF_EXTENSIONS:
        try:
            import tifffile
        except ImportError:
            raise ValueError(f"{path}: writing TIFF files needs tifffile: pip install tifffile "
                             f"(or write 16-bit PNG)") from None
        with whole_file(path) as f:
            tifffile.imwrite(f, u16)
    elif ext == ".png":
        Image = _pil(path)
        _save_whole(Image, Image.fromarray(u16), path)
    else:
        raise ValueError(f"{path}: label images are written as .tif, .tiff or .png")
    return path


def write_image(path, image):
    """Write a (C, H, W) or (H, W) image with values in [0, 1] as an 8-bit file (C = 1, 3, 4)."""
    Image = _pil(path)
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 3:
        if a.shape[0] not in (1, 3, 4):
            raise ValueError(f"{path}: 8-bit files hold 1, 3 or 4 channels, got {a.shape[0]}")
        a = a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)
    elif a.ndim != 2:
        raise ValueError(f"{path}: image must be (C, H, W) or (H, W), got {a.shape}")
    u8 = np.round(np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0).astype(np.uint8)
    _save_whole(Image, Image.fromarray(u8), Path(path))
    return Path(path)


def _save_whole(Image, im, path):
    """Save a PIL image at ``path`` whole (whole_file), in the format its extension names."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image file extension {path.suffix!r} (.png, .tif, .bmp ...)")
    with whole_file(path) as f:
        im.save(f, format=fmt)


@contextlib.contextmanager
def whole_file(path):
    """A binary file to write ``path`` through: a temporary file beside it, os.replace'd onto it when
    the block ends (keeping the replaced file's permissions), removed if the block raises. Whoever
    looks, or an interrupted run, finds the old file or the complete new one, never part of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


