"""A multi-process run that loses a process ends in one line, everywhere.

`watch_peers` starts a `PeerWatcher` in each process of a multi-process
run. Each process beats (a counter in the coordination service) from a
thread; a peer whose beat stops, a peer that failed on its own error, or a
coordination service that no longer answers (process 0 hosts it) ends this
process with exit code 1 and, as the last stderr line, which process
stopped, the last complete checkpoint step and the command that resumes.

When process 0 itself is lost, jax's client in every other process aborts
at once (exit 134) with its own fatal error, before any thread of ours can
speak, and jax offers no hook for it (the client's error callback cannot be
given from Python). So a helper process (`last_words`, run with `python -m`)
outlives this one and writes the line unless told that this process exits
cleanly or has spoken.
"""
from __future__ import annotations

import atexit
import os
import pathlib
import shlex
import subprocess
import sys
import threading
import time
from typing import Sequence

import jax

from segldm_jax.runtime import distributed
from segldm_jax.runtime import last_words

_ALIVE = "segldm/alive/"
_DONE = "segldm/done/"
_FAILED = "segldm/failed/"
_PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _start_last_words(checkpoints_dir: pathlib.Path, count: int,
                      resume: str) -> subprocess.Popen | None:
  """The helper that speaks for this process if jax aborts it; None where
  it cannot start."""
  env = dict(os.environ)  # the helper imports this package, found from here
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
  try:
    return subprocess.Popen(
        [sys.executable, "-m", last_words.__name__,
         distributed.coordinator_address(), str(checkpoints_dir), str(count),
         resume, str(jax.process_index())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
        start_new_session=True)
  except OSError:
    return None


class PeerWatcher:
  """Watches the other processes of this run from a daemon thread (see the
  module docstring); `start` once, after jax.distributed is up."""

  def __init__(self, timeout_s: int, checkpoints_dir: pathlib.Path,
               command: Sequence[str]):
    self.client = distributed.coordination_client()
    self.me, self.count = jax.process_index(), jax.process_count()
    self.timeout_s = timeout_s
    self.checkpoints_dir = checkpoints_dir
    self.interval = max(0.5, min(5.0, timeout_s / 10))  # between beats
    self.resume = ("resume by re-running every process's command, this "
                   f"one's: python {shlex.join(command)}")
    self.stopping = threading.Event()
    self.helper: subprocess.Popen | None = None
    self._previous_hook = sys.excepthook

  def start(self) -> None:
    self.helper = _start_last_words(self.checkpoints_dir, self.count,
                                    self.resume)
    distributed.on_own_error(self.failed_here)
    atexit.register(self.on_exit)  # runs before jax's (registered earlier)
    self._previous_hook = sys.excepthook
    sys.excepthook = self.on_exception
    threading.Thread(target=self.beat, name="segldm-watch-peers",
                     daemon=True).start()

  # --- how this process ends ---------------------------------------------
  def _silence_helper(self) -> None:
    """Tells the helper this process ends cleanly or has spoken itself."""
    if self.helper is None:
      return
    try:
      self.helper.stdin.write(b"quiet")
      self.helper.stdin.close()
    except (OSError, ValueError):
      pass

  def _end(self, line: str | None) -> None:
    self._silence_helper()
    sys.stdout.flush()
    if line:
      sys.stderr.write("\n" + line + "\n")
    sys.stderr.flush()
    # Not sys.exit: jax's exit handlers would wait for the lost peer.
    os._exit(1)  # pylint: disable=protected-access

  def lost(self, who: str, why: str) -> None:
    """A peer (or the coordinator) is gone: say so and end."""
    if self.stopping.is_set():  # exiting anyway: the peer may be done too
      return
    self._end(f"error: {who} of {self.count} stopped ({why}lost host, killed "
              f"or crashed); {last_words.kept(self.checkpoints_dir)}; "
              f"{self.resume}")

  def failed_there(self, peer: str, line: str) -> None:
    """A peer ended on its own one-line error: repeat it here and end."""
    if self.stopping.is_set():
      return
    self.stopping.set()
    self._end(f"error: process {peer} of {self.count} stopped on its own "
              f"error ({line.removeprefix('error: ')}); "
              f"{last_words.kept(self.checkpoints_dir)}")

  def failed_here(self, line: str) -> None:
    """This process printed its own error `line`: tell the peers, end."""
    self.stopping.set()
    try:
      self.client.key_value_set(f"{_FAILED}{self.me}", line,
                                allow_overwrite=True)
      if self.me == 0:  # the coordinator: give the peers a beat to read it
        time.sleep(2 * self.interval)
    except Exception:  # pylint: disable=broad-except
      pass  # the peers' heartbeat check still notices
    self._end(None)

  # --- the watching thread -------------------------------------------------
  def beat(self) -> None:
    seen = {i: (None, time.monotonic()) for i in range(self.count)
            if i != self.me}
    beats = 0
    while not self.stopping.is_set():
      beats += 1
      try:
        self.client.key_value_set(f"{_ALIVE}{self.me}", str(beats),
                                  allow_overwrite=True)
        alive = dict(self.client.key_value_dir_get(_ALIVE))
        done = dict(self.client.key_value_dir_get(_DONE))
        failed = dict(self.client.key_value_dir_get(_FAILED))
      except Exception:  # pylint: disable=broad-except
        if self.stopping.is_set():
          return
        # The coordination service is gone, and with it process 0 (the
        # same line as the helper's, which speaks if jax aborts us first).
        self.lost("process 0 (the coordinator)", "")
        return
      for key, line in failed.items():
        self.failed_there(key.removeprefix(_FAILED), line)
      now = time.monotonic()
      for peer, (last, since) in list(seen.items()):
        value = alive.get(f"{_ALIVE}{peer}")
        if f"{_DONE}{peer}" in done:
          del seen[peer]
        elif value != last:
          seen[peer] = (value, now)
        elif now - since > self.timeout_s:
          self.lost(f"process {peer}", f"no heartbeat for {self.timeout_s} s: ")
      self.stopping.wait(self.interval)

  def on_exception(self, kind, value, tb) -> None:
    self._previous_hook(kind, value, tb)  # jax's own diagnostics first
    if not issubclass(kind, (KeyboardInterrupt, SystemExit)):
      # A collective failed: if a peer is gone the watcher says so shortly.
      self.stopping.wait(self.timeout_s + 2 * self.interval)

  def on_exit(self) -> None:
    self.stopping.set()
    self._silence_helper()
    try:
      self.client.key_value_set(f"{_DONE}{self.me}", "1", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass


def watch_peers(timeout_s: int, checkpoints_dir: str | os.PathLike[str],
                command: Sequence[str] | None = None) -> PeerWatcher | None:
  """Ends this process in one line when a peer process stops responding
  (see the module docstring); `command` (default: sys.argv) is the one the
  line says resumes. One process: nothing to watch, None."""
  if jax.process_count() == 1:
    return None
  watcher = PeerWatcher(timeout_s, pathlib.Path(checkpoints_dir),
                        list(command if command is not None else sys.argv))
  watcher.start()
  return watcher
