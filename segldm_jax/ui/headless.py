"""Drive the page in Debian's headless Chromium, for its tests and benchmarks.

Needs selenium (requirements-dev.txt) and Debian's `chromium` and
`chromium-driver` (`make browser`). The driver is given explicitly, so
selenium never tries to download one; the flags keep Chromium off the
network (this project's machines reach none).
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator, NamedTuple

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu",
          "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update",
          "--disable-sync", "--window-size=1400,1000")


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now (for a server or a
  coordinator of processes on this machine)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Served(NamedTuple):
  url: str          # http://127.0.0.1:PORT/
  seconds: float    # from launch until it served
  pid: int          # the server's process (its memory: /proc/PID)


@contextlib.contextmanager
def serve(workdir: pathlib.Path, *flags: str, timeout_s: float = 300,
          log_name: str = "serve.log") -> Iterator[Served]:
  """Runs `serve.py --workdir W FLAGS` on a free port of 127.0.0.1; stops
  it on exit. Its output goes to W/`log_name`."""
  port = free_port()
  log_path = pathlib.Path(workdir) / log_name
  start = time.monotonic()
  with open(log_path, "w+") as log:
    proc = subprocess.Popen(
        [sys.executable, str(pathlib.Path(__file__).parents[2] / "serve.py"),
         "--workdir", str(workdir), "--port", str(port), *flags],
        stdout=log, stderr=subprocess.STDOUT)
    try:
      while True:
        if proc.poll() is not None:
          raise RuntimeError(f"serve.py exited: {log_path.read_text()}")
        if time.monotonic() - start > timeout_s:
          raise TimeoutError(f"serve.py did not serve in {timeout_s:g} s")
        with contextlib.suppress(OSError):
          socket.create_connection(("127.0.0.1", port), timeout=1).close()
          break
        time.sleep(0.1)
      yield Served(f"http://127.0.0.1:{port}/", time.monotonic() - start,
                   proc.pid)
    finally:
      proc.terminate()
      proc.wait(30)


@contextlib.contextmanager
def chromium(downloads: pathlib.Path | None = None):
  """A selenium driver of headless Chromium; `downloads`: where files the
  page saves land."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
  if missing:
    raise FileNotFoundError(f"{', '.join(missing)} missing: `make browser` "
                            "installs Debian's chromium and chromium-driver")
  with tempfile.TemporaryDirectory(prefix="segldm-chromium-") as profile:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*_FLAGS, f"--user-data-dir={profile}"):
      options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
      if downloads is not None:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {
            "behavior": "allow", "downloadPath": str(downloads)})
      yield driver
    finally:
      driver.quit()


class Page:
  """The painting page's controls, as a person uses them."""

  def __init__(self, driver, url: str, timeout_s: float = 30):
    from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
    self.d, self.by = driver, By
    driver.get(url)
    self.wait(lambda: driver.find_element(By.TAG_NAME, "body").get_attribute(
        "data-ready") == "true", timeout_s)

  def wait(self, condition, timeout_s: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
    return WebDriverWait(self.d, timeout_s, poll_frequency=0.1).until(
        lambda _: condition())

  def el(self, element_id: str):
    return self.d.find_element(self.by.ID, element_id)

  def css(self, selector: str):
    return self.d.find_elements(self.by.CSS_SELECTOR, selector)

  def type(self, element_id: str, value) -> None:
    """Types over the field's text (with the input events a person's
    typing fires)."""
    from selenium.webdriver.common.keys import Keys  # pylint: disable=g-import-not-at-top
    element = self.el(element_id)
    element.send_keys(Keys.CONTROL + "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(str(value))

  def pick(self, class_id: int, tool: str) -> None:
    self.css(f"#palette li[data-id='{class_id}']")[0].click()
    self.css(f"input[name=tool][value={tool}]")[0].click()

  def brush_size(self, size: int) -> None:
    self.d.execute_script(
        "const s = document.getElementById('brush-size');"
        f"s.value = {int(size)}; s.dispatchEvent(new Event('input'));")

  def _offset(self, x: float, y: float) -> tuple[int, int]:
    canvas = self.el("mask")
    w, h = canvas.size["width"], canvas.size["height"]
    cols, rows = (int(v) for v in (self.el("width").get_attribute("value"),
                                   self.el("height").get_attribute("value")))
    return (int((x + 0.5) * w / cols - w / 2),
            int((y + 0.5) * h / rows - h / 2))

  def click_pixel(self, x: int, y: int) -> None:
    """Clicks the centre of mask pixel (x, y)."""
    from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=g-import-not-at-top
    ActionChains(self.d).move_to_element_with_offset(
        self.el("mask"), *self._offset(x, y)).click().perform()

  def drag(self, points) -> None:
    """Presses at the first mask pixel, moves through the others, lets go."""
    from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=g-import-not-at-top
    chain = ActionChains(self.d).move_to_element_with_offset(
        self.el("mask"), *self._offset(*points[0])).click_and_hold()
    for p in points[1:]:
      chain = chain.move_to_element_with_offset(self.el("mask"),
                                                *self._offset(*p))
    chain.release().perform()

  def error(self) -> str:
    box = self.el("error")
    return box.text if box.is_displayed() else ""

  def images(self, timeout_s: float = 600) -> list:
    """Waits until the results' images are loaded -> their elements."""
    self.wait(lambda: self.css("img.sample") and all(
        self.d.execute_script("return arguments[0].complete && "
                              "arguments[0].naturalWidth", im)
        for im in self.css("img.sample")), timeout_s)
    return self.css("img.sample")

  def generate(self, timeout_s: float = 600) -> list:
    """Presses Generate and waits for the new images -> their elements."""
    self.d.execute_script("document.getElementById('results')"
                          ".replaceChildren()")
    self.el("generate-btn").click()
    return self.images(timeout_s)
