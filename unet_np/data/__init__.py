"""The data side: folders of images and masks, synthetic sets, the U-Net weight map, augmentation.

    from unet_np.data import load_folder, batches, touching_cells, weight_map, elastic

io         read_image / read_mask / write_mask, find_pairs, load_folder -> SegmentationDataset,
           batches; every bad file raises DataError naming it
synthetic  touching_cells (instances for the weight map), shapes (needs context), write_folder
weightmap  edt (exact Euclidean distance transform), label_components, weight_map
augment    flip_rotate, elastic (the same random field for image, labels and weights)

NumPy only: Pillow (PNG/JPEG/BMP) and tifffile (TIFF) are imported when a file needs them.
"""
from .io import (CONVENTIONS, DataError, Diagnostics, SegmentationDataset, batches,
                 default_palette, find_pairs, load_folder, match_files, normalize_image,
                 read_image, read_mask, read_mask_info, write_image, write_mask)
from .synthetic import shapes, touching_cells, write_folder
from .weightmap import (class_weights, edt, edt_squared, label_components, weight_map,
                        weight_map_from_mask)
from .augment import compose, displacement_field, elastic, flip_rotate, warp

__all__ = [
    "CONVENTIONS", "DataError", "Diagnostics", "SegmentationDataset", "batches",
    "default_palette", "find_pairs", "load_folder", "match_files", "normalize_image",
    "read_image", "read_mask", "read_mask_info", "write_image", "write_mask",
    "shapes", "touching_cells", "write_folder",
    "class_weights", "edt", "edt_squared", "label_components", "weight_map",
    "weight_map_from_mask",
    "compose", "displacement_field", "elastic", "flip_rotate", "warp",
]
