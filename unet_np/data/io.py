"""Reading and writing segmentation data: a folder of images beside a folder of masks.

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
    saved as JPEG) is refused: such values are almost never class labels. An RGB mask without a
    palette is refused, unless it is grey (R = G = B).

Every problem with a file raises `DataError` (a ValueError) whose message begins with the file's
path. `load_folder` collects every problem of a folder before raising, so one run lists them all.
"""
import contextlib
import os
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

__all__ = [
    "DataError", "IMAGE_EXTENSIONS", "MASK_SUFFIXES", "CONVENTIONS", "PairReport", "match_files",
    "find_pairs", "read_image", "read_mask", "read_mask_info", "write_image", "write_mask",
    "normalize_image", "SegmentationDataset", "Diagnostics", "load_folder", "batches",
    "default_palette",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
TIFF_EXTENSIONS = (".tif", ".tiff")
# Suffixes a mask's file stem may carry beyond its image's stem (compared case-insensitively).
MASK_SUFFIXES = ("_mask", "-mask", "_masks", "-masks", "_label", "-label", "_labels", "-labels",
                 "_seg", "-seg", "_segmentation", "_gt", "-gt", "_annotation")
CONVENTIONS = ("binary255", "binary01", "labels", "palette", "rgb")


class DataError(ValueError):
    """A problem with the data on disk; the message names the file (or folder) at fault."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = None if path is None else str(path)


def _fail(path, what):
    return DataError(f"{path}: {what}", path)


# ---------------------------------------------------------------------------------------------
# Matching images with masks
# ---------------------------------------------------------------------------------------------

def _list_images(folder):
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def _strip_mask_suffix(stem):
    low = stem.lower()
    for suf in sorted(MASK_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf) and len(low) > len(suf):
            return low[: -len(suf)], True
    return low, False


def _check_dir(folder, what):
    p = Path(folder)
    if not p.exists():
        raise DataError(f"{p}: {what} folder does not exist", p)
    if not p.is_dir():
        raise DataError(f"{p}: {what} folder is not a directory", p)
    return p


class PairReport:
    """What `match_files` found: `pairs` [(image, mask)], `unmatched_images`,
    `unmatched_masks` (Paths) and `ambiguous` [(key, [Paths])]: several files for one stem."""

    def __init__(self, pairs, unmatched_images, unmatched_masks, ambiguous):
        self.pairs = pairs
        self.unmatched_images = unmatched_images
        self.unmatched_masks = unmatched_masks
        self.ambiguous = ambiguous


def match_files(images_dir, masks_dir):
    """Match image and mask files by stem, case-insensitively, tolerating a mask suffix
    (`a.png` <-> `a_mask.png`, `a-label.tif`, `a_gt.png`, ...; see MASK_SUFFIXES) and a different
    extension. images_dir and masks_dir may be one folder: then the files with a mask suffix are
    the masks. Returns a PairReport; raises DataError only for a missing folder."""
    idir = _check_dir(images_dir, "images")
    mdir = _check_dir(masks_dir, "masks")
    same = idir.resolve() == mdir.resolve()
    image_files = _list_images(idir)
    mask_files = _list_images(mdir)
    if same:
        mask_files = [p for p in image_files if _strip_mask_suffix(p.stem)[1]]
        image_files = [p for p in image_files if not _strip_mask_suffix(p.stem)[1]]
    images, masks, ambiguous = {}, {}, []
    for p in image_files:
        images.setdefault(p.stem.lower(), []).append(p)
    for p in mask_files:
        masks.setdefault(_strip_mask_suffix(p.stem)[0], []).append(p)
    # a mask named exactly like its image ("a.png" in masks/) must not lose to "a_mask.png"'s
    # stripped form when both exist: that is ambiguous and reported
    for table in (images, masks):
        for key, files in list(table.items()):
            if len(files) > 1:
                ambiguous.append((key, files))
                del table[key]
    pairs = [(images[k][0], masks[k][0]) for k in sorted(images) if k in masks]
    unmatched_images = [images[k][0] for k in sorted(images) if k not in masks]
    unmatched_masks = [masks[k][0] for k in sorted(masks) if k not in images]
    amb_keys = {k for k, _ in ambiguous}
    unmatched_images = [p for p in unmatched_images if p.stem.lower() not in amb_keys]
    unmatched_masks = [p for p in unmatched_masks
                       if _strip_mask_suffix(p.stem)[0] not in amb_keys]
    return PairReport(pairs, unmatched_images, unmatched_masks, ambiguous)


def _names(paths, limit=10):
    names = [Path(p).name for p in paths]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def find_pairs(images_dir, masks_dir):
    """[(image_path, mask_path)] matched by stem (see match_files), sorted by name.

    Raises DataError naming the folder when it has no image files, naming every image that has no
    mask (and listing the masks left over, which are often misnamed), and naming the files when
    several share one stem. Masks without an image are otherwise ignored."""
    rep = match_files(images_dir, masks_dir)
    problems = _pair_problems(rep, images_dir)
    if problems:
        raise DataError("\n".join(problems), rep.unmatched_images[0] if rep.unmatched_images
                        else images_dir)
    return rep.pairs


def _pair_problems(rep, images_dir):
    problems = []
    if not rep.pairs and not rep.unmatched_images and not rep.ambiguous:
        problems.append(f"{images_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    for p in rep.unmatched_images:
        hint = (f" (masks without an image: {_names(rep.unmatched_masks)})"
                if rep.unmatched_masks else "")
        problems.append(f"{p}: image has no mask{hint}")
    for key, files in rep.ambiguous:
        problems.append(f"{files[0]}: several files match the name {key!r}: {_names(files)}")
    return problems


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def _pil(path):
    try:
        from PIL import Image
    except ImportError:
        raise _fail(path, "reading this file needs Pillow: pip install Pillow "
                          "(or pip install 'unet-np[viz]')") from None
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
        raise _fail(path, f"cannot read image ({type(exc).__name__}: {exc})") from exc
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
    raise _fail(path, f"cannot tell the channel axis of a TIFF of shape {arr.shape}")


def _read_tiff(path):
    try:
        import tifffile
    except ImportError:
        raise _fail(path, "reading TIFF files needs tifffile: pip install tifffile") from None
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr = np.asarray(series.asarray())
            axes = getattr(series, "axes", "")
    except Exception as exc:  # noqa: BLE001
        raise _fail(path, f"cannot read TIFF ({type(exc).__name__}: {exc})") from exc
    if arr.ndim < 2:
        raise _fail(path, f"TIFF holds an array of shape {arr.shape}, not an image")
    if any(s == 0 for s in arr.shape):
        raise _fail(path, f"zero-size image (shape {arr.shape})")
    return _tiff_axes_to_chw(path, arr, axes)


def _scale(path, arr):
    """Integer pixels -> [0, 1] by their type's largest value; floats kept (must be finite)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        return (arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)).astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise _fail(path, "image has NaN or infinite pixels")
        return out
    raise _fail(path, f"unsupported pixel type {arr.dtype}")


_PIL_IMAGE_MODES = ("1", "L", "LA", "RGB", "RGBA", "P", "I", "F", "CMYK", "YCbCr", "LAB", "HSV",
                    "I;16", "I;16L", "I;16B", "I;16N", "La", "RGBa", "RGBX")


def read_image(path):
    """One image file -> float32 (C, H, W); see the module docstring for formats and scaling."""
    path = Path(path)
    if path.suffix.lower() in TIFF_EXTENSIONS:
        arr = _read_tiff(path)
        if arr.shape[0] == 0:
            raise _fail(path, f"zero-size image (shape {arr.shape})")
        return np.ascontiguousarray(_scale(path, arr))
    arr, mode, _ = _open_pil(path)
    if mode == "P":  # an indexed-colour image: its colours, not its indices
        arr, mode, _ = _open_pil(path, convert="RGBA" if _has_transparency(path) else "RGB")
    if mode not in _PIL_IMAGE_MODES:
        raise _fail(path, f"unsupported image mode {mode!r}")
    if arr.size == 0 or arr.ndim < 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _fail(path, f"zero-size image (shape {arr.shape})")
    if mode == "I" and arr.size and 0 <= arr.min() and arr.max() <= 65535:
        arr = arr.astype(np.uint16)  # 16-bit data that Pillow widened to 32 bits
    chw = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return np.ascontiguousarray(_scale(path, chw))


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
        raise _fail(path, "the palette is empty")
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
        raise _fail(path, f"colour {cols[0]} is not in the palette ({int((~known).sum())} "
                          f"pixels of unknown colours: {cols}{more})")
    return classes[pos]


def _gray_convention(path, g, bits):
    """Grayscale integer mask -> (labels, convention)."""
    if g.size and g.min() < 0:
        raise _fail(path, f"mask has negative values (min {int(g.min())})")
    vals = np.unique(g)
    top = (1 << bits) - 1
    if len(vals) == 1 and vals[0] == 0:
        return g.astype(np.int64), "empty"
    if np.all(np.isin(vals, (0, 1))):
        return g.astype(np.int64), "binary01"
    if np.all(np.isin(vals, (0, top))):
        return (g == top).astype(np.int64), "binary255"
    if top in vals:
        odd = [int(v) for v in vals if v not in (0, top)]
        shown = ", ".join(map(str, odd[:8])) + (" ..." if len(odd) > 8 else "")
        raise _fail(path, f"unexpected mask values: looks like a binary 0/{top} mask but also "
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
            raise _fail(path, f"a mask must have one channel, this TIFF has {arr.shape[0]}")
        bits = 8 if arr.dtype == np.uint8 else 16
    else:
        arr, mode, file_pal = _open_pil(path)
        if mode == "P" and palette is not None:
            arr, mode, _ = _open_pil(path, convert="RGB")
        bits = 16 if mode.startswith("I") else 8
    if arr.size == 0 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _fail(path, f"zero-size mask (shape {arr.shape})")
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
            raise _fail(path, f"colour mask ({len(cols)} colours, e.g. "
                              f"{tuple(int(c) for c in cols[min(1, len(cols) - 1)])}) needs "
                              f"palette= (a list of RGB triples, one per class)")
    elif mode in ("LA", "La"):
        arr, mode = arr[..., 0], "L"
    if mode == "F" or np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise _fail(path, "mask has non-integer values")
        arr = arr.astype(np.int64)
    elif mode not in ("L", "I", "I;16", "I;16L", "I;16B", "I;16N"):
        raise _fail(path, f"unsupported mask mode {mode!r}")
    if arr.ndim != 2:
        raise _fail(path, f"a mask must be 2-D, got shape {arr.shape}")
    if mode == "I" and arr.size and arr.max() > 65535:
        bits = 32
    labels, conv = _gray_convention(path, arr, bits)
    return labels, conv, None


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
    """Save a PIL image at ``path`` whole (_whole_file), in the format its extension names."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image file extension {path.suffix!r} (.png, .tif, .bmp ...)")
    with _whole_file(path) as f:
        im.save(f, format=fmt)


@contextlib.contextmanager
def _whole_file(path):
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


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_EPS_STD = 1e-6


def normalize_image(image, mode="image", mean=None, std=None):
    """float32 (C, H, W) -> standardised copy.

    mode 'image': each channel to zero mean and unit standard deviation over this image;
    'dataset': (x - mean) / std with per-channel `mean` and `std` (from SegmentationDataset);
    None or 'none': unchanged. A constant channel is only shifted (its std is taken as 1)."""
    x = np.asarray(image, dtype=np.float32)
    if mode in (None, "none"):
        return x.copy()
    if mode == "image":
        m = x.mean(axis=(1, 2), dtype=np.float64)
        s = x.std(axis=(1, 2), dtype=np.float64)
    elif mode == "dataset":
        if mean is None or std is None:
            raise ValueError("normalize='dataset' needs the dataset's mean and std")
        m = np.asarray(mean, dtype=np.float64).reshape(-1)
        s = np.asarray(std, dtype=np.float64).reshape(-1)
        if m.size != x.shape[0] or s.size != x.shape[0]:
            raise ValueError(f"mean/std have {m.size}/{s.size} channels, image has {x.shape[0]}")
    else:
        raise ValueError(f"normalize must be 'image', 'dataset' or None, got {mode!r}")
    s = np.where(s < _EPS_STD, 1.0, s)
    return ((x - m[:, None, None]) / s[:, None, None]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------

class Diagnostics(dict):
    """A dict of what was found in a dataset; str() gives a readable report."""

    def __str__(self):
        lines = [f"{self.get('num_pairs', 0)} image/mask pairs, {self.get('num_classes')} "
                 f"classes, {self.get('in_channels')} channel(s), masks "
                 f"'{self.get('mask_convention')}'"]
        sizes = self.get("image_sizes") or {}
        if sizes:
            lines.append("sizes: " + ", ".join(f"{h}x{w} ({n})" for (h, w), n in sizes.items()))
        total = sum(self.get("class_pixels", {}).values()) or 1
        for c, n in self.get("class_pixels", {}).items():
            lines.append(f"  class {c}: {n} pixels ({100.0 * n / total:.2f}%)")
        for key, title in (("unmatched_images", "images without a mask"),
                           ("unmatched_masks", "masks without an image")):
            if self.get(key):
                lines.append(f"{title}: {', '.join(self[key])}")
        for name, a, b in self.get("size_mismatches", []):
            lines.append(f"size mismatch: {name} image {a} vs mask {b}")
        for name, vals in self.get("unexpected_values", []):
            lines.append(f"unexpected mask values in {name}: {vals}")
        for name, msg in self.get("unreadable", []):
            lines.append(f"skipped {name}: {msg}")
        if self.get("mixed_conventions"):
            lines.append("mask conventions differ: " + ", ".join(
                f"{c} ({n})" for c, n in self["mixed_conventions"].items()))
        return "\n".join(lines)


class SegmentationDataset:
    """Images and masks in memory.

    images: list of float32 (C, H, W) (normalised as `normalize` says); masks: list of int64
    (H, W); names: the image file stems; num_classes; in_channels; mask_convention (how to write
    predictions back, see write_mask); palette (for 'palette' / 'rgb'); normalize, mean, std
    (what to apply to new images: normalize_image(x, ds.normalize, ds.mean, ds.std));
    weights: None, or a list of float32 (H, W) loss weight maps (see compute_weights)."""

    def __init__(self, images, masks, names=None, num_classes=None, mask_convention="labels",
                 palette=None, normalize=None, mean=None, std=None, weights=None, report=None):
        self.images = [np.asarray(x, dtype=np.float32) for x in images]
        self.masks = [np.asarray(m).astype(np.int64) for m in masks]
        if len(self.images) != len(self.masks):
            raise ValueError(f"{len(self.images)} images but {len(self.masks)} masks")
        for i, (x, m) in enumerate(zip(self.images, self.masks)):
            if x.ndim != 3 or m.ndim != 2 or x.shape[1:] != m.shape:
                raise ValueError(f"sample {i}: image {x.shape} (C,H,W) and mask {m.shape} "
                                 f"(H,W) do not fit")
        self.names = list(names) if names is not None else [f"{i:04d}" for i in
                                                           range(len(self.images))]
        top = max((int(m.max()) for m in self.masks if m.size), default=0)
        self.num_classes = int(num_classes) if num_classes is not None else max(2, top + 1)
        chans = {x.shape[0] for x in self.images}
        if len(chans) > 1:
            raise ValueError(f"images have different channel counts: {sorted(chans)}")
        self.in_channels = chans.pop() if chans else 0
        self.mask_convention = mask_convention
        self.palette = palette
        self.normalize = normalize
        self.mean = mean
        self.std = std
        self.weights = None if weights is None else [np.asarray(w, np.float32) for w in weights]
        self._report = report or {}

    @classmethod
    def from_arrays(cls, images, masks, normalize="image", **kw):
        """From arrays (N, C, H, W) and (N, H, W) (or lists), normalising as load_folder does.
        The mask convention defaults to 'binary255' for 0/1 masks and 'labels' otherwise."""
        imgs = [np.asarray(x, dtype=np.float32) for x in images]
        if kw.get("mask_convention") is None:
            top = max((int(np.max(m)) for m in masks if np.size(m)), default=0)
            kw["mask_convention"] = "binary255" if top <= 1 else "labels"
        imgs, mean, std = _normalize_all(imgs, normalize)
        return cls(imgs, list(masks), normalize=normalize, mean=mean, std=std, **kw)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.weights is not None:
            return self.images[i], self.masks[i], self.weights[i]
        return self.images[i], self.masks[i]

    def compute_weights(self, w0=10.0, sigma=5.0, class_balance=True, instances=None):
        """Fill `weights` with the U-Net paper's weight maps (weightmap.weight_map). The objects
        are `instances` (a list of (H, W) instance labels) when given, else the connected
        components of each mask's foreground. Returns the list."""
        from .weightmap import label_components, weight_map
        out = []
        for i, m in enumerate(self.masks):
            inst = label_components(m) if instances is None else np.asarray(instances[i])
            out.append(weight_map(inst, w0, sigma, class_balance, labels=m))
        self.weights = out
        return out

    def diagnostics(self):
        """Diagnostics (a dict; str() reads well): pixels per class, image sizes, and every file
        problem found while loading (unmatched, size mismatches, unexpected values), by name."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for m in self.masks:
            counts += np.bincount(m.ravel(), minlength=self.num_classes)[: self.num_classes]
        sizes = Counter(tuple(m.shape) for m in self.masks)
        d = Diagnostics(num_pairs=len(self), num_classes=self.num_classes,
                        in_channels=self.in_channels, mask_convention=self.mask_convention,
                        class_pixels={c: int(n) for c, n in enumerate(counts)},
                        image_sizes=dict(sorted(sizes.items())),
                        unmatched_images=[], unmatched_masks=[], size_mismatches=[],
                        unexpected_values=[], unreadable=[], mixed_conventions={})
        d.update({k: v for k, v in self._report.items()})
        return d


def _normalize_all(images, normalize):
    if normalize == "dataset":
        if not images:
            return images, None, None
        c = images[0].shape[0]
        n = sum(x.shape[1] * x.shape[2] for x in images)
        mean = sum(x.sum(axis=(1, 2), dtype=np.float64) for x in images) / n
        var = sum(((x - mean[:, None, None]) ** 2).sum(axis=(1, 2), dtype=np.float64)
                  for x in images) / n
        mean = mean.reshape(c)
        std = np.sqrt(var).reshape(c)
        return [normalize_image(x, "dataset", mean, std) for x in images], mean, std
    return [normalize_image(x, normalize) for x in images], None, None


def _resolve_convention(conventions):
    """One convention for the dataset from each mask's; raises on a 0/255 vs labels mix."""
    seen = Counter(c for c in conventions.values() if c != "empty")
    if not seen:
        return "binary255", {}
    mixed = dict(seen) if len(seen) > 1 else {}
    for c in ("palette", "rgb"):
        if c in seen:
            return c, mixed
    if "labels" in seen and "binary255" in seen:
        a = next(n for n, c in conventions.items() if c == "binary255")
        b = next(n for n, c in conventions.items() if c == "labels")
        raise DataError(f"{b}: masks mix conventions: {a} is a 0/255 binary mask but {b} holds "
                        f"class labels; use one convention for every mask", b)
    if "labels" in seen:
        return "labels", mixed
    if len(seen) == 2:  # 0/1 and 0/255 binaries: both are clearly binary
        return ("binary255" if seen["binary255"] >= seen["binary01"] else "binary01"), mixed
    return next(iter(seen)), mixed


def load_folder(images_dir, masks_dir, normalize="image", palette=None, strict=True,
                max_classes=256):
    """Load every image of images_dir with its mask from masks_dir (matched by find_pairs' rules).

    normalize: 'image' (per image and channel), 'dataset' (per channel over the whole set; the
        statistics are kept as .mean / .std) or None.
    palette: RGB triples, index = class, for colour masks (see read_mask).
    strict: True raises one DataError listing every problem (each by file name); False skips the
        faulty pairs and lists them in diagnostics() (still raising if nothing usable is left).
    max_classes: a mask label >= this is an error (it is most likely an image given as a mask).
    Raises DataError for a missing or empty folder."""
    rep = match_files(images_dir, masks_dir)
    problems = _pair_problems(rep, images_dir)
    if not rep.pairs and not rep.unmatched_images and not rep.ambiguous:
        raise DataError(problems[0], images_dir)
    report = {"unmatched_images": [p.name for p in rep.unmatched_images],
              "unmatched_masks": [p.name for p in rep.unmatched_masks],
              "size_mismatches": [], "unexpected_values": [], "unreadable": []}
    images, masks, names, paths, conventions, file_pal = [], [], [], [], {}, None
    for ip, mp in rep.pairs:
        try:
            x = read_image(ip)
        except DataError as e:
            problems.append(str(e))
            report["unreadable"].append((ip.name, str(e)))
            continue
        try:
            m, conv, fp = read_mask_info(mp, palette)
        except DataError as e:
            problems.append(str(e))
            key = "unexpected_values" if "unexpected mask values" in str(e) else "unreadable"
            report[key].append((mp.name, str(e)))
            continue
        if x.shape[1:] != m.shape:
            msg = (f"{mp}: mask is {m.shape[0]}x{m.shape[1]} but its image {ip.name} is "
                   f"{x.shape[1]}x{x.shape[2]} (H x W)")
            problems.append(msg)
            report["size_mismatches"].append((ip.name, x.shape[1:], m.shape))
            continue
        if int(m.max()) >= max_classes:
            msg = (f"{mp}: mask label {int(m.max())} >= max_classes={max_classes} (is this an "
                   f"image rather than a mask?)")
            problems.append(msg)
            report["unexpected_values"].append((mp.name, msg))
            continue
        if fp is not None and file_pal is None:
            file_pal = fp
        images.append(x)
        masks.append(m)
        names.append(ip.stem)
        paths.append(ip)
        conventions[mp.name] = conv
    chans = Counter(x.shape[0] for x in images)
    if len(chans) > 1:
        common = chans.most_common(1)[0][0]
        keep = []
        for i, x in enumerate(images):
            if x.shape[0] != common:
                msg = (f"{paths[i]}: image has {x.shape[0]} channels, most images have "
                       f"{common}")
                problems.append(msg)
                report["unreadable"].append((paths[i].name, msg))
            else:
                keep.append(i)
        images = [images[i] for i in keep]
        masks = [masks[i] for i in keep]
        names = [names[i] for i in keep]
    if strict and problems:
        first = rep.unmatched_images[0] if rep.unmatched_images else images_dir
        head = f"{len(problems)} problem(s) in {images_dir} / {masks_dir}:\n  "
        raise DataError(head + "\n  ".join(problems[:50]) +
                        (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""),
                        first)
    if not images:
        raise DataError(f"{images_dir}: no usable image/mask pair\n  " + "\n  ".join(problems),
                        images_dir)
    convention, mixed = _resolve_convention(conventions)
    report["mixed_conventions"] = mixed
    num_classes = None
    pal = None
    if palette is not None:
        if isinstance(palette, dict):  # {colour: class} -> a list indexed by class
            by_class = {int(c): tuple(int(v) for v in col) for col, c in palette.items()}
            pal = [by_class.get(i, (0, 0, 0)) for i in range(max(by_class) + 1)]
        else:
            pal = [tuple(int(v) for v in col) for col in palette]
        num_classes = max(max((int(m.max()) for m in masks), default=0) + 1, len(pal), 2)
    elif convention == "palette":
        pal = file_pal
    images, mean, std = _normalize_all(images, normalize)
    return SegmentationDataset(images, masks, names=names, num_classes=num_classes,
                               mask_convention=convention, palette=pal, normalize=normalize,
                               mean=mean, std=std, report=report)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def _as_samples(dataset):
    if isinstance(dataset, SegmentationDataset) or hasattr(dataset, "masks"):
        return dataset.images, dataset.masks, getattr(dataset, "weights", None)
    parts = tuple(dataset)
    if len(parts) not in (2, 3):
        raise ValueError("dataset must be a SegmentationDataset or (images, masks[, weights])")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def batches(dataset, batch_size, shuffle=True, rng=None, crop=None, augment=None,
            drop_last=False, multiple_of=1):
    """Iterate over a dataset in batches: (x float32 (N, C, h, w), y int64 (N, h, w)), plus
    w float32 (N, h, w) when the dataset carries weight maps.

    dataset: a SegmentationDataset, or (images, masks[, weights]) as arrays or lists.
    rng: a numpy Generator or an int seed (None: fresh entropy); it drives the order, the crops
        and the augmentation.
    crop: None, an int or (h, w). Images in one batch must share one size, so when crop is None and
        the sizes differ, every sample is cropped to the smallest height and the smallest width in
        the dataset. Crops are placed at random when shuffle is True and centred otherwise, the
        same window for image, mask and weights. A sample smaller than the crop is a DataError.
    multiple_of: round the crop size down to a multiple of this (a U-Net of depth d wants 2**d).
    augment: None, a callable or a list of callables f(image, mask, weight, rng) ->
        (image, mask, weight) (augment.flip_rotate and augment.elastic fit), applied per sample
        after the crop. They must keep the sample's size.
    drop_last: skip a final batch smaller than batch_size."""
    images, masks, weights = _as_samples(dataset)
    n = len(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(masks) != n or (weights is not None and len(weights) != n):
        raise ValueError("images, masks (and weights) must have the same length")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    fns = [] if augment is None else (list(augment) if isinstance(augment, (list, tuple))
                                      else [augment])
    sizes = [tuple(np.shape(m)[-2:]) for m in masks]
    if crop is None:
        if len(set(sizes)) > 1:
            crop = (min(s[0] for s in sizes), min(s[1] for s in sizes))
    elif np.isscalar(crop):
        crop = (int(crop), int(crop))
    if crop is not None:
        crop = tuple(int(c) for c in crop)
        if multiple_of > 1:
            crop = (crop[0] // multiple_of * multiple_of, crop[1] // multiple_of * multiple_of)
        if min(crop) < 1:
            raise ValueError(f"crop size {crop} is empty")
    names = getattr(dataset, "names", None)
    if crop is not None:  # fail before the first batch rather than in the middle of an epoch
        for i, (h, wd) in enumerate(sizes):
            if crop[0] > h or crop[1] > wd:
                who = names[i] if names is not None else f"sample {i}"
                raise DataError(f"{who}: image is {h}x{wd}, smaller than the crop "
                                f"{crop[0]}x{crop[1]}", who)
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        xs, ys, ws = [], [], []
        for i in idx:
            x = np.asarray(images[i], dtype=np.float32)
            y = np.asarray(masks[i]).astype(np.int64, copy=False)
            w = None if weights is None else np.asarray(weights[i], dtype=np.float32)
            if crop is not None and crop != y.shape:
                h, wd = y.shape
                if shuffle:
                    top = int(rng.integers(0, h - crop[0] + 1))
                    left = int(rng.integers(0, wd - crop[1] + 1))
                else:
                    top, left = (h - crop[0]) // 2, (wd - crop[1]) // 2
                sl = (slice(top, top + crop[0]), slice(left, left + crop[1]))
                x, y = x[(slice(None),) + sl], y[sl]
                w = None if w is None else w[sl]
            for f in fns:
                x, y, w = f(x, y, w, rng)
            xs.append(x)
            ys.append(y)
            ws.append(w)
        out = (np.stack(xs).astype(np.float32, copy=False), np.stack(ys).astype(np.int64))
        if weights is not None:
            out = out + (np.stack(ws).astype(np.float32),)
        yield out
