"""serve.py's HTTP API without a browser: a mask in, PNGs out.

The model is the reference's ldm_tiny fixture converted into a workdir (a
"released model" path: 32x32 images, 5 classes, step_px 8), sampled with 4
DDIM steps and 2 images per request, so that one compiled program serves
every request here and sample.py's run in the same process.
"""

import base64
import io
import json
import threading

from fastapi import testclient
import numpy as np
import pytest
from PIL import Image

from segldm_jax.inference import trained_model
from segldm_jax.runtime import xla_cpu
from segldm_jax.ui import server
from segldm_jax.ui import studio as studio_lib

OPTIONS = {"sampler": "ddim", "steps": "4", "seed": "3", "count": "2"}


@pytest.fixture(scope="module")
def lab(ldm_tiny_workdir):
  model = trained_model.load(ldm_tiny_workdir, conv=xla_cpu.preferred_conv())
  return studio_lib.Studio(model, max_queue=0)


@pytest.fixture(scope="module")
def client(lab):
  # Faults come back as 500s, as a browser would see them. The page's own
  # address, as serve.py serves it.
  return testclient.TestClient(server.create_app(lab, port=7860),
                               base_url="http://127.0.0.1:7860",
                               raise_server_exceptions=False)


def _png(array) -> bytes:
  return studio_lib.png_bytes(np.asarray(array, np.uint8))


def _two_regions() -> np.ndarray:
  """32x48 (a non-square canvas): class 1 left, class 3 right, a "don't
  care" band between."""
  ids = np.full((32, 48), 1, np.uint8)
  ids[:, 24:] = 3
  ids[:, 20:28] = 255
  return ids


def _decode(url: str) -> np.ndarray:
  prefix = "data:image/png;base64,"
  assert url.startswith(prefix)
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix):]))))


def _post_mask(client, data: bytes, name="mask.png", **fields):
  return client.post("/api/generate", files={"mask": (name, data)},
                     data={**OPTIONS, **fields})


def test_info_lists_classes_size_and_defaults(client):
  info = client.get("/api/info").json()
  assert (info["height"], info["width"], info["step_px"]) == (32, 32, 8)
  assert [c["name"] for c in info["classes"]] == [f"class {k}"
                                                  for k in range(5)]
  assert info["classes"][1]["rgb"] == [0, 128, 0]  # the generic palette
  assert info["dont_care"] == {"id": 255, "rgb": [0, 0, 0]}
  assert info["defaults"]["sampler"] == "ddim"


def test_generate_gives_sample_py_pixels(client, ldm_tiny_workdir, tmp_path,
                                         capsys):
  import sample  # pylint: disable=g-import-not-at-top
  ids = _two_regions()
  (tmp_path / "painted.png").write_bytes(_png(ids))
  got = _post_mask(client, _png(ids), "painted.png")
  assert got.status_code == 200, got.text
  body = got.json()
  images = [_decode(u) for u in body["images"]]
  assert [im.shape for im in images] == [(32, 48, 3)] * 2
  np.testing.assert_array_equal(_decode(body["mask"]), ids)
  assert body["options"] == {"sampler": "ddim", "steps": 4,
                             "guidance_scale": 1.0, "seed": 3, "count": 2}

  capsys.readouterr()
  assert sample.main(["--workdir", str(ldm_tiny_workdir), "--masks",
                      str(tmp_path / "painted.png"), "--sampler", "ddim",
                      "--steps", "4", "--seed", "3", "--num_samples", "2",
                      "--out", str(tmp_path / "cli")]) == 0
  assert json.loads(capsys.readouterr().out.splitlines()[-1])["samples"] == 2
  for k, image in enumerate(images):
    cli = np.asarray(Image.open(tmp_path / "cli" / f"painted_{k}.png"))
    # One process, one compiled program: equal but for (at most) a uint8
    # level of rounding on a few values, as for any two runs of a sampler.
    diff = np.abs(cli.astype(int) - image)
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3
  # Different samples of one mask differ.
  assert np.abs(images[0].astype(int) - images[1]).mean() > 1


def test_coloured_mask_reads_as_its_ids(client, lab):
  ids = _two_regions()
  got = client.post("/api/labels", files={"mask": (
      "colours.png", _png(lab.colourise(ids)))})
  assert got.status_code == 200, got.text
  body = got.json()
  assert (body["height"], body["width"]) == (32, 48)
  np.testing.assert_array_equal(
      np.frombuffer(base64.b64decode(body["ids"]), np.uint8).reshape(32, 48),
      ids)  # black reads back as "don't care"


@pytest.mark.parametrize("name,data,message", [
    ("odd.png", _png(np.zeros((30, 32))),
     "odd.png is 30x32 (height x width); this model needs sides in "
     "multiples of 8: resize it to 24x32 or 32x32"),
    ("paint.png", _png(np.full((32, 32, 3), (10, 200, 30))),
     "paint.png: 1024 pixels are no palette colour (within "
     "palette_tolerance=30) and no blend of the regions beside them, the "
     "first at (y=0, x=0): (10, 200, 30); "),
    ("ids.png", _png(np.full((32, 32), 7)),
     "ids.png: label value 7 is out of range for num_classes=5"),
    ("notes.txt", b"not a picture", "notes.txt is not an image (PNG, JPEG, "
     "...)"),
    ("empty.png", b"", "empty.png is empty"),
])
def test_bad_mask_is_one_clear_line(client, name, data, message):
  got = _post_mask(client, data, name)
  assert got.status_code == 400
  assert got.json()["error"].startswith(message)


def test_bad_options_and_photo_are_one_clear_line(client):
  ids = _png(_two_regions())
  got = _post_mask(client, ids, steps="many")
  assert (got.status_code, got.json()["error"]) == (
      400, "steps: Input should be a valid integer, unable to parse string "
      "as an integer")
  got = _post_mask(client, ids, seed="-1")
  assert (got.status_code, got.json()["error"]) == (
      400, "seed -1: use 0 to 2147483647")
  got = _post_mask(client, ids, count="99")
  assert (got.status_code, got.json()["error"]) == (400,
                                                    "count 99: use 1 to 16")
  edited = _two_regions()
  edited[:8, :8] = 4
  got = client.post("/api/edit", files={
      "photo": ("photo.jpg", b"\xff\xd8 truncated"), "labels": ("a.png", ids),
      "new_labels": ("b.png", _png(edited))}, data=OPTIONS)
  assert (got.status_code, got.json()["error"]) == (
      400, "photo.jpg is not an image (PNG, JPEG, ...)")
  # Nothing to edit is said before the photo is read.
  got = client.post("/api/edit", files={
      "photo": ("photo.jpg", b"\xff\xd8 truncated"), "labels": ("a.png", ids),
      "new_labels": ("b.png", ids)}, data=OPTIONS)
  assert (got.status_code, got.json()["error"]) == (
      400, "the edited labels have the same labels as the photo's: nothing "
      "to edit")


def test_second_request_while_one_runs_is_refused_then_served(client, lab):
  ids = _png(_two_regions())
  entered, release = threading.Event(), threading.Event()
  first = {}
  generate = lab.generate

  def slow_generate(*args, **kwargs):  # holds the lane like a long request
    entered.set()
    release.wait(60)
    return generate(*args, **kwargs)

  lab.generate = slow_generate
  try:
    thread = threading.Thread(target=lambda: first.update(
        r=_post_mask(client, ids)))
    thread.start()
    assert entered.wait(60)
    status = client.get("/api/status").json()
    assert status["running"]["kind"] == "generate"
    busy = _post_mask(client, ids)
    assert busy.status_code == 503
    assert busy.json()["error"] == (
        "busy: one request is running and 0 waiting (at most 0); try again "
        "when the images appear")
  finally:
    release.set()
    thread.join(120)
    del lab.generate
  assert first["r"].status_code == 200
  assert _post_mask(client, ids).status_code == 200  # and it keeps serving


def test_a_fault_is_500_and_the_server_keeps_serving(client, lab):
  def broken(*args, **kwargs):
    raise RuntimeError("boom")

  lab.generate = broken
  try:
    got = _post_mask(client, _png(_two_regions()))
  finally:
    del lab.generate
  assert got.status_code == 500
  assert got.json()["error"] == ("internal error: RuntimeError: boom (the "
                                 "server log has the traceback)")
  assert client.get("/api/status").json()["running"] is None
  assert _post_mask(client, _png(_two_regions())).status_code == 200


def test_edit_keeps_the_photo_outside_the_changed_region(client, lab):
  old = _two_regions()
  new = old.copy()
  new[:16, :16] = 4  # repaint the top-left corner
  photo = np.asarray(Image.new("RGB", (48, 32), (90, 140, 200)))
  buf = io.BytesIO()
  Image.fromarray(photo).save(buf, format="JPEG", quality=100)
  got = client.post("/api/edit", files={
      "photo": ("photo.jpg", buf.getvalue()), "labels": ("old.png", _png(old)),
      "new_labels": ("new.png", _png(new))}, data=OPTIONS)
  assert got.status_code == 200, got.text
  images = [_decode(u) for u in got.json()["images"]]
  assert len(images) == 2
  decoded = np.asarray(Image.open(buf))
  for image in images:
    # Far from the repainted corner (beyond the 2 x factor margin), the
    # photo is kept exactly.
    np.testing.assert_array_equal(image[:, 32:], decoded[:, 32:])
    assert np.abs(image[:8, :8].astype(int) - decoded[:8, :8]).max() > 0
