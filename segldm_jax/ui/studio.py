"""What the web page asks of a model, without the web: uploads made ids and
photos, samples and edits made PNGs, one request at a time.

`serve.py` wraps a `Studio` in HTTP (`ui/server.py`); tests and notebooks can
drive it directly. Every request takes its `turn` in one lane: reading its
uploads, sampling and encoding its answer all happen inside it, so at most
one request holds memory for pictures at a time and at most `max_queue`
wait (each holding only its spooled upload). Uploads are checked from their
header first (`uploads.open_image`: at most `max_pixels` pixels).

Pixels are exactly `sample.py`'s for the same mask, seed and options: both
run `generation.generate` on the same batches with the same keys
(`generation.sample_in_batches`); the server keeps its compiled programs in
a bounded LRU (`programs.Programs`) in which the guidance scale and the seed
are inputs, not constants.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import threading
import time
from typing import Any, BinaryIO, Callable, Iterator

import jax
import numpy as np
from PIL import Image

from segldm_jax import errors
from segldm_jax.data import palette as palette_lib
from segldm_jax.data.base import IGNORE_ID
from segldm_jax.data.labels import LabelSpec
from segldm_jax.diffusion import samplers
from segldm_jax.inference import generation
from segldm_jax.inference import region_edit
from segldm_jax.ui import programs as programs_lib
from segldm_jax.ui import uploads

MAX_COUNT = 16       # images per request: a page, not a batch job
MAX_GUIDANCE = 50.0
TRAINING_AREAS = 4   # default --max_pixels: this many training-size images
MAX_PROGRAMS = 8     # default --max_programs
PALETTE_TOLERANCE = 30.0  # as sample.py --palette_tolerance

Upload = bytes | BinaryIO
Progress = Callable[[int, int], None]


class BusyError(errors.UserError):
  """The queue is full: the request was not taken."""


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
  def parse(cls, defaults: dict[str, Any], num_timesteps: int,
            sampler: str | None = None, steps: int | None = None,
            guidance_scale: float | None = None, seed: int | None = None,
            count: int | None = None) -> "Options":
    sampler = sampler or defaults["sampler"]
    if sampler not in samplers.SAMPLERS:
      raise errors.InputError(f"sampler {sampler!r}: use one of "
                              f"{', '.join(samplers.SAMPLERS)}")
    steps = int(defaults["steps"] if steps is None else steps)
    try:
      samplers.check_steps(sampler, steps, num_timesteps)
    except ValueError as e:
      raise errors.InputError(str(e)) from None
    scale = float(defaults["guidance_scale"] if guidance_scale is None
                  else guidance_scale)
    if not 0.0 <= scale <= MAX_GUIDANCE:
      raise errors.InputError(f"guidance scale {scale:g}: use 0 to "
                              f"{MAX_GUIDANCE:g} (1 = no guidance)")
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
    max_pixels: the most pixels an uploaded picture may have (checked from
      its header); default TRAINING_AREAS training-size images.
    max_programs: compiled programs kept (least recently used dropped).
    palette_tolerance: as sample.py's, for masks uploaded in colours.
  """

  def __init__(self, model, *, batch_size: int = 8, max_queue: int = 4,
               max_pixels: int | None = None,
               max_programs: int = MAX_PROGRAMS,
               palette_tolerance: float = PALETTE_TOLERANCE):
    self.model = model
    self.batch_size = batch_size
    self.max_queue = max_queue
    g = model.geometry
    self.max_pixels = int(max_pixels or TRAINING_AREAS * g.image * g.image)
    self.programs = programs_lib.Programs(max_programs)
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
        model.num_classes, ignore_label=IGNORE_ID, palette=table,
        palette_tolerance=palette_tolerance)
    self.defaults = model.sample_options()
    self._lane = threading.Lock()      # held by the request that runs
    self._state = threading.Lock()     # guards the fields below
    self._admitted = 0                 # running + waiting
    self._job: dict[str, Any] | None = None
    self.last_seconds: float | None = None

  # -- What the page shows ---------------------------------------------------

  def info(self) -> dict[str, Any]:
    g, t = self.model.geometry, self.model.num_timesteps
    return {
        "workdir": self.model.workdir.name, "step": self.model.step,
        "height": g.image, "width": g.image, "step_px": g.step_px,
        "max_pixels": self.max_pixels,
        "classes": [{"id": i, "name": n, "rgb": [int(c) for c in rgb]}
                    for i, (n, rgb) in enumerate(zip(self.names,
                                                     self.colours))],
        "dont_care": {"id": IGNORE_ID,
                      "rgb": [0, 0, 0] if self.black_is_free else None},
        "samplers": list(samplers.SAMPLERS),
        "steps": {s: {"ranges": [list(r) for r in samplers.step_ranges(s, t)],
                      "text": samplers.describe_steps(s, t)}
                  for s in samplers.SAMPLERS},
        "defaults": {"sampler": self.defaults["sampler"],
                     "steps": self.defaults["steps"],
                     "guidance_scale": self.defaults["guidance_scale"],
                     "seed": 0, "count": 1},
        "max_count": MAX_COUNT, "max_guidance": MAX_GUIDANCE,
    }

  def status(self) -> dict[str, Any]:
    with self._state:
      job = dict(self._job) if self._job else None
      waiting = max(0, self._admitted - (1 if job else 0))
    if job:
      job["elapsed_s"] = round(time.monotonic() - job.pop("started"), 2)
    return {"running": job, "waiting": waiting,
            "last_seconds": self.last_seconds,
            "programs": {"kept": len(self.programs),
                         "compiled": self.programs.compiled,
                         "dropped": self.programs.evicted}}

  def parse_options(self, **fields) -> Options:
    return Options.parse(self.defaults, self.model.num_timesteps, **fields)

  # -- Uploads (call inside a turn: they decode) -----------------------------

  def read_labels(self, data: Upload, filename: str | None = None,
                  role: str = "the mask") -> np.ndarray:
    """A label picture -> uint8 ids (H, W): grey values are ids (255 =
    don't care); colours are the run's palette colours (black = don't
    care), read as sample.py --palette reads them."""
    name = uploads.display_name(filename, role)
    image = uploads.open_image(data, name, self.max_pixels)
    uploads.check_size(image.size[::-1], name, self.model.geometry.step_px,
                       self.max_pixels)
    return uploads.decode_labels(image, name, self._id_spec,
                                 self._colour_spec)

  def read_photo(self, data: Upload, filename: str | None,
                 shape: tuple[int, int]) -> np.ndarray:
    """A photo -> uint8 (H, W, 3) at its label map's size."""
    name = uploads.display_name(filename, "the photo")
    return uploads.decode_photo(
        uploads.open_image(data, name, self.max_pixels), name, shape)

  def colourise(self, labels: np.ndarray) -> np.ndarray:
    return palette_lib.colorize(labels, self.colours)

  # -- Requests ---------------------------------------------------------------

  @contextlib.contextmanager
  def turn(self, kind: str, total: int = 1) -> Iterator[Progress]:
    """Admits a request (or raises BusyError), waits for the lane, and
    yields its `progress(done, total)` for /api/status."""
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

  def _program(self, fn, kind: str, arrays: tuple, options: dict[str, Any]):
    """The compiled `fn` (generate or edit) for these shapes and options,
    called with the guidance scale as an input."""
    shapes = tuple(tuple(np.shape(a)) for a in arrays)
    key = (kind, shapes, options["sampler"], options["steps"],
           options["eta"], options["guidance_scale"] != 1.0)
    m = self.model
    program = self.programs.get(key, lambda: fn.lower(
        m.ldm, m.params, m.first_stage_params, *arrays, jax.random.key(0),
        **options))
    scale = generation.guidance_input(options["guidance_scale"])
    return lambda *args: program(m.params, m.first_stage_params, *args,
                                 guidance_scale=scale)

  def generate(self, labels: np.ndarray, options: Options,
               progress: Progress | None = None) -> np.ndarray:
    """ids (H, W) -> uint8 (count, H, W, 3), as `sample.py --num_samples
    count --seed seed` makes them. Call inside a `turn`."""
    m = self.model
    m.check_size(labels)
    opts = m.sample_options(**options.sample_kwargs())

    def run(ldm, params, first_stage_params, batch, key):
      del ldm, params, first_stage_params  # the program holds them
      return self._program(generation.generate, "generate", (batch,),
                           opts)(batch, key)

    return generation.sample_in_batches(
        run, m.ldm, m.params, m.first_stage_params, labels[None],
        options.count, self.batch_size, jax.random.key(options.seed),
        progress=progress)[0]

  def edit(self, photo: np.ndarray, labels: np.ndarray,
           new_labels: np.ndarray, options: Options,
           progress: Progress | None = None) -> np.ndarray:
    """Regenerates where the labels changed -> uint8 (count, H, W, 3), as
    `TrainedModel.edit` does. Call inside a `turn`."""
    m = self.model
    keep, weight = self.edit_region(labels, new_labels)
    opts = m.sample_options(**options.sample_kwargs())
    regenerate = self._program(generation.regenerate_region, "edit", (
        photo[None], new_labels[None], keep), opts)
    return region_edit.paste_samples(
        regenerate, photo, new_labels, keep, weight,
        jax.random.key(options.seed), options.count, progress)

  def edit_region(self, labels: np.ndarray, new_labels: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(keep, paste weight) of an edit (`region_edit.edit_masks`), or one
    line saying why there is nothing to edit: checked before the photo is
    read."""
    if labels.shape != new_labels.shape:
      raise errors.InputError(
          f"the edited labels are {new_labels.shape[0]}x"
          f"{new_labels.shape[1]} but the photo's are {labels.shape[0]}x"
          f"{labels.shape[1]} (height x width)")
    self.model.check_size(labels)
    keep, weight = region_edit.edit_masks(
        labels, new_labels, self.model.ldm.downsample_factor,
        2 * self.model.ldm.downsample_factor)
    if keep.min() == 1.0:
      raise errors.InputError("the edited labels have the same labels as "
                              "the photo's: nothing to edit")
    return keep, weight

  def warm_up(self, count: int = 1) -> float:
    """Compiles the default request (a blank canvas at the training size)
    so that the first Generate does not wait for XLA -> seconds taken."""
    g = self.model.geometry
    start = time.monotonic()
    with self.turn("warm-up") as progress:
      self.generate(np.full((g.image, g.image), IGNORE_ID, np.uint8),
                    self.parse_options(count=count), progress)
    return time.monotonic() - start

