"""The HTTP face of a `Studio`: the painting page and a small JSON API.

  GET  /                 the page (static/index.html, app.js, style.css)
  GET  /api/info         classes (id, name, colour), canvas size, step
                         ranges per sampler, pixel cap, defaults
  GET  /api/status       the running request's progress, the queue, the
                         compiled programs kept
  POST /api/labels       form: mask (PNG) -> {height, width, ids (base64)}
  POST /api/generate     form: mask (PNG), sampler, steps, guidance_scale,
                         seed, count -> {images: [PNG data URLs], ...}
  POST /api/edit         form: photo, labels, new_labels (PNGs) + the same
                         options -> {images: [...]} (only the changed region
                         is regenerated)
  GET  /api/docs         this list as a page (no scripts: works offline);
                         /api/openapi.json the same as OpenAPI

Masks are greyscale PNGs of ids (255 = don't care) or PNGs in the run's
palette colours (black = don't care). Errors come back as {"error": one
line} with 400 (bad input, a Host that is not this server's), 403 (a POST
from another site's page), 411/413 (a body without a length or too large),
503 (queue full) or 500 (a fault of ours, whose traceback goes to the
server's log); the server keeps serving either way. Requests run in
FastAPI's worker threads, one at a time, reading their uploads inside their
turn (`Studio.turn`).
"""

from __future__ import annotations

import base64
import html
import logging
import pathlib
import time
from typing import Any, Iterable

import fastapi
from fastapi import exceptions
from fastapi import responses
from fastapi import staticfiles

from segldm_jax import errors
from segldm_jax import formatting
from segldm_jax.ui import guard as guard_lib
from segldm_jax.ui import studio as studio_lib
from segldm_jax.ui import uploads

STATIC = pathlib.Path(__file__).parent / "static"
log = logging.getLogger("segldm_jax.ui")


def create_app(studio: studio_lib.Studio, *, host: str = "127.0.0.1",
               port: int = 7860, allow_origins: Iterable[str] = ()
               ) -> fastapi.FastAPI:
  """The app serving `studio` at http://host:port/ (the names and origins
  `guard.Guard` lets in)."""
  guard_lib.parse_origins(allow_origins)  # a bad one: said now, not later
  app = fastapi.FastAPI(title="segldm-jax", docs_url=None, redoc_url=None,
                        openapi_url="/api/openapi.json")
  app.add_middleware(guard_lib.Guard, host=host, port=port,
                     allow_origins=tuple(allow_origins),
                     max_body=3 * uploads.max_bytes(studio.max_pixels)
                     + (1 << 20))
  app.mount("/static", staticfiles.StaticFiles(directory=STATIC),
            name="static")
  _add_error_handlers(app)
  _add_pages(app, studio)
  _add_requests(app, studio)
  return app


def _add_error_handlers(app: fastapi.FastAPI) -> None:
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


def _add_pages(app: fastapi.FastAPI, studio: studio_lib.Studio) -> None:
  @app.get("/", include_in_schema=False)
  def page():
    return responses.FileResponse(STATIC / "index.html")

  @app.get("/api/docs", include_in_schema=False)
  def docs():
    return responses.HTMLResponse(_docs_page(app))

  @app.get("/api/info")
  def info() -> dict[str, Any]:
    """Classes (id, name, rgb), canvas size and step_px, the steps each
    sampler takes, max_pixels, defaults."""
    return studio.info()

  @app.get("/api/status")
  def status() -> dict[str, Any]:
    """The running request (kind, done, total, elapsed_s), how many wait,
    the compiled programs kept."""
    return studio.status()


def _add_requests(app: fastapi.FastAPI, studio: studio_lib.Studio) -> None:
  def options(sampler: str | None = fastapi.Form(None),
              steps: int | None = fastapi.Form(None),
              guidance_scale: float | None = fastapi.Form(None),
              seed: int | None = fastapi.Form(None),
              count: int | None = fastapi.Form(None)) -> studio_lib.Options:
    """The form's sampling fields (each optional), checked."""
    return studio.parse_options(sampler=sampler, steps=steps,
                                guidance_scale=guidance_scale, seed=seed,
                                count=count)

  def answer(images, ids, opts, start) -> dict[str, Any]:
    png = studio_lib.png_bytes
    return {
        "images": [studio_lib.data_url(png(im)) for im in images],
        "mask": studio_lib.data_url(png(ids)),
        "mask_colour": studio_lib.data_url(png(studio.colourise(ids))),
        "height": int(ids.shape[0]), "width": int(ids.shape[1]),
        "options": {**opts.sample_kwargs(), "seed": opts.seed,
                    "count": opts.count},
        "seconds": round(time.monotonic() - start, 3),
    }

  @app.post("/api/labels")
  def labels(mask: fastapi.UploadFile) -> dict[str, Any]:
    """Form field mask: a label picture -> {height, width, ids: base64
    uint8, row-major}."""
    with studio.turn("labels"):
      ids = studio.read_labels(mask.file, mask.filename)
      return {"height": ids.shape[0], "width": ids.shape[1],
              "ids": base64.b64encode(ids.tobytes()).decode("ascii")}

  @app.post("/api/generate")
  def generate(mask: fastapi.UploadFile,
               opts: studio_lib.Options = fastapi.Depends(options)
               ) -> dict[str, Any]:
    """Form fields mask and sampler, steps, guidance_scale, seed, count ->
    {images: PNG data URLs, mask, mask_colour, options, seconds}."""
    start = time.monotonic()
    with studio.turn("generate") as progress:
      ids = studio.read_labels(mask.file, mask.filename)
      return answer(studio.generate(ids, opts, progress), ids, opts, start)

  @app.post("/api/edit")
  def edit(photo: fastapi.UploadFile, labels: fastapi.UploadFile,
           new_labels: fastapi.UploadFile,
           opts: studio_lib.Options = fastapi.Depends(options)
           ) -> dict[str, Any]:
    """Form fields photo, labels (the photo's), new_labels and the
    options of /api/generate -> the same answer, the photo kept outside
    the repainted region."""
    start = time.monotonic()
    with studio.turn("edit", opts.count) as progress:
      old = studio.read_labels(labels.file, labels.filename,
                               "the photo's labels")
      new = studio.read_labels(new_labels.file, new_labels.filename,
                               "the edited labels")
      studio.edit_region(old, new)  # nothing to edit: said before decoding
      image = studio.read_photo(photo.file, photo.filename, old.shape)
      return answer(studio.edit(image, old, new, opts, progress), new, opts,
                    start)


def _docs_page(app: fastapi.FastAPI) -> str:
  """The API as plain HTML from the routes' docstrings (no scripts, no
  network: Swagger UI would load its script from a CDN)."""
  rows = []
  for route in app.routes:
    if not getattr(route, "include_in_schema", False):
      continue
    doc = " ".join((route.endpoint.__doc__ or "").split())
    for method in sorted(route.methods):
      rows.append(f"<tr><td>{method}</td><td><code>{html.escape(route.path)}"
                  f"</code></td><td>{html.escape(doc)}</td></tr>")
  return ("<!doctype html><meta charset=utf-8><title>segldm-jax API</title>"
          "<h1>segldm-jax API</h1><p>Errors are {\"error\": one line}. "
          "Machine-readable: <a href=/api/openapi.json>/api/openapi.json</a>"
          "</p><table border=1 cellpadding=4><tr><th>method<th>path"
          "<th>what</tr>" + "".join(rows) + "</table>")
