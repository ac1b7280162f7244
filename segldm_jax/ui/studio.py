"""What the web page asks of a model, without the web: uploads made ids and
photos, samples and edits made PNGs, one request at a time.

`serve.py` wraps a `Studio` in HTTP (`ui/server.py`); tests and notebooks can
drive it directly. Pixels are exactly `sample.py`'s for the same mask, seed
and options, since both call `TrainedModel.sample` with the same batch size.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import pathlib
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from segldm_jax import errors
from segldm_jax.data import folder
from segldm_jax.data import masks as masks_lib
from segldm_jax.data import palette as palette_lib
from segldm_jax.data.base import DataError
from segldm_jax.data.base import IGNORE_ID
from segldm_jax.data.labels import LabelSpec
from segldm_jax.diffusion import samplers

MAX_COUNT = 16  # images per request: a page, not a batch job


class BusyError(errors.UserError):
  """The queue is full: the request was not taken."""


def _image_mode(path: pathlib.Path) -> str:
  try:
    with Image.open(path) as image:
      return image.mode
  except (OSError, SyntaxError, ValueError):
    raise errors.InputError(f"{path.name} is not an image (PNG, JPEG, ...)"
                            ) from None


def png_bytes(array: np.ndarray) -> bytes:
  """uint8 (H, W) ids -> a greyscale PNG; (H, W, 3) -> an RGB PNG."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def data_url(png: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclasses.dataclass(frozen=True)
class Options:
  """One request's sampling choices, checked."""
  sampler: str
  steps: int
  guidance_scale: float
  seed: int
  count: int

  @classmethod
  def parse(cls, defaults: dict[str, Any], sampler: str | None = None,
            steps: int | None = None, guidance_scale: float | None = None,
            seed: int | None = None, count: int | None = None) -> "Options":
    sampler = sampler or defaults["sampler"]
    if sampler not in samplers.SAMPLERS:
      raise errors.InputError(f"sampler {sampler!r}: use one of "
                              f"{', '.join(samplers.SAMPLERS)}")
    steps = int(defaults["steps"] if steps is None else steps)
    if not 1 <= steps <= 1000:
      raise errors.InputError(f"steps {steps}: use 1 to 1000")
    scale = float(defaults["guidance_scale"] if guidance_scale is None
                  else guidance_scale)
    if not 0.0 <= scale <= 50.0:
      raise errors.InputError(f"guidance scale {scale:g}: use 0 to 50 "
                              "(1 = no guidance)")
    seed = int(seed or 0)
    if not 0 <= seed < 2**31:
      raise errors.InputError(f"seed {seed}: use 0 to {2**31 - 1}")
    count = int(1 if count is None else count)
    if not 1 <= count <= MAX_COUNT:
      raise errors.InputError(f"count {count}: use 1 to {MAX_COUNT}")
    return cls(sampler, steps, scale, seed, count)

  def sample_kwargs(self) -> dict[str, Any]:
    return dict(sampler=self.sampler, steps=self.steps,
                guidance_scale=self.guidance_scale)


class Studio:
  """A loaded model and the one lane its requests take turns in.

  Args:
    model: a `trained_model.TrainedModel`.
    batch_size: as `sample.py --batch_size` (the same batches, the same
      pixels).
    max_queue: requests that may wait while one runs; more are refused with
      `BusyError` at once, so that nobody waits on a queue without end.
  """

  def __init__(self, model, *, batch_size: int = 8, max_queue: int = 4):
    self.model = model
    self.batch_size = batch_size
    self.max_queue = max_queue
    data = model.config.data
    self.colours = palette_lib.for_data(data)
    self.names = palette_lib.names_for_data(data)
    # Uploaded label maps: grey values are ids; colours are the palette's,
    # and black, drawn for "don't care" by the coloured download, reads back
    # as don't care unless a class owns it.
    self.black_is_free = not (self.colours == 0).all(axis=1).any()
    table = {i: rgb.tolist() for i, rgb in enumerate(self.colours)}
    if self.black_is_free:
      table[IGNORE_ID] = [0, 0, 0]
    self._id_spec = LabelSpec.create(model.num_classes, ignore_label=IGNORE_ID)
    self._colour_spec = LabelSpec.create(
        model.num_classes, ignore_label=IGNORE_ID, palette=table)
    self.defaults = model.sample_options()
    self._lane = threading.Lock()      # held by the request that runs
    self._state = threading.Lock()     # guards the fields below
    self._admitted = 0                 # running + waiting
    self._job: dict[str, Any] | None = None
    self.last_seconds: float | None = None

  # -- What the page shows ---------------------------------------------------

  def info(self) -> dict[str, Any]:
    g = self.model.geometry
    return {
        "workdir": self.model.workdir.name, "step": self.model.step,
        "height": g.image, "width": g.image, "step_px": g.step_px,
        "classes": [{"id": i, "name": n, "rgb": [int(c) for c in rgb]}
                    for i, (n, rgb) in enumerate(zip(self.names,
                                                     self.colours))],
        "dont_care": {"id": IGNORE_ID,
                      "rgb": [0, 0, 0] if self.black_is_free else None},
        "samplers": list(samplers.SAMPLERS),
        "defaults": {"sampler": self.defaults["sampler"],
                     "steps": self.defaults["steps"],
                     "guidance_scale": self.defaults["guidance_scale"],
                     "seed": 0, "count": 1},
        "max_count": MAX_COUNT,
    }

  def status(self) -> dict[str, Any]:
    with self._state:
      job = dict(self._job) if self._job else None
      waiting = max(0, self._admitted - (1 if job else 0))
    if job:
      job["elapsed_s"] = round(time.monotonic() - job.pop("started"), 2)
    return {"running": job, "waiting": waiting,
            "last_seconds": self.last_seconds}

  # -- Uploads ----------------------------------------------------------------

  @contextlib.contextmanager
  def _as_file(self, data: bytes, filename: str) -> Iterator[pathlib.Path]:
    """An upload as a file named like the user's, so that the readers'
    messages name it (and not a temporary folder)."""
    name = pathlib.Path(filename or "upload").name or "upload"
    if not data:
      raise errors.InputError(f"{name} is empty")
    with tempfile.TemporaryDirectory(prefix="segldm-ui-") as tmp:
      path = pathlib.Path(tmp) / name
      path.write_bytes(data)
      try:
        yield path
      except DataError as e:
        raise errors.InputError(str(e).replace(f"{tmp}/", "")) from None

  def read_labels(self, data: bytes, filename: str = "mask.png"
                  ) -> np.ndarray:
    """A label PNG -> uint8 ids (H, W): grey values are ids (255 = don't
    care); colours must be the run's palette colours (black = don't care)."""
    with self._as_file(data, filename) as path:
      mode = _image_mode(path)
      ids = mode in ("L", "P", "1") or mode.startswith("I")
      labels = folder.read_mask(
          str(path), self._id_spec if ids else self._colour_spec)
    step = self.model.geometry.step_px
    h, w = labels.shape
    if h % step or w % step:
      fits = " or ".join(f"{a}x{b}" for a, b in sorted(set(
          masks_lib.nearest_sizes(h, w, step))))
      raise errors.InputError(
          f"{path.name} is {h}x{w} (height x width); this model needs sides "
          f"in multiples of {step}: resize it to {fits}")
    return labels

  def read_photo(self, data: bytes, filename: str,
                 shape: tuple[int, int]) -> np.ndarray:
    """A photo -> uint8 (H, W, 3) at its label map's size."""
    with self._as_file(data, filename) as path:
      _image_mode(path)
      return masks_lib.read_photo(path, shape)

  def colourise(self, labels: np.ndarray) -> np.ndarray:
    return palette_lib.colorize(labels, self.colours)

  # -- Requests ---------------------------------------------------------------

  @contextlib.contextmanager
  def _turn(self, kind: str, total: int) -> Iterator[Callable[[int, int],
                                                              None]]:
    with self._state:
      if self._admitted > self.max_queue:
        raise BusyError(
            f"busy: one request is running and {self._admitted - 1} "
            f"waiting (at most {self.max_queue}); try again when the images "
            "appear")
      self._admitted += 1
    try:
      with self._lane:
        start = time.monotonic()
        with self._state:
          self._job = {"kind": kind, "done": 0, "total": total,
                       "started": start}

        def progress(done: int, of: int) -> None:
          with self._state:
            self._job.update(done=done, total=of)

        try:
          yield progress
        finally:
          with self._state:
            self._job = None
          self.last_seconds = round(time.monotonic() - start, 3)
    finally:
      with self._state:
        self._admitted -= 1

  def generate(self, labels: np.ndarray, options: Options) -> np.ndarray:
    """ids (H, W) -> uint8 (count, H, W, 3), as `sample.py --num_samples
    count --seed seed` makes them."""
    self.model.check_size(labels)
    batches = -(-options.count // self.batch_size)
    with self._turn("generate", batches) as progress:
      return self.model.sample(labels, num_samples=options.count,
                               seed=options.seed, batch_size=self.batch_size,
                               progress=progress, **options.sample_kwargs())[0]

  def edit(self, photo: np.ndarray, labels: np.ndarray,
           new_labels: np.ndarray, options: Options) -> np.ndarray:
    """Regenerates where the labels changed -> uint8 (count, H, W, 3)."""
    if labels.shape != new_labels.shape:
      raise errors.InputError(
          f"the edited labels are {new_labels.shape[0]}x"
          f"{new_labels.shape[1]} but the photo's are {labels.shape[0]}x"
          f"{labels.shape[1]} (height x width)")
    with self._turn("edit", options.count) as progress:
      return self.model.edit(photo, labels, new_labels,
                             num_samples=options.count, seed=options.seed,
                             progress=progress, **options.sample_kwargs())

  def warm_up(self, count: int = 1) -> float:
    """Compiles the default request (a blank canvas at the training size)
    so that the first Generate does not wait for XLA -> seconds taken."""
    g = self.model.geometry
    start = time.monotonic()
    self.generate(np.full((g.image, g.image), IGNORE_ID, np.uint8),
                  Options.parse(self.defaults, count=count))
    return time.monotonic() - start
