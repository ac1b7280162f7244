"""The painting page in a real browser: Debian's headless Chromium, driven
through its chromedriver (`make browser` installs both), against `serve.py`
running as users run it, on the converted ldm_tiny fixture (32x32, 5
classes, sides in multiples of 8).

A screenshot of the page with its result is kept in test-artifacts/.
"""

import base64
import io
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from segldm_jax.ui import headless

ARTIFACTS = pathlib.Path(os.environ.get(
    "SEGLDM_TEST_ARTIFACTS",
    pathlib.Path(__file__).parents[1] / "test-artifacts"))
H, W = 32, 48  # a canvas of another aspect than the model's 32x32
BRUSH = 9      # diameter in mask pixels: a disc of radius 4


@pytest.fixture(scope="module")
def page(ldm_tiny_workdir, tmp_path_factory):
  downloads = tmp_path_factory.mktemp("downloads")
  with headless.serve(ldm_tiny_workdir, "--max_queue", "0", "--warmup_count", "0"
                      ) as served, headless.chromium(downloads) as driver:
    driver.downloads = downloads
    yield headless.Page(driver, served.url)


def test_paint_two_regions_generate_and_download(page, tmp_path):
  names = [li.text for li in page.css("#palette li")]
  assert names == [f"{k} class {k}" for k in range(5)]

  # The search box narrows the palette to the class it names.
  page.type("class-search", "class 3")
  assert [li.text for li in page.css("#palette li") if li.is_displayed()
          ] == ["3 class 3"]
  page.type("class-search", "")

  # A canvas of another size: sides that are not multiples of 8 are refused.
  page.type("height", 30)
  page.el("resize").click()
  assert page.error() == ("the canvas is 30x32 (height x width); sides must "
                          "be multiples of 8 for this model")
  # ... and so is one over the server's pixel cap (4x the 32x32 training
  # area), before anything is sent.
  page.type("height", 72)
  page.type("width", 72)
  page.el("resize").click()
  assert page.error() == ("the canvas is 72x72 (height x width), 5184 "
                          "pixels; this server takes at most 4096")
  page.type("height", H)
  page.type("width", W)
  page.el("resize").click()
  assert page.error() == ""

  # The steps field takes what the chosen sampler runs (the server's limits).
  from selenium.webdriver.support.ui import Select  # pylint: disable=g-import-not-at-top
  for sampler, most in (("dpmpp_2m", "999"), ("ddpm", "1000"),
                        ("ddim", "500")):
    Select(page.el("sampler")).select_by_value(sampler)
    assert page.el("steps").get_attribute("max") == most

  # Region 1: fill everything with class 1. Region 2: a class 3 disc.
  page.pick(1, "fill")
  page.click_pixel(5, 5)
  page.pick(3, "brush")
  page.brush_size(BRUSH)
  cx, cy = 33, 14
  page.click_pixel(cx, cy)
  expected = np.full((H, W), 1, np.uint8)
  yy, xx = np.mgrid[:H, :W]
  expected[(xx - cx) ** 2 + (yy - cy) ** 2 <= (BRUSH // 2) ** 2] = 3

  page.type("steps", 4)
  page.type("count", 2)
  page.el("generate-btn").click()
  page.el("generate-btn").click()  # a second request while one runs
  assert page.error() == ("a request is already running: wait for its "
                          "images before starting another")
  samples = page.images()
  assert len(samples) == 2
  for im in samples:
    natural = page.d.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", im)
    assert natural == [W, H]  # the canvas's aspect, pixel for pixel
    assert abs(im.size["width"] / im.size["height"] - W / H) < 0.01
  assert page.error() == ""  # the busy message went with the request
  ARTIFACTS.mkdir(parents=True, exist_ok=True)
  page.d.save_screenshot(str(ARTIFACTS / "serve_page.png"))

  page.el("download-ids").click()
  path = page.d.downloads / "mask_ids.png"
  page.wait(lambda: path.exists() and path.stat().st_size > 0, 30)
  with Image.open(path) as mask:
    assert mask.mode == "L"
    np.testing.assert_array_equal(np.asarray(mask), expected)


def _src_pixels(page, img) -> np.ndarray:
  src = page.d.execute_script("return arguments[0].src", img)
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(
      src.split(",", 1)[1]))))


def test_edit_this_repaints_a_region_of_a_result(page):
  """Generate, press "Edit this" under the first image, repaint a corner,
  Edit region: the result keeps the image outside the grown region."""
  photo = _src_pixels(page, page.css("img.sample")[0])
  page.css("#results figure button")[0].click()  # "Edit this"
  page.wait(lambda: page.el("edit-btn").is_enabled(), 10)
  page.pick(2, "brush")
  page.brush_size(5)
  page.click_pixel(3, 3)  # a disc of radius 2 in the top-left corner
  page.d.execute_script("document.getElementById('results')"
                        ".replaceChildren()")
  page.el("edit-btn").click()
  edits = [_src_pixels(page, im) for im in page.images()]
  assert len(edits) == 2 and page.error() == ""
  for edit in edits:
    # The changed pixels grown by the margin (2 x the factor 4) stay within
    # the first 16 rows and columns; beyond, the photo is kept exactly.
    np.testing.assert_array_equal(edit[16:], photo[16:])
    np.testing.assert_array_equal(edit[:, 16:], photo[:, 16:])
    assert np.abs(edit[:6, :6].astype(int) - photo[:6, :6]).max() > 0


def test_bad_uploads_are_one_line_on_the_page(page, tmp_path):
  colours = tmp_path / "unknown.png"
  Image.new("RGB", (W, H), (10, 200, 30)).save(colours)
  page.el("upload-labels").send_keys(str(colours))
  page.wait(page.error, 30)
  # The same reader as sample.py --palette (tolerance 30).
  assert page.error().startswith(
      "unknown.png: 1536 pixels are no palette colour (within "
      "palette_tolerance=30) and no blend of the regions beside them, the "
      "first at (y=0, x=0): (10, 200, 30); ")
  text = tmp_path / "holiday.jpg"
  text.write_text("not a photo")
  page.el("upload-photo").send_keys(str(text))
  page.wait(lambda: "holiday" in page.error(), 30)
  assert page.error() == "holiday.jpg is not an image this browser can show"
  # The server took neither and keeps serving.
  assert len(page.generate()) == 2
