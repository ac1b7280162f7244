"""Finding bad records: a whole-dataset scan, and skip-mode bookkeeping.

``check_source`` decodes every record of a source exactly as the pipeline
does (full decode, so truncated files fail) and reports each failure with
its file and reason; ``check_data`` does the same from a data config, so a
source that cannot even be built (an empty folder, unpaired files) is a
failed check too. ``python train.py ... --check_data`` runs it.

With ``data.bad_records = "skip"`` the pipeline replaces a bad record by the
next good one and marks its slot in the batch (``SKIPPED``); ``BadRecordLog``
takes that field off each host batch, counts it and warns once per bad
record.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import ImageFile
import tqdm

from segldm_jax import errors
from segldm_jax.data import pipeline
from segldm_jax.data.base import SKIPPED, DataError, PairSource

_log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class Problem:
  """One bad record: its index, its files (if known) and what is wrong."""

  index: int
  files: tuple[str, ...]
  reason: str
  split: str = ""  # "val" for the validation split's records

  def describe(self) -> str:
    record = f"{self.split} record" if self.split else "record"
    # Our errors name their file already; others get the files prepended.
    if not self.files or any(f in self.reason for f in self.files):
      return f"{record} {self.index}: {self.reason}"
    return f"{record} {self.index} ({', '.join(self.files)}): {self.reason}"


@dataclasses.dataclass
class CheckReport:
  """The outcome of a scan.

  Attributes:
    source: what was scanned (the source's repr, or the config's folders).
    num_records: records in the source (0 if it could not be built).
    num_checked: records decoded.
    problems: one per bad record, in index order.
    error: why the source could not be built at all, or None.
  """

  source: str
  num_records: int = 0
  num_checked: int = 0
  problems: list[Problem] = dataclasses.field(default_factory=list)
  error: str | None = None

  @property
  def num_bad(self) -> int:
    return len(self.problems)

  @property
  def ok(self) -> bool:
    return self.error is None and not self.problems

  def summary(self, max_shown: int = 20) -> str:
    """A few lines for people: the counts, then the first problems."""
    if self.error is not None:
      return (f"data check FAILED: cannot open the dataset ({self.source})"
              f"\n  {self.error}")
    status = "OK" if self.ok else "FAILED"
    lines = [f"data check {status}: {self.num_checked} of {self.num_records} "
             f"records checked, {self.num_bad} bad ({self.source})"]
    lines += [f"  {p.describe()}" for p in self.problems[:max_shown]]
    if self.num_bad > max_shown:
      lines.append(f"  ... and {self.num_bad - max_shown} more")
    return "\n".join(lines)


def _files(raw: Any) -> tuple[str, ...]:
  """File paths in a raw (undecoded) record, e.g. FolderSource's."""
  if isinstance(raw, Mapping):
    return tuple(v for v in raw.values() if isinstance(v, (str, os.PathLike)))
  return ()


def _reason(error: BaseException) -> str:
  """Why a record is bad, in one line: our message as is, others typed."""
  text = " ".join(str(error).split()) or "(no message)"
  return text if isinstance(error, errors.UserError) else (
      f"{type(error).__name__}: {text}")


def check_record(source: PairSource, index: int) -> Problem | None:
  """Decodes record ``index``; returns what is wrong with it, or None."""
  files: tuple[str, ...] = ()
  try:
    raw = source[index]  # tfds: already decoded (and may raise)
    files = _files(raw)
    decoder = getattr(source, "decoder", None)
    record = decoder.map(raw) if decoder is not None else raw
    image, labels = record["image"], record["labels"]
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise DataError(f"image must be uint8 (H, W, 3), got {image.dtype} "
                      f"{image.shape}")
    if labels.shape != image.shape[:2]:
      raise DataError(f"labels {labels.shape} and image {image.shape[:2]} "
                      f"differ in size")
  except Exception as e:  # pylint: disable=broad-except
    # A scan reports everything; skip mode only tolerates RECORD_ERRORS.
    return Problem(index, tuple(os.fspath(f) for f in files), _reason(e))
  return None


def check_source(source: PairSource, *, progress: bool = True,
                 num_threads: int | None = None) -> CheckReport:
  """Decodes every record of ``source`` and reports the bad ones.

  Args:
    source: any pair source (its ``decoder`` is applied, as in the pipeline).
    progress: show a tqdm progress bar.
    num_threads: decoding threads (PIL decodes outside the GIL); default
      ``min(8, cpu_count)``.

  Returns:
    A ``CheckReport``; ``report.ok`` is True when every record decoded.
  """
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    # Then PIL pads truncated files with grey instead of failing.
    _log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this "
                 "process: truncated images will not be detected")
  n = len(source)
  report = CheckReport(source=repr(source), num_records=n)
  num_threads = num_threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool, \
      tqdm.tqdm(total=n, desc="checking data", unit="record",
                disable=not progress, dynamic_ncols=True) as bar:
    for problem in pool.map(lambda i: check_record(source, i), range(n)):
      report.num_checked += 1
      if problem is not None:
        report.problems.append(problem)
        bar.set_postfix(bad=report.num_bad)
      bar.update(1)
  return report


def check_data(data_config: Any, *, progress: bool = True,
               num_threads: int | None = None) -> CheckReport:
  """``check_source`` on the sources a data config describes: the training
  split, then the validation split when one is set (its problems say
  "val record N").

  A source that cannot be built (missing or empty folder, unpaired files, a
  bad palette) gives a failed report carrying that one error.
  """
  splits = ["train"] + (["val"] if pipeline.has_val_split(data_config) else [])
  report = CheckReport(source="")
  for split in splits:
    try:
      source = pipeline.make_source(data_config, split)
    except (DataError, OSError, ValueError) as e:
      get = (data_config.get if hasattr(data_config, "get")
             else lambda k: getattr(data_config, k, None))
      where = (os.path.join(get("root") or "", get("image_dir") or "")
               if get("image_dir") else get("tfds_name") or get("source"))
      return CheckReport(source=str(where), error=_reason(e))
    one = check_source(source, progress=progress, num_threads=num_threads)
    report.source += (f"; {split}: " if report.source else "") + one.source
    report.num_records += one.num_records
    report.num_checked += one.num_checked
    tag = "" if split == "train" else split
    report.problems += [dataclasses.replace(p, split=tag)
                        for p in one.problems]
  return report


class BadRecordLog:
  """Takes skip mode's fields off host batches, counts them, warns once.

  Call it on every batch a process reads (before the batch goes to the
  devices); ``total`` is the number of bad records skipped so far by this
  process, and each bad record is logged once with its file and reason.
  """

  def __init__(self, source: PairSource):
    self.source = source
    self.total = 0
    self._warned: set[int] = set()

  def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    skipped = batch.pop(SKIPPED, None)
    if skipped is None:
      return batch
    for index in np.asarray(skipped).tolist():
      if index < 0:
        continue
      self.total += 1
      if index not in self._warned:
        self._warned.add(index)
        # Decoded again here (once per record) to say what is wrong.
        problem = check_record(self.source, index)
        reason = problem.describe() if problem else f"record {index}"
        _log.warning("skipping a bad record (data.bad_records=skip): %s",
                     reason)
    return batch
