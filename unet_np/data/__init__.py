"""The data side: folders of images and masks, synthetic sets, the U-Net weight map, augmentation.

    from unet_np.data import load_folder, batches, touching_cells, weight_map, elastic

files      match_files / find_pairs: images beside their masks, matched by file name
io         read_image / read_mask / write_image / write_mask, one file at a time
dataset    load_folder -> SegmentationDataset, normalize_image, batches; every bad file raises
           DataError naming it
volumes    .npy / multi-page TIFF volumes: read_volume, load_volumes (3-D datasets)
pipeline   crops, augmentation and the validation split that Trainer.fit(dataset) uses
synthetic  touching_cells (instances for the weight map), shapes (needs context), write_folder;
           touching_spheres and write_volumes (.npy) for volumes
weightmap  edt (exact Euclidean distance transform), label_components, weight_map; 2-D and 3-D
augment    flip_rotate, elastic (the same random field for image, labels and weights); a volume
           (C, D, H, W) goes to augment3d (the cube's symmetries, a 3-D field)
instances  instance_targets (background / interior / border from label images),
           instance_weight_map, instance_mask_problem (are these masks instance labels?)

NumPy only: Pillow (PNG/JPEG/BMP) and tifffile (TIFF) are imported when a file needs them.
"""
from .files import (IMAGE_EXTENSIONS, DataError, PairReport, check_dir, find_pairs, list_images,
                    match_files)
from .io import (CONVENTIONS, default_palette, read_image, read_mask, read_mask_info, whole_file,
                 write_image, write_mask)
from .dataset import Diagnostics, SegmentationDataset, batches, load_folder, normalize_image
from .volumes import (VOLUME_EXTENSIONS, load_volumes, read_volume, read_volume_mask,
                      spatial_dims_of, write_volume_mask)
from .synthetic import shapes, touching_cells, touching_spheres, write_folder, write_volumes
from .weightmap import (class_weights, edt, edt_squared, label_components, weight_map,
                        weight_map_from_mask)
from .augment import compose, displacement_field, elastic, flip_rotate, warp
from .augment3d import displacement_field3d, elastic3d, flip_rotate3d, warp3d
from .instances import (INSTANCE_CLASSES, check_instance_labels, instance_mask_problem,
                        instance_targets, instance_weight_map)

__all__ = [
    "IMAGE_EXTENSIONS", "DataError", "PairReport", "check_dir", "find_pairs", "list_images",
    "match_files",
    "CONVENTIONS", "default_palette", "read_image", "read_mask", "read_mask_info", "whole_file",
    "write_image", "write_mask",
    "Diagnostics", "SegmentationDataset", "batches", "load_folder", "normalize_image",
    "VOLUME_EXTENSIONS", "load_volumes", "read_volume", "read_volume_mask", "spatial_dims_of",
    "write_volume_mask",
    "shapes", "touching_cells", "write_folder", "touching_spheres", "write_volumes",
    "class_weights", "edt", "edt_squared", "label_components", "weight_map",
    "weight_map_from_mask",
    "compose", "displacement_field", "elastic", "flip_rotate", "warp",
    "displacement_field3d", "elastic3d", "flip_rotate3d", "warp3d",
    "INSTANCE_CLASSES", "check_instance_labels", "instance_mask_problem", "instance_targets",
    "instance_weight_map",
]
