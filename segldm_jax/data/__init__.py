"""Data: sources (folders, TFDS, synthetic), joint transforms, grain pipeline.

Records are ``{"image": uint8 (H, W, 3), "labels": uint8 (H, W)}`` with class
ids ``0..num_classes-1`` and ``IGNORE_ID`` for unlabeled pixels; labels become
one-hot only on the device, inside the model (``LatentDiffusion.condition``).

Also the palettes (`palette.py`) and picture grids (`viz.py`) that draw
label maps. May import: the root and runtime.
"""
from segldm_jax.data.base import (DataError, IGNORE_ID, MAX_CLASSES,
                                  PairSource, check_num_classes, load_record)
from segldm_jax.data.check import (BadRecordLog, CheckReport, check_data,
                                   check_source)
from segldm_jax.data.pixel_range import (images_to_model_range,
                                    model_range_to_images)
from segldm_jax.data.folder import DecodePair, FolderSource
from segldm_jax.data.labels import LabelSpec
from segldm_jax.data.pipeline import make_dataset, make_source
from segldm_jax.data.synthetic import SyntheticSource, class_colours
from segldm_jax.data.tfds_source import TfdsSource
from segldm_jax.data.transforms import (CenterCrop, RandomCrop,
                                        RandomHorizontalFlip,
                                        ResizeShorterSide)

__all__ = [
    "BadRecordLog", "CenterCrop", "CheckReport", "DataError", "DecodePair",
    "FolderSource", "IGNORE_ID", "LabelSpec", "MAX_CLASSES", "PairSource",
    "RandomCrop", "RandomHorizontalFlip", "ResizeShorterSide",
    "SyntheticSource", "TfdsSource", "check_data", "check_num_classes",
    "check_source", "class_colours", "images_to_model_range", "load_record",
    "make_dataset", "make_source", "model_range_to_images",
]
