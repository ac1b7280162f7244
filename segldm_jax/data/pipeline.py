"""The grain input pipeline for any source, and a source factory.

The record stream is defined globally: (train: shuffle, repeat forever) ->
decode -> resize shorter side -> (train: random crop + flip | eval: centre
crop), every random choice keyed by the global record index. It is cut into
blocks of the per-process batch size and process p takes blocks p, p+P, ...:
the global batch (the processes' blocks in order) is the same whatever the
number of processes, and each process decodes only its own records. The returned
``grain.IterDataset``'s iterators have ``get_state()`` / ``set_state()``
(JSON-able dicts; orbax saves them with ``grain.checkpoint``), and a restored
iterator continues at exactly the next batch.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import flags
import grain
import numpy as np

from segldm_jax.data.base import (RECORD_ERRORS, SKIPPED, DataError,
                                  PairSource, load_record)
from segldm_jax.data.folder import FolderSource
from segldm_jax.data.labels import LabelSpec
from segldm_jax.data.synthetic import SyntheticSource
from segldm_jax.data.tfds_source import TfdsSource
from segldm_jax.data.transforms import (CenterCrop, RandomCrop,
                                        RandomHorizontalFlip,
                                        ResizeShorterSide)
from segldm_jax.errors import ConfigError


def _derived_seed(seed: int, shard_index: int, purpose: int) -> int:
  """Independent 32-bit seeds per shard and per random step."""
  return int(np.random.SeedSequence([seed, shard_index, purpose])
             .generate_state(1)[0])


BAD_RECORD_MODES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class LoadOrSkip(grain.transforms.Map):
  """Source index -> decoded record; a bad record gives the next good one.

  Records ``i, i+1, ...`` (mod length) are tried in turn, so the stream stays
  a pure function of the index (deterministic and resumable) and batches
  keep their shape. The record carries ``SKIPPED``: ``i`` if record ``i``
  was bad, else -1 (int32), for the host to count; a bad ``i+1`` tried
  here is counted where its own index comes up.
  """

  source: Any

  def map(self, index: int) -> dict[str, Any]:
    n = len(self.source)
    for k in range(n):
      try:
        record = load_record(self.source, (index + k) % n)
      except RECORD_ERRORS:
        continue
      return {**record, SKIPPED: np.int32(index if k else -1)}
    raise DataError(f"{self.source!r}: all {n} records are bad; run "
                    f"train.py --check_data to see why")


def make_dataset(source: PairSource, *, image_size: int, batch_size: int,
                 seed: int, train: bool = True,
                 shard_index: int | None = None,
                 shard_count: int | None = None, num_workers: int = 0,
                 drop_remainder: bool = True,
                 read_options: grain.ReadOptions | None = None,
                 start_batch: int = 0,
                 bad_records: str = "error",
                 ) -> grain.IterDataset:
  """Builds the batched grain pipeline of one process.

  Args:
    source: any pair source (``FolderSource``, ``TfdsSource``,
      ``SyntheticSource``, ...); its ``decoder`` runs inside the pipeline.
    image_size: output side S (records are resized and cropped to S x S).
    batch_size: batch size of this process.
    seed: pipeline seed (shuffle order, crops, flips).
    train: True: shuffle each epoch, random crop + flip, repeat forever.
      False: source order, centre crop, no flip, one epoch.
    shard_index: this process's shard; default ``jax.process_index()``.
    shard_count: number of shards; default ``jax.process_count()``.
    num_workers: grain worker processes (0 = decode in this process's
      threads). Changing it changes the batch order (still deterministic),
      so a run resumed with another value sees other batches.
    drop_remainder: drop a last incomplete batch (matters for eval).
    read_options: grain thread options; default 4 threads, a small buffer.
    start_batch: global batches to skip (a resumed run passes its step):
      the stream is a pure function of (seed, batch index), so this lands
      on exactly the batch an uninterrupted run would see next, whatever
      the process or worker count was before.
    bad_records: "error": a record that fails to decode raises its
      ``DataError`` (naming the file). "skip": it is replaced by the next
      good record (``LoadOrSkip``) and the batch gets an int32 (B,) field,
      ``base.SKIPPED``, that ``check.BadRecordLog`` takes off and counts on
      the host. Same images and labels as "error" when no record is bad.

  Returns:
    A ``grain.IterDataset`` of ``{"image": uint8 (B, S, S, 3),
    "labels": uint8 (B, S, S)}`` (plus ``base.SKIPPED`` in skip mode).
  """
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in 0..{shard_count - 1}")
  if batch_size < 1 or image_size < 1:
    raise ValueError(f"batch_size and image_size must be >= 1, got "
                     f"{batch_size}, {image_size}")
  if bad_records not in BAD_RECORD_MODES:
    raise ValueError(f"bad_records must be one of {BAD_RECORD_MODES}, got "
                     f"{bad_records!r}")
  ds = _record_stream(source, image_size=image_size, seed=seed, train=train,
                      skip=bad_records == "skip", shard_count=shard_count)
  # Lazy: slicing after batching decodes only this process's blocks.
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  ds = ds[start_batch * shard_count + shard_index::shard_count]
  return _iterate(ds, batch_size, read_options, num_workers)


def _record_stream(source: PairSource, *, image_size: int, seed: int,
                   train: bool, skip: bool, shard_count: int
                   ) -> grain.MapDataset:
  """The global stream of decoded S x S records, before batching: (train:
  shuffle, repeat forever) -> decode -> resize -> (train: random crop +
  flip | eval: centre crop)."""
  # Skip mode streams indices, so a bad one can be swapped for the next;
  # shuffling indices gives the same permutation as shuffling the source.
  ds = (grain.MapDataset.range(len(source)) if skip
        else grain.MapDataset.source(source))
  if len(ds) < shard_count and not train:
    raise DataError(f"{source!r} has {len(ds)} records, fewer than the "
                    f"{shard_count} processes")
  if train:
    # Shuffle before repeat: every epoch is a fresh permutation.
    ds = ds.shuffle(seed=_derived_seed(seed, 0, 0)).repeat(None)
  decoder = getattr(source, "decoder", None)
  if skip:
    ds = ds.map(LoadOrSkip(source))
  elif decoder is not None:
    ds = ds.map(decoder)
  ds = ds.map(ResizeShorterSide(image_size))
  if train:
    ds = ds.random_map(RandomCrop(image_size), seed=_derived_seed(seed, 0, 1))
    ds = ds.random_map(RandomHorizontalFlip(), seed=_derived_seed(seed, 0, 2))
  else:
    ds = ds.map(CenterCrop(image_size))
  return ds


def _iterate(ds: grain.MapDataset, batch_size: int,
             read_options: grain.ReadOptions | None,
             num_workers: int) -> grain.IterDataset:
  """This process's batches as an iterable dataset: read by threads, or by
  `num_workers` worker processes."""
  if read_options is None:
    # grain's default (16 threads, 500 records ahead) holds too many decoded
    # full-size images; a few batches ahead is enough.
    read_options = grain.ReadOptions(
        num_threads=4, prefetch_buffer_size=max(16, 2 * batch_size))
  out = ds.to_iter_dataset(read_options)
  if num_workers > 0:
    # grain reads absl flags when it starts workers; outside absl.app
    # (pytest, notebooks) they are unparsed, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=2))
    # Workers hand batches over in shared memory that is freed when the
    # array dies; plain copies cannot leak it (or fail at interpreter exit).
    out = out.map(_copy_batch)
  return out


def _copy_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.array(v, copy=True) for k, v in batch.items()}


def _field(config: Any, name: str, default: Any = None) -> Any:
  """Reads a config field from a ConfigDict, dict or plain object."""
  if isinstance(config, dict) or hasattr(config, "to_dict"):
    value = config.get(name, default)
  else:
    value = getattr(config, name, default)
  # "" = unset, as flag-style configs often spell it.
  return None if isinstance(value, str) and not value else value


def _label_fields(data_config: Any) -> dict[str, Any]:
  return dict(ignore_label=_field(data_config, "ignore_label"),
              palette=_field(data_config, "palette"),
              remap=_field(data_config, "remap"))


def label_spec(data_config: Any, *, ignore_default: int | None = None
               ) -> LabelSpec:
  """The `LabelSpec` the config's source decodes masks with, for label maps
  from elsewhere (e.g. a user's masks); `ignore_default` stands in for an
  unset `ignore_label`."""
  fields = _label_fields(data_config)
  if fields["ignore_label"] is None:
    fields["ignore_label"] = ignore_default
  return LabelSpec.create(_field(data_config, "num_classes"), **fields)


SPLITS = ("train", "val")


def has_val_split(data_config: Any) -> bool:
  """Whether the config names a validation split (folder: both
  ``val_image_dir`` and ``val_mask_dir``; tfds: ``tfds_val_split``)."""
  kind = _field(data_config, "source")
  if kind == "folder":
    return bool(_field(data_config, "val_image_dir") and
                _field(data_config, "val_mask_dir"))
  return kind == "tfds" and bool(_field(data_config, "tfds_val_split"))


def folder_dirs(data_config: Any, split: str = "train") -> tuple[str, str]:
  """The folder source's (image dir, mask dir) of a split, relative paths
  taken from ``root`` when it is set."""
  prefix = "val_" if split == "val" else ""
  keys = f"data.{prefix}image_dir", f"data.{prefix}mask_dir"
  dirs = [_field(data_config, k.split(".")[1]) for k in keys]
  if not all(dirs):
    raise ConfigError(f"source 'folder' needs {keys[0]} and {keys[1]}"
                      + (" for its validation split" if prefix else ""))
  root = _field(data_config, "root")
  dataset = _field(data_config, "dataset")
  if dataset and not root and not all(os.path.isabs(d) for d in dirs):
    raise ConfigError(f"data.dataset={dataset!r} reads {dirs[0]} and "
                      f"{dirs[1]} under the dataset's root folder: pass "
                      f"--config.data.root=DIR")
  # os.path.join keeps an absolute dir as it is.
  return tuple(os.path.join(os.path.expanduser(root or ""),
                            os.path.expanduser(d)) for d in dirs)


def make_source(data_config: Any, split: str = "train") -> PairSource:
  """Builds the source a data config describes.

  Fields (``ml_collections.ConfigDict``, dict or object; "" means unset):

  * ``source``: "folder" | "tfds" | "synthetic".
  * ``num_classes``: class count, 1..255 (all sources).
  * ``ignore_label``: stored value that means "no class" (255 COCO-Stuff,
    0 ADE20K, None sflckr) -> ``IGNORE_ID`` (folder, tfds).
  * ``palette``: palette file for RGB colour masks (folder, tfds).
  * ``remap``: dict, JSON path or built-in name ("ade20k", "cityscapes"),
    stored value -> class id (folder, tfds).
  * folder: ``image_dir``, ``mask_dir`` (validation: ``val_image_dir``,
    ``val_mask_dir``), relative to ``root`` when set; ``image_suffix``,
    ``mask_suffix`` (pairing, see ``FolderSource``); ``skip_unpaired``
    (bool); ``dataset`` (a known layout's name, for messages).
  * ``bad_records`` ("error" | "skip") is not read here but passed to
    ``make_dataset``.
  * tfds: ``tfds_name``, ``tfds_split`` (default "train"; validation:
    ``tfds_val_split``), ``tfds_data_dir``, ``image_key`` (default
    "image"), ``mask_key`` (default "segmentation_mask").
  * synthetic: ``num_records``, ``image_size`` (rendered side), ``seed``
    (scene family, default 0).

  Args:
    data_config: the fields above.
    split: "train", or "val" for the validation split (``has_val_split``).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  kind = _field(data_config, "source")
  num_classes = _field(data_config, "num_classes")
  if num_classes is None:
    raise ValueError("data config needs num_classes")
  if split == "val" and kind in ("folder", "tfds") and not has_val_split(
      data_config):
    raise ConfigError("no validation split: set data.val_image_dir and "
                      "data.val_mask_dir" if kind == "folder" else
                      "no validation split: set data.tfds_val_split")
  labels = _label_fields(data_config)
  if kind == "folder":
    image_dir, mask_dir = folder_dirs(data_config, split)
    mask_suffix = _field(data_config, "mask_suffix") or ""
    if labels["remap"] == "cityscapes" and "labelTrainIds" in mask_suffix:
      raise ConfigError(
          f"data.remap='cityscapes' maps labelIds, but data.mask_suffix="
          f"{mask_suffix!r} reads train ids already: pass --config.data.remap=")
    return FolderSource(
        image_dir, mask_dir, num_classes=num_classes,
        skip_unpaired=bool(_field(data_config, "skip_unpaired", False)),
        image_suffix=_field(data_config, "image_suffix") or "",
        mask_suffix=mask_suffix, **labels)
  if kind == "tfds":
    name = _field(data_config, "tfds_name")
    if not name:
      raise ValueError("source 'tfds' needs tfds_name")
    tfds_split = (_field(data_config, "tfds_val_split") if split == "val"
                  else _field(data_config, "tfds_split", "train") or "train")
    return TfdsSource(
        name, tfds_split,
        num_classes=num_classes, data_dir=_field(data_config, "tfds_data_dir"),
        image_key=_field(data_config, "image_key", "image") or "image",
        mask_key=(_field(data_config, "mask_key", "segmentation_mask") or
                  "segmentation_mask"),
        **labels)
  if kind == "synthetic":
    if split == "val":
      raise ConfigError("source 'synthetic' has no validation split")
    num_records = _field(data_config, "num_records")
    image_size = _field(data_config, "image_size")
    if not num_records or not image_size:
      raise ValueError("source 'synthetic' needs num_records and image_size")
    return SyntheticSource(num_records, image_size, num_classes,
                           seed=_field(data_config, "seed", 0) or 0)
  raise ValueError(f"unknown data source {kind!r}; use 'folder', 'tfds' or "
                   f"'synthetic'")
