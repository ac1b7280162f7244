"""serve.py probed as a careless or hostile user would (issue 26), in
process: the converted ldm_tiny (32x32 images, 5 classes, step_px 8, so
--max_pixels defaults to 4 x 32 x 32 = 4096).

Memory is the process's peak RSS (VmHWM) after resetting it
(/proc/self/clear_refs): the app runs in this process. The server as a
process, under load, is tests/test_serve_load.py.
"""

import base64
import io
import json
import threading
import time

from fastapi import testclient
import jax
import numpy as np
import pytest
from PIL import Image

from segldm_jax.data.pixel_range import model_range_to_images
from segldm_jax.inference import generation
from segldm_jax.inference import trained_model
from segldm_jax.runtime import xla_cpu
from segldm_jax.ui import probe
from segldm_jax.ui import server
from segldm_jax.ui import studio as studio_lib

OPTIONS = {"sampler": "ddim", "steps": "4", "seed": "3", "count": "2"}
URL = "http://127.0.0.1:7860"
MB = 1024


@pytest.fixture(scope="module")
def lab(ldm_tiny_workdir):
  model = trained_model.load(ldm_tiny_workdir, conv=xla_cpu.preferred_conv())
  return studio_lib.Studio(model, max_queue=4)


@pytest.fixture(scope="module")
def client(lab):
  return testclient.TestClient(server.create_app(lab, port=7860),
                               base_url=URL, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def bomb() -> bytes:
  """13376 x 13376 grey pixels in a 174 KB PNG (just under the image
  decoder's own limit), written row by row."""
  data = probe.streamed_png(13376, 13376)
  assert len(data) < 200_000
  return data


def _mask() -> np.ndarray:
  ids = np.full((32, 48), 1, np.uint8)
  ids[:, 24:] = 3
  return ids


def _post(client, path, fields, headers=None):
  body, content_type = probe.multipart(fields)
  return client.post(path, content=body, headers={
      "Content-Type": content_type, **(headers or {})})


def _peak_kb() -> int:
  return probe.memory_kb(pid="self")["peak"]


def _error(response) -> tuple[int, str]:
  return response.status_code, response.json()["error"]


# -- 1, 2: sizes from the header, decoding inside the lane ------------------


def test_oversized_masks_are_refused_from_the_header(client, bomb):
  for path in ("/api/labels", "/api/generate"):
    probe.reset_peak("self")
    before, start = _peak_kb(), time.monotonic()
    got = _post(client, path, {"mask": ("bomb.png", bomb), **OPTIONS})
    seconds = time.monotonic() - start
    assert _error(got) == (400, (
        "bomb.png is 13376x13376 (height x width), 178917376 pixels; this "
        "server takes at most 4096 pixels per image (--max_pixels)"))
    assert seconds < 1.0 and _peak_kb() - before < 50 * MB
  big = probe.encoded(np.ones((600, 600), np.uint8))
  probe.reset_peak("self")
  before, start = _peak_kb(), time.monotonic()
  got = _post(client, "/api/generate", {"mask": ("big.png", big), **OPTIONS})
  assert _error(got) == (400, (
      "big.png is 600x600 (height x width), 360000 pixels; this server takes "
      "at most 4096 pixels per image (--max_pixels)"))
  assert time.monotonic() - start < 1.0 and _peak_kb() - before < 50 * MB


def test_four_concurrent_oversized_uploads_hold_no_more_than_one(client,
                                                                 bomb):
  answers = []

  def send():
    answers.append(_post(client, "/api/labels",
                         {"mask": ("bomb.png", bomb)}).status_code)

  probe.reset_peak("self")
  before = _peak_kb()
  threads = [threading.Thread(target=send) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert answers == [400] * 4
  assert _peak_kb() - before < 50 * MB


def test_an_edit_photo_is_checked_from_its_header_after_the_labels(client,
                                                                   bomb):
  ids = _mask()
  edited = ids.copy()
  edited[:8, :8] = 4
  fields = {"labels": ("a.png", probe.encoded(ids)),
            "new_labels": ("b.png", probe.encoded(edited)),
            "photo": ("photo.png", bomb), **OPTIONS}
  probe.reset_peak("self")
  before = _peak_kb()
  assert _error(_post(client, "/api/edit", fields)) == (400, (
      "photo.png is 13376x13376 (height x width), 178917376 pixels; this "
      "server takes at most 4096 pixels per image (--max_pixels)"))
  assert _peak_kb() - before < 50 * MB
  fields["new_labels"] = ("b.png", probe.encoded(ids))
  assert _error(_post(client, "/api/edit", fields)) == (400, (
      "the edited labels have the same labels as the photo's: nothing to "
      "edit"))


# -- 3: one program for every guidance scale ---------------------------------


def _old_constant_scale_generate(model, labels, key, opts):
  """generation.generate as it was: the scale a constant of the program."""
  @jax.jit
  def run(params, first_stage_params, labels, key):
    ldm = model.ldm
    c = ldm.condition(params["cond_stage"], labels, opts["mask_stages"])
    k_init, k_loop = jax.random.split(key)
    x_t = jax.random.normal(k_init, (*c.shape[:3], ldm.latent_channels))
    z = generation._run_sampler(  # pylint: disable=protected-access
        ldm.model_fn(params["unet"], c, opts["guidance_scale"]), ldm, x_t,
        k_loop, opts["sampler"], opts["steps"], opts["eta"])
    return model_range_to_images(ldm.decode(first_stage_params, z))
  return np.asarray(run(model.params, model.first_stage_params, labels, key))


def _decode(url: str) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(
      url.split(",", 1)[1]))))


def _close(a: np.ndarray, b: np.ndarray) -> None:
  """Two compiled programs of the same computation: equal but for (at
  most) a uint8 level of float rounding on a few values."""
  diff = np.abs(a.astype(int) - b)
  assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3


def test_six_guidance_values_compile_once_and_give_sample_py_pixels(
    client, lab, ldm_tiny_workdir, tmp_path, capsys):
  import sample  # pylint: disable=g-import-not-at-top
  lowered = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, fun_name="", **_: lowered.append(fun_name)
      if event.endswith("jaxpr_to_mlir_module_duration") else None)
  scales = (2.0, 2.01, 2.05, 3.0, 4.5, 7.5)  # the probe's, and far apart
  mask = probe.encoded(_mask())
  (tmp_path / "mask.png").write_bytes(mask)
  compiled = lab.programs.compiled
  served = {}
  for scale in scales:
    got = _post(client, "/api/generate", {"mask": ("mask.png", mask),
                                          **OPTIONS,
                                          "guidance_scale": str(scale)})
    assert got.status_code == 200, got.text
    served[scale] = [_decode(u) for u in got.json()["images"]]
  assert lab.programs.compiled - compiled == 1
  assert lowered.count("jit(generate)") == 1
  assert np.abs(served[2.0][0].astype(int) - served[7.5][0]).mean() > 5

  for scale in scales:  # sample.py in this process: the same program
    capsys.readouterr()
    out = tmp_path / f"cli{scale}"
    assert sample.main(["--workdir", str(ldm_tiny_workdir), "--masks",
                        str(tmp_path / "mask.png"), "--sampler", "ddim",
                        "--steps", "4", "--seed", "3", "--num_samples", "2",
                        "--guidance_scale", str(scale), "--out",
                        str(out)]) == 0
    for k in range(2):
      _close(np.asarray(Image.open(out / f"mask_{k}.png")), served[scale][k])
  assert lowered.count("jit(generate)") == 1  # JAX shared the lowering

  # ... and the pixels of the program with the scale as a constant.
  m = lab.model
  opts = m.sample_options(sampler="ddim", steps=4, guidance_scale=4.5)
  batch = np.repeat(_mask()[None], 2, axis=0)
  key = jax.random.fold_in(jax.random.key(3), 0)
  old = _old_constant_scale_generate(m, batch, key, opts)
  for k in range(2):
    _close(old[k], served[4.5][k])


# -- 4, 6: user mistakes, each a 400 of one line -----------------------------


@pytest.mark.parametrize("fields,message", [
    ({"mask": ("huge.png", probe.declared_png(20000, 20000))},
     "huge.png declares 400000000 pixels, more than the image decoder's "
     "limit of 178956970 (a decompression bomb?); this server takes at most "
     "4096 pixels per image"),
    ({"mask": ("long.png", probe.streamed_png(10_000_000, 1))},
     "long.png is 1x10000000 (height x width), 10000000 pixels; this server "
     "takes at most 4096 pixels per image (--max_pixels)"),
    ({"mask": ("thin.png", probe.encoded(np.ones((1, 4000), np.uint8)))},
     "thin.png is 1x4000 (height x width); this model needs sides in "
     "multiples of 8 and this server at most 4096 pixels: no size near it "
     "fits"),
    ({"mask": ("odd.png", probe.encoded(np.ones((30, 50), np.uint8)))},
     "odd.png is 30x50 (height x width); this model needs sides in "
     "multiples of 8: resize it to 24x48 or 32x56"),
    ({"mask": ("grey.webp", probe.encoded(np.ones((32, 32), np.uint8),
                                          "WEBP", lossless=True))},
     "grey.webp is grey but stored as colour (WEBP); save class ids as a "
     "greyscale PNG (WebP has no greyscale)"),
    ({"mask": ("float.tif", probe.encoded(np.ones((32, 32), np.float32),
                                          "TIFF"))},
     "float.tif holds floating-point pixels; a label map is a greyscale PNG "
     "of class ids or a PNG in the palette's colours"),
    ({"mask": ("..", b"not a picture")},
     "the mask is not an image (PNG, JPEG, ...)"),
    ({"mask": ("../../etc/" + "x" * 300 + ".png", b"not a picture")},
     "x" * 28 + "..." + "x" * 24 + ".png is not an image (PNG, JPEG, ...)"),
    ({"mask": ("nul\x00.png", b"not a picture")},
     "nul.png is not an image (PNG, JPEG, ...)"),
    ({"mask": ("mask.png", probe.encoded(np.ones((32, 32), np.uint8))),
      "sampler": "ddim", "steps": "600"},
     "steps 600: ddim takes 1 to 500 (not 3, 9, 27, 36 to 37, 101 to 111 or "
     "251 to 333) on this model's 1000-step schedule"),
    ({"mask": ("mask.png", probe.encoded(np.ones((32, 32), np.uint8))),
      "sampler": "dpmpp_2m", "steps": "1000"},
     "steps 1000: dpmpp_2m takes 1 to 999 on this model's 1000-step "
     "schedule"),
    ({"mask": ("mask.png", probe.encoded(np.ones((32, 32), np.uint8))),
      "guidance_scale": "99"},
     "guidance scale 99: use 0 to 50 (1 = no guidance)"),
], ids=["decoder-limit", "1x10M", "1x4000", "30x50", "grey-webp",
        "float-tiff", "dotdot", "300-chars", "nul", "ddim-600",
        "dpmpp-1000", "guidance-99"])
def test_each_mistake_is_a_400_of_one_line(client, fields, message):
  got = _post(client, "/api/generate", fields)
  assert _error(got) == (400, message)


def test_odd_file_names_of_good_masks_are_served(client):
  ids = _mask()
  for name in ("..", "x" * 300 + ".png", "nul\x00.png", "C:\\tmp\\m.png"):
    got = _post(client, "/api/labels", {"mask": (name, probe.encoded(ids))})
    assert got.status_code == 200, (name, got.text)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(
        got.json()["ids"]), np.uint8).reshape(32, 48), ids)


def test_steps_ranges_in_info_match_the_samplers():
  from segldm_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  assert samplers.step_ranges("ddim", 1000)[-1] == (334, 500)
  for name, last in (("ddim", 500), ("ddpm", 1000), ("dpmpp_2m", 999)):
    ranges = samplers.step_ranges(name, 1000)
    for n in (1, last):
      assert samplers.check_steps(name, n, 1000) == n
    with pytest.raises(ValueError):
      samplers.check_steps(name, last + 1, 1000)
    inside = [n for a, b in ranges for n in range(a, b + 1)]
    for n in inside[::37]:  # every count the ranges name runs
      if name == "ddim":
        samplers.ddim_timesteps(1000, n)


def test_api_docs_work_offline(client):
  got = client.get("/api/docs")
  assert got.status_code == 200
  assert "<script" not in got.text and "cdn" not in got.text.lower()
  assert "/api/generate" in got.text and "guidance_scale" in got.text
  assert "/api/generate" in client.get("/api/openapi.json").json()["paths"]


# -- 5: same origin only ------------------------------------------------------


def test_only_the_pages_own_origin_may_post(client):
  mask = {"mask": ("mask.png", probe.encoded(_mask()))}
  got = _post(client, "/api/generate", {**mask, **OPTIONS},
              {"Origin": "http://evil.example"})
  assert _error(got) == (403, (
      "a request from the page at http://evil.example was refused: only "
      "this server's own page may send one (a deliberate deployment: "
      "serve.py --allow_origin ORIGIN)"))
  got = _post(client, "/api/labels", mask, {"Origin": "null"})
  assert got.status_code == 403
  got = client.get("/api/info", headers={"Host": "evil.example:7871"})
  assert _error(got) == (400, (
      "host 'evil.example:7871' is not a name of this server: open it as "
      "http://127.0.0.1:7860/ (or start serve.py with --allow_origin "
      "http://evil.example:7871)"))
  got = _post(client, "/api/labels", mask, {"Host": "evil.example:7871"})
  assert got.status_code == 400
  # The page itself, curl (no Origin), and the other local names: served.
  for headers in ({"Origin": URL}, {}, {"Host": "localhost:7860",
                                         "Origin": "http://localhost:7860"}):
    assert _post(client, "/api/labels", mask, headers).status_code == 200
  assert client.get("/api/info", headers={"Host": "[::1]:7860"}
                    ).status_code == 200


def test_allow_origin_lets_a_deliberate_deployment_in(lab):
  client = testclient.TestClient(
      server.create_app(lab, port=7860,
                        allow_origins=["https://lab.example"]),
      base_url="http://lab.example:7860", raise_server_exceptions=False)
  mask = {"mask": ("mask.png", probe.encoded(_mask()))}
  assert _post(client, "/api/labels", mask,
               {"Origin": "https://lab.example"}).status_code == 200
  assert _post(client, "/api/labels", mask,
               {"Origin": "https://other.example"}).status_code == 403
  with pytest.raises(Exception, match="give an origin such as"):
    server.create_app(lab, allow_origins=["lab.example"])


def test_a_body_larger_than_three_images_is_refused_unread(client):
  body = b"x" * (3 * 16 * 4096 + (1 << 20) * 4 + 1)
  got = client.post("/api/generate", content=body, headers={
      "Content-Type": f"multipart/form-data; boundary={probe.BOUNDARY}"})
  assert got.status_code == 413
  assert json.loads(got.text)["error"].startswith(
      f"the request is {len(body)} bytes; this server takes at most ")


# -- the programs kept: bounded, least recently used first out ---------------


def test_programs_keep_at_most_capacity_and_log_what_goes(monkeypatch, caplog):
  from segldm_jax.ui import programs as programs_lib  # pylint: disable=g-import-not-at-top
  cleared = []
  monkeypatch.setattr(programs_lib.jax, "clear_caches",
                      lambda: cleared.append(True))

  class Lowered:
    def __init__(self, name):
      self.name = name

    def compile(self):
      return f"program {self.name}"

  kept = programs_lib.Programs(2)
  caplog.set_level("INFO", logger="segldm_jax.ui")
  get = lambda key: kept.get(key, lambda: Lowered(key))  # noqa: E731
  assert get(("generate", 32)) == "program ('generate', 32)"
  get(("generate", 64))
  get(("generate", 32))        # used again: now the most recent
  get(("edit", 32))            # a third: the least recent (64) goes
  assert (kept.compiled, kept.evicted, len(kept), cleared) == (3, 1, 2,
                                                              [True])
  assert "dropped the least recently used program, generate 64 (at most 2 " \
         "kept: --max_programs)" in caplog.text
  get(("generate", 32))
  assert kept.compiled == 3    # still kept
  get(("generate", 64))
  assert kept.compiled == 4    # compiled again after it went
  with pytest.raises(ValueError):
    programs_lib.Programs(0)
