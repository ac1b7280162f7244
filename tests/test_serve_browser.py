"""The painting page in a real browser: Debian's headless Chromium, driven
through its chromedriver (`make browser` installs both), against `serve.py`
running as users run it, on the converted ldm_tiny fixture.

A screenshot of the page with its result is kept in test-artifacts/.
"""

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ARTIFACTS = pathlib.Path(os.environ.get(
    "SEGLDM_TEST_ARTIFACTS", pathlib.Path(__file__).parents[1] /
    "test-artifacts"))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
H, W = 32, 48  # a canvas of another aspect than the model's 32x32
BRUSH = 9      # diameter in mask pixels: a disc of radius 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  import convert_torch_ckpt  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("page") / "ldm_tiny"
  assert convert_torch_ckpt.main(["tests/fixtures/ldm_tiny.ckpt", "--config",
                                  "tests/fixtures/ldm_tiny.yaml", "--out",
                                  str(workdir)]) == 0
  port = _free_port()
  log = open(workdir / "serve.log", "w+")  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      [sys.executable, "serve.py", "--workdir", str(workdir), "--port",
       str(port), "--max_queue", "0", "--warmup_count", "0"],
      stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}/"
  deadline = time.monotonic() + 180
  while "serving" not in (workdir / "serve.log").read_text():
    assert proc.poll() is None, (workdir / "serve.log").read_text()
    assert time.monotonic() < deadline, "serve.py did not start in 180 s"
    time.sleep(0.2)
  for _ in range(100):  # uvicorn binds just after the line
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      time.sleep(0.1)
  yield url
  proc.terminate()
  proc.wait(30)
  log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
  assert not missing, (f"{', '.join(missing)} missing: `make browser` "
                       "installs Debian's chromium and chromium-driver")
  downloads = tmp_path_factory.mktemp("downloads")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--window-size=1400,900",
               f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  driver.execute_cdp_cmd("Browser.setDownloadBehavior", {
      "behavior": "allow", "downloadPath": str(downloads)})
  driver.downloads = downloads
  yield driver
  driver.quit()


def _wait(driver, condition, timeout=120):
  return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
      lambda d: condition(d))


def _by_id(driver, element_id):
  return driver.find_element(By.ID, element_id)


def _set(driver, element_id, value):
  """Types `value` over the field's text, as a person would (with the input
  events the page listens to)."""
  element = _by_id(driver, element_id)
  element.send_keys(Keys.CONTROL + "a")
  element.send_keys(Keys.DELETE)
  element.send_keys(str(value))


def _click_pixel(driver, x, y):
  """Clicks the centre of mask pixel (x, y) of the displayed canvas."""
  canvas = _by_id(driver, "mask")
  scale = canvas.size["width"] / W
  ActionChains(driver).move_to_element_with_offset(
      canvas, int((x + 0.5) * scale - canvas.size["width"] / 2),
      int((y + 0.5) * scale - canvas.size["height"] / 2)).click().perform()


def _error(driver):
  box = _by_id(driver, "error")
  return box.text if box.is_displayed() else ""


def test_paint_two_regions_generate_and_download(server, browser, tmp_path):
  d = browser
  d.get(server)
  _wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(
      "data-ready") == "true", 30)
  names = [li.text for li in d.find_elements(By.CSS_SELECTOR, "#palette li")]
  assert names == [f"{k} class {k}" for k in range(5)]

  # The search box narrows the palette to the class it names.
  _set(d, "class-search", "class 3")
  shown = [li for li in d.find_elements(By.CSS_SELECTOR, "#palette li")
           if li.is_displayed()]
  assert [li.text for li in shown] == ["3 class 3"]
  _set(d, "class-search", "")

  # A canvas of another size: sides that are not multiples of 8 are refused.
  _set(d, "height", 30)
  _by_id(d, "resize").click()
  assert _error(d) == ("the canvas is 30x32 (height x width); sides must be "
                       "multiples of 8 for this model")
  _set(d, "height", H)
  _set(d, "width", W)
  _by_id(d, "resize").click()
  assert _error(d) == ""

  # Region 1: fill everything with class 1. Region 2: a class 3 disc.
  d.find_element(By.CSS_SELECTOR, "#palette li[data-id='1']").click()
  d.find_element(By.CSS_SELECTOR, "input[name=tool][value=fill]").click()
  _click_pixel(d, 5, 5)
  d.find_element(By.CSS_SELECTOR, "#palette li[data-id='3']").click()
  d.find_element(By.CSS_SELECTOR, "input[name=tool][value=brush]").click()
  d.execute_script("const s = document.getElementById('brush-size');"
                   f"s.value = {BRUSH}; s.dispatchEvent(new Event('input'));")
  cx, cy = 33, 14
  _click_pixel(d, cx, cy)
  expected = np.full((H, W), 1, np.uint8)
  yy, xx = np.mgrid[:H, :W]
  expected[(xx - cx) ** 2 + (yy - cy) ** 2 <= (BRUSH // 2) ** 2] = 3

  _set(d, "steps", 4)
  _set(d, "count", 2)
  _by_id(d, "generate-btn").click()
  _by_id(d, "generate-btn").click()  # a second request while one runs
  assert _error(d) == ("a request is already running: wait for its images "
                       "before starting another")
  samples = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR,
                                               "img.sample"))
  _wait(d, lambda d: all(d.execute_script(
      "return arguments[0].complete && arguments[0].naturalWidth", im)
                         for im in samples))
  assert len(samples) == 2
  for im in samples:
    natural = d.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", im)
    assert natural == [W, H]  # the canvas's aspect, pixel for pixel
    assert abs(im.size["width"] / im.size["height"] - W / H) < 0.01
  ARTIFACTS.mkdir(parents=True, exist_ok=True)
  d.save_screenshot(str(ARTIFACTS / "serve_page.png"))

  _by_id(d, "download-ids").click()
  path = d.downloads / "mask_ids.png"
  _wait(d, lambda d: path.exists() and path.stat().st_size > 0, 30)
  with Image.open(path) as mask:
    assert mask.mode == "L"
    np.testing.assert_array_equal(np.asarray(mask), expected)

  # Bad input: a label map in a colour the palette lacks.
  bad = tmp_path / "unknown.png"
  Image.new("RGB", (W, H), (10, 200, 30)).save(bad)
  _by_id(d, "upload-labels").send_keys(str(bad))
  _wait(d, lambda d: _error(d), 30)
  assert _error(d) == ("unknown.png: colour (10, 200, 30) is not in the "
                       "palette (1 unknown colour(s), 1536 pixels)")
