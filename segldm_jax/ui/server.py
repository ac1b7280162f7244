"""The HTTP face of a `Studio`: the painting page and a small JSON API.

  GET  /                 the page (static/index.html, app.js, style.css)
  GET  /api/info         classes (id, name, colour), canvas size, defaults
  GET  /api/status       the running request's progress and the queue
  POST /api/labels       form: mask (PNG) -> {height, width, ids (base64)}
  POST /api/generate     form: mask (PNG), sampler, steps, guidance_scale,
                         seed, count -> {images: [PNG data URLs], ...}
  POST /api/edit         form: photo, labels, new_labels (PNGs) + the same
                         options -> {images: [...]} (only the changed region
                         is regenerated)

Masks are greyscale PNGs of ids (255 = don't care) or PNGs in the run's
palette colours (black = don't care). Errors come back as {"error": one
line} with 400 (bad input), 503 (queue full) or 500 (a fault of ours, whose
traceback goes to the server's log); the server keeps serving either way.
Sampling runs in FastAPI's worker threads, one at a time (`Studio`).
"""

from __future__ import annotations

import base64
import logging
import pathlib
import time
from typing import Any

import fastapi
from fastapi import exceptions
from fastapi import responses
from fastapi import staticfiles

from segldm_jax import errors
from segldm_jax import formatting
from segldm_jax.ui import studio as studio_lib

STATIC = pathlib.Path(__file__).parent / "static"
log = logging.getLogger("segldm_jax.ui")


def create_app(studio: studio_lib.Studio) -> fastapi.FastAPI:
  app = fastapi.FastAPI(title="segldm-jax", docs_url="/api/docs",
                        redoc_url=None)
  app.mount("/static", staticfiles.StaticFiles(directory=STATIC),
            name="static")

  @app.exception_handler(errors.UserError)
  def _user_error(request, exc: errors.UserError):
    del request
    status = 503 if isinstance(exc, studio_lib.BusyError) else 400
    return responses.JSONResponse({"error": formatting.one_line(str(exc))},
                                  status_code=status)

  @app.exception_handler(exceptions.RequestValidationError)
  def _bad_form(request, exc: exceptions.RequestValidationError):
    del request
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
    return responses.JSONResponse(
        {"error": f"{field}: {formatting.one_line(first.get('msg', ''))}"},
        status_code=400)

  @app.exception_handler(Exception)
  def _fault(request, exc: Exception):
    log.error("request %s failed", request.url.path, exc_info=exc)
    return responses.JSONResponse(
        {"error": f"internal error: {formatting.describe_error(exc)} (the "
                  "server log has the traceback)"}, status_code=500)

  @app.get("/", include_in_schema=False)
  def page():
    return responses.FileResponse(STATIC / "index.html")

  @app.get("/api/info")
  def info() -> dict[str, Any]:
    return studio.info()

  @app.get("/api/status")
  def status() -> dict[str, Any]:
    return studio.status()

  @app.post("/api/labels")
  def labels(mask: fastapi.UploadFile) -> dict[str, Any]:
    ids = studio.read_labels(mask.file.read(), mask.filename)
    return {"height": ids.shape[0], "width": ids.shape[1],
            "ids": base64.b64encode(ids.tobytes()).decode("ascii")}

  def options(sampler: str | None = fastapi.Form(None),
              steps: int | None = fastapi.Form(None),
              guidance_scale: float | None = fastapi.Form(None),
              seed: int | None = fastapi.Form(None),
              count: int | None = fastapi.Form(None)) -> studio_lib.Options:
    """The form's sampling fields (each optional), checked."""
    return studio_lib.Options.parse(studio.defaults, sampler, steps,
                                    guidance_scale, seed, count)

  def answer(images, ids, opts, start) -> dict[str, Any]:
    return {
        "images": [studio_lib.data_url(studio_lib.png_bytes(im))
                   for im in images],
        "mask": studio_lib.data_url(studio_lib.png_bytes(ids)),
        "mask_colour": studio_lib.data_url(studio_lib.png_bytes(
            studio.colourise(ids))),
        "height": int(ids.shape[0]), "width": int(ids.shape[1]),
        "options": {**opts.sample_kwargs(), "seed": opts.seed,
                    "count": opts.count},
        "seconds": round(time.monotonic() - start, 3),
    }

  @app.post("/api/generate")
  def generate(mask: fastapi.UploadFile,
               opts: studio_lib.Options = fastapi.Depends(options)
               ) -> dict[str, Any]:
    start = time.monotonic()
    ids = studio.read_labels(mask.file.read(), mask.filename)
    return answer(studio.generate(ids, opts), ids, opts, start)

  @app.post("/api/edit")
  def edit(photo: fastapi.UploadFile, labels: fastapi.UploadFile,
           new_labels: fastapi.UploadFile,
           opts: studio_lib.Options = fastapi.Depends(options)
           ) -> dict[str, Any]:
    start = time.monotonic()
    old = studio.read_labels(labels.file.read(), labels.filename)
    new = studio.read_labels(new_labels.file.read(), new_labels.filename)
    image = studio.read_photo(photo.file.read(), photo.filename, old.shape)
    return answer(studio.edit(image, old, new, opts), new, opts, start)

  return app
