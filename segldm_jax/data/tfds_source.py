"""Image/mask pairs from a locally prepared TFDS dataset (never downloads).

Reads through ``tfds`` random access (``builder.as_data_source``, what
``tfds.data_source`` does), which needs the dataset prepared with
``file_format='array_record'``. TensorFlow is not needed for reading. Image
features decode with PIL inside ``__getitem__``, i.e. in grain workers.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from segldm_jax.data.base import DataError
from segldm_jax.data.labels import LabelSpec


def _how_to_prepare(name: str, data_dir: str | None) -> str:
  where = data_dir or "~/tensorflow_datasets"
  return (f"prepare it once where downloads are allowed: `tfds build {name} "
          f"--data_dir={where} --file_format=array_record`, or in Python "
          f"tfds.builder({name!r}, data_dir={where!r}, file_format="
          f"'array_record').download_and_prepare(), then copy {where} here")


def open_data_source(name: str, split: str, data_dir: str | None):
  """Returns the tfds random-access source, or raises a DataError."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f"TFDS dataset {name!r} is not prepared in "
                    f"{data_dir or 'the default data_dir'} (and is not a "
                    f"known builder): {_how_to_prepare(name, data_dir)}") from e
  if not builder.is_prepared():
    raise DataError(f"TFDS dataset {name!r} is not prepared in "
                    f"{builder.data_dir}; nothing is downloaded at run time: "
                    f"{_how_to_prepare(name, data_dir)}")
  file_format = str(builder.info.file_format.value
                    if builder.info.file_format else "")
  if file_format != "array_record":
    raise DataError(f"TFDS dataset {name!r} in {builder.data_dir} is stored "
                    f"as {file_format or 'unknown format'}; random access "
                    f"needs array_record: {_how_to_prepare(name, data_dir)}")
  if split.split("[")[0] not in builder.info.splits:  # "train[:10%]" too
    raise DataError(f"TFDS dataset {name!r} has no split {split!r}; "
                    f"available: {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


class TfdsSource:
  """Grain random-access source over a prepared TFDS dataset.

  Args:
    name: TFDS name, optionally with config/version (``"name/config:1.0.0"``).
    split: split name (``"train"``; slicing like ``"train[:90%]"`` works).
    num_classes: class count (<= 255).
    image_key: feature holding the RGB image.
    mask_key: feature holding the label map ((H, W), (H, W, 1), or RGB with
      ``palette``).
    data_dir: TFDS data directory (None: TFDS's default).
    ignore_label, palette, remap: as for ``FolderSource``.

  Example, Cityscapes as TFDS ``cityscapes/semantic_segmentation``, whose
  ``segmentation_label`` holds the ``*_gtFine_labelIds.png`` ids::

    TfdsSource("cityscapes/semantic_segmentation", "train", num_classes=19,
               image_key="image_left", mask_key="segmentation_label",
               remap="cityscapes")

  Not ADE20K's benchmark: TFDS ``scene_parse150`` holds the 2017 challenge's
  instance maps (``annotations_instance``: 100 thing classes, no stuff), so
  it is refused; read ADEChallengeData2016 with ``configs/seg_f4.py:ade20k``.
  """

  decoder = None  # tfds decodes in __getitem__, which runs in grain workers

  def __init__(self, name: str, split: str = "train", *, num_classes: int,
               image_key: str = "image", mask_key: str = "segmentation_mask",
               data_dir: str | None = None, ignore_label: int | None = None,
               palette: Any = None, remap: Any = None):
    if name.split("/")[0].split(":")[0] == "scene_parse150":
      raise DataError(
          "TFDS scene_parse150's annotations are instance maps of 100 thing "
          "classes without stuff, not the 150-class ADE20K benchmark maps: "
          "train on ADEChallengeData2016 with configs/seg_f4.py:ade20k")
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.mask_key = image_key, mask_key
    self.spec = LabelSpec.create(num_classes, ignore_label=ignore_label,
                                 palette=palette, remap=remap)
    self._source = open_data_source(name, split, data_dir)
    features = self._source.dataset_info.features
    missing = [k for k in (image_key, mask_key) if k not in features]
    if missing:
      raise DataError(f"TFDS dataset {name!r} has no feature(s) {missing}; "
                      f"available: {sorted(features.keys())} (set image_key /"
                      f" mask_key)")
    self._length = len(self._source)

  def __getstate__(self) -> dict[str, Any]:
    # Worker processes reopen the files instead of pickling open readers.
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if self._source is None:
      self._source = open_data_source(self.name, self.split, self.data_dir)
    example = self._source[int(index)]
    where = f"tfds:{self.name}/{self.split}[{int(index)}]"
    image = np.asarray(example[self.image_key])
    if image.ndim == 3 and image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise DataError(f"{where}: image {self.image_key!r} must be uint8 "
                      f"(H, W, 3), got {image.dtype} {image.shape}")
    mask = np.asarray(example[self.mask_key])
    if self.spec.uses_palette:
      if mask.ndim != 3 or mask.shape[-1] not in (3, 4):
        raise DataError(f"{where}: palette given but mask {self.mask_key!r} "
                        f"is not RGB: {mask.shape}")
      values, _ = self.spec.colours_to_values(mask[..., :3], where)  # exact
    else:
      if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
      if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"{where}: mask {self.mask_key!r} must be integer "
                        f"(H, W) or (H, W, 1), got {mask.dtype} {mask.shape}; "
                        f"pass palette= for RGB masks")
      values = mask
    labels = self.spec.to_ids(values, where)
    if image.shape[:2] != labels.shape:
      raise DataError(f"{where}: image is {image.shape[:2]} but mask is "
                      f"{labels.shape} (height, width)")
    return {"image": image, "labels": labels}

  def __repr__(self) -> str:
    return (f"TfdsSource(name={self.name!r}, split={self.split!r}, "
            f"num_records={len(self)}, num_classes={self.spec.num_classes})")
