"""Finding the data on disk: a folder of images beside a folder of masks, matched by file name.

    match_files(images_dir, masks_dir) -> PairReport (pairs, unmatched, ambiguous)
    find_pairs(images_dir, masks_dir)  -> [(image, mask)], or DataError listing every problem

A mask matches the image with the same stem, optionally followed by a suffix such as ``_mask``
(MASK_SUFFIXES); masks may also sit in the images' folder when they carry such a suffix.
"""
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
# Suffixes a mask's file stem may carry beyond its image's stem (compared case-insensitively).
MASK_SUFFIXES = ("_mask", "-mask", "_masks", "-masks", "_label", "-label", "_labels", "-labels",
                 "_seg", "-seg", "_segmentation", "_gt", "-gt", "_annotation")


class DataError(ValueError):
    """A problem with the data on disk; the message names the file (or folder) at fault."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = None if path is None else str(path)


# ---------------------------------------------------------------------------------------------
# Matching images with masks
# ---------------------------------------------------------------------------------------------

def list_images(folder, extensions=IMAGE_EXTENSIONS):
    """The files of ``folder`` with one of ``extensions`` (hidden files left out), sorted."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in extensions)


def _strip_mask_suffix(stem):
    low = stem.lower()
    for suf in sorted(MASK_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf) and len(low) > len(suf):
            return low[: -len(suf)], True
    return low, False


def check_dir(folder, what):
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


def match_files(images_dir, masks_dir, extensions=IMAGE_EXTENSIONS):
    """Match image and mask files by stem, case-insensitively, tolerating a mask suffix
    (`a.png` <-> `a_mask.png`, `a-label.tif`, `a_gt.png`, ...; see MASK_SUFFIXES) and a different
    extension. images_dir and masks_dir may be one folder: then the files with a mask suffix are
    the masks. extensions: the files looked at (volumes.VOLUME_EXTENSIONS for volumes). Returns a
    PairReport; raises DataError only for a missing folder."""
    idir = check_dir(images_dir, "images")
    mdir = check_dir(masks_dir, "masks")
    same = idir.resolve() == mdir.resolve()
    image_files = list_images(idir, extensions)
    mask_files = list_images(mdir, extensions)
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
    problems = pair_problems(rep, images_dir)
    if problems:
        raise DataError("\n".join(problems), rep.unmatched_images[0] if rep.unmatched_images
                        else images_dir)
    return rep.pairs


def pair_problems(rep, images_dir, extensions=IMAGE_EXTENSIONS):
    """One line per problem of a PairReport: no files, an image without a mask, ambiguous names."""
    problems = []
    if not rep.pairs and not rep.unmatched_images and not rep.ambiguous:
        problems.append(f"{images_dir}: no image files ({', '.join(extensions)})")
    for p in rep.unmatched_images:
        hint = (f" (masks without an image: {_names(rep.unmatched_masks)})"
                if rep.unmatched_masks else "")
        problems.append(f"{p}: image has no mask{hint}")
    for key, files in rep.ambiguous:
        problems.append(f"{files[0]}: several files match the name {key!r}: {_names(files)}")
    return problems


