"""Volumes on disk, for 3-D segmentation: ``.npy`` arrays and multi-page TIFF stacks.

    read_volume(path)            -> float32 (C, D, H, W)
    read_volume_mask(path)       -> int64 (D, H, W), and the mask's convention
    write_volume_mask(path, labels, convention)   .npy or .tif, chosen by the suffix, atomically
    load_volumes(images_dir, masks_dir)           -> SegmentationDataset of volumes (spatial_dims 3)
    spatial_dims_of(images_dir, masks_dir)        -> 2 or 3: what the files hold

Images: a ``.npy`` of shape (D, H, W) (one channel) or (C, D, H, W); a TIFF whose pages are the
slices (tifffile's axes name them: 'Z', or 'Q'/'I' for plain pages; 'C'/'S' is the channel axis).
Integer voxels are scaled to [0, 1] by their type's largest value, floats kept (as read_image does
for 2-D images). Masks: integer class labels 0..K-1 of the same (D, H, W), or a 0/255 binary mask
(255 -> 1, written back as 0/255). NumPy reads ``.npy`` (never with pickle); TIFF needs tifffile.
"""
from pathlib import Path

import numpy as np

from .files import DataError, match_files, pair_problems
from .io import TIFF_EXTENSIONS, fail, scale_to_unit, whole_file

VOLUME_EXTENSIONS = (".npy",) + TIFF_EXTENSIONS


def _read_array(path):
    """(array, axes or None) of a .npy or TIFF file."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False), None
        except Exception as exc:  # noqa: BLE001 - a bad file is the user's to fix: name it
            raise fail(path, f"cannot read .npy ({type(exc).__name__}: {exc})") from exc
    if path.suffix.lower() not in TIFF_EXTENSIONS:
        raise fail(path, f"not a volume file ({', '.join(VOLUME_EXTENSIONS)})")
    try:
        import tifffile
    except ImportError:
        raise fail(path, "reading TIFF volumes needs tifffile: pip install tifffile (or the "
                         "[tiff] extra)") from None
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return np.asarray(series.asarray()), getattr(series, "axes", "")
    except Exception as exc:  # noqa: BLE001
        raise fail(path, f"cannot read TIFF ({type(exc).__name__}: {exc})") from exc


def _channels_first(path, arr, axes):
    """A volume array -> (C, D, H, W): (D, H, W) gets one channel; with tifffile's axes the channel
    axis is the one named 'C' or 'S'; a 4-D .npy is taken as (C, D, H, W)."""
    if axes and len(axes) == arr.ndim and arr.ndim == 4:
        ch = [i for i, a in enumerate(axes) if a in "CS"]
        if len(ch) == 1:
            arr = np.moveaxis(arr, ch[0], 0)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise fail(path, f"a volume must be (D, H, W) or (C, D, H, W), got shape {arr.shape}")
    if any(s == 0 for s in arr.shape):
        raise fail(path, f"zero-size volume (shape {arr.shape})")
    return arr


def read_volume(path):
    """One volume file -> float32 (C, D, H, W); see the module docstring."""
    arr, axes = _read_array(path)
    return np.ascontiguousarray(scale_to_unit(Path(path), _channels_first(path, arr, axes)))


def read_volume_mask(path):
    """One mask volume -> (int64 (D, H, W) labels, convention 'binary255' | 'labels')."""
    arr, _ = _read_array(path)
    arr = np.squeeze(arr)
    if arr.ndim != 3:
        raise fail(path, f"a mask volume must be (D, H, W), got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise fail(path, "mask has non-integer values")
    elif arr.dtype.kind not in "biu":
        raise fail(path, f"unsupported mask type {arr.dtype}")
    m = arr.astype(np.int64)
    if m.size and m.min() < 0:
        raise fail(path, f"mask has negative values (min {int(m.min())})")
    values = np.unique(m)
    if values.size and values[-1] == 255 and set(values.tolist()) <= {0, 255}:
        return (m == 255).astype(np.int64), "binary255"
    return m, "labels"


def write_volume_mask(path, labels, convention="labels"):
    """Write labels (D, H, W) to a .npy or multi-page .tif (by the suffix), whole or not at all.
    convention 'binary255' writes class 1 as 255; the smallest unsigned type that holds the labels
    is used (uint8, uint16, else uint32)."""
    path = Path(path)
    lab = np.asarray(labels)
    if lab.ndim != 3 or lab.dtype.kind not in "biu":
        raise ValueError(f"{path}: labels must be an integer (D, H, W) array, got {lab.dtype} "
                         f"{lab.shape}")
    if convention == "binary255":
        lab = np.where(lab > 0, 255, 0)
    top = int(lab.max()) if lab.size else 0
    out = lab.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)
    suffix = path.suffix.lower()
    if suffix not in VOLUME_EXTENSIONS:
        raise ValueError(f"{path}: a mask volume is written as {', '.join(VOLUME_EXTENSIONS)}")
    if suffix != ".npy":
        import tifffile                                   # checked by the caller's read already
    with whole_file(path) as f:
        if suffix == ".npy":
            np.save(f, out, allow_pickle=False)
        else:
            tifffile.imwrite(f, out)
    return path


def spatial_dims_of(images_dir, masks_dir):
    """3 when the folders hold volumes (a .npy mask, or a TIFF mask of several pages), else 2."""
    from .files import list_images
    masks = list_images(masks_dir, VOLUME_EXTENSIONS + (".png", ".jpg", ".jpeg", ".bmp", ".gif"))
    if not masks:
        return 2
    first = masks[0]
    if first.suffix.lower() == ".npy":
        return 3
    if first.suffix.lower() in TIFF_EXTENSIONS:
        arr, _ = _read_array(first)
        return 3 if np.squeeze(arr).ndim == 3 else 2
    return 2


def load_volumes(images_dir, masks_dir, normalize="image", max_classes=256):
    """Every volume of images_dir with its mask volume from masks_dir (matched by file name as
    load_folder matches images) -> SegmentationDataset with spatial_dims 3. Raises one DataError
    listing every problem (missing mask, shape mismatch, unreadable file), each by name."""
    from .dataset import SegmentationDataset, resolve_convention
    rep = match_files(images_dir, masks_dir, VOLUME_EXTENSIONS)
    problems = pair_problems(rep, images_dir, VOLUME_EXTENSIONS)
    images, masks, names, conventions = [], [], [], {}
    for ip, mp in rep.pairs:
        try:
            x = read_volume(ip)
            m, conv = read_volume_mask(mp)
        except DataError as e:
            problems.append(str(e))
            continue
        if x.shape[1:] != m.shape:
            problems.append(f"{mp}: mask volume is {'x'.join(map(str, m.shape))} but its image "
                            f"{ip.name} is {'x'.join(map(str, x.shape[1:]))} (D x H x W)")
            continue
        if int(m.max()) >= max_classes:
            problems.append(f"{mp}: mask label {int(m.max())} >= max_classes={max_classes} (is this "
                            f"an image rather than a mask?)")
            continue
        images.append(x)
        masks.append(m)
        names.append(ip.stem)
        conventions[mp.name] = conv
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {images_dir} / {masks_dir}:\n  "
                        + "\n  ".join(problems[:50]), images_dir)
    chans = {x.shape[0] for x in images}
    if len(chans) > 1:
        raise DataError(f"{images_dir}: volumes have different channel counts: {sorted(chans)}",
                        images_dir)
    convention, mixed = resolve_convention(conventions)
    return SegmentationDataset.from_arrays(images, masks, normalize=normalize, names=names,
                                           mask_convention=convention,
                                           report={"mixed_conventions": mixed})
