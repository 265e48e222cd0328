"""The data layer: everything that lists, reads, splits and loads images.

- ``images``: open and decode any image as 8-bit RGB; why a file cannot be used.
- ``index``: one read of every image (decodes?, size, content and perceptual hashes), cached.
- ``scan``: which files are images, the classes, the folder layouts (``Sample``, ``Dataset``).
- ``split``: patient groups, the stratified grouped split, split.csv / folds.csv.
- ``prepare``: a run's data, scanned, checked and split (or a resumed run's split read).
- ``transforms``: torchvision's evaluation and training transforms.
- ``duplicates``: exact and near copies as clusters; leaks across splits, label conflicts.
- ``loading``: the uncached loaders' dataset (one image at a time).
- ``cache``: ``data.cache``, every image decoded once, training crops cut from the kept pixels.

The names below are the layer's interface; the modules import each other directly, never this file.
"""

from semodel.data.images import (
    IMAGE_EXTENSIONS,
    UNREADABLE,
    check_image,
    load_rgb,
    open_image,
    read_image,
    warn_skipped,
)
from semodel.data.loading import ImageList, collate_skip_bad, default_workers
from semodel.data.prepare import check_classes, make_synthetic_if_missing, prepare_dataset
from semodel.data.scan import (
    SPLIT_FOLDERS,
    SPLITS,
    Dataset,
    Listing,
    Sample,
    find_layout,
    has_presplit,
    is_image_name,
    list_images,
    report_bad_files,
    scan_classes,
    scan_dataset,
)
from semodel.data.split import (
    assign_splits,
    check_group_pattern,
    check_splits,
    group_of,
    majority_label,
    merged_groups,
    read_sample_csv,
    read_split_csv,
    write_sample_csv,
    write_split_csv,
)
from semodel.data.transforms import eval_transform, train_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLIT_FOLDERS",
    "SPLITS",
    "UNREADABLE",
    "Dataset",
    "ImageList",
    "Listing",
    "Sample",
    "assign_splits",
    "check_classes",
    "check_group_pattern",
    "check_image",
    "check_splits",
    "collate_skip_bad",
    "default_workers",
    "eval_transform",
    "find_layout",
    "group_of",
    "has_presplit",
    "is_image_name",
    "list_images",
    "load_rgb",
    "majority_label",
    "make_synthetic_if_missing",
    "merged_groups",
    "open_image",
    "prepare_dataset",
    "read_image",
    "read_sample_csv",
    "read_split_csv",
    "report_bad_files",
    "scan_classes",
    "scan_dataset",
    "train_transform",
    "warn_skipped",
    "write_sample_csv",
    "write_split_csv",
]
