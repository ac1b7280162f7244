"""The line a lost multi-process run leaves behind, and the helper process
that writes it when jax aborts this one first.

    python -m segldm_jax.runtime.last_words ADDRESS CHECKPOINTS COUNT RESUME ME

The helper reads its stdin until the watched process closes it (by exiting,
however it exits); unless told "quiet" first, it writes the summary line to
the stderr it shares with that process. A coordinator that no longer
accepts connections is the likely cause of an abnormal end (jax aborts when
it loses it). Standard library only: it starts in a blink and imports
neither jax nor the rest of the package.
"""
from __future__ import annotations

import pathlib
import signal
import socket
import sys


def last_complete_step(checkpoints_dir: str | pathlib.Path) -> int | None:
  """The newest finalised step under an orbax checkpoints folder (orbax
  renames a step's temporary folder to its number once complete)."""
  try:
    steps = [int(p.name) for p in pathlib.Path(checkpoints_dir).iterdir()
             if p.name.isdigit() and p.is_dir()]
  except OSError:
    return None
  return max(steps, default=None)


def kept(checkpoints_dir: str | pathlib.Path) -> str:
  """What a restart resumes from, in words."""
  step = last_complete_step(checkpoints_dir)
  if step is None:
    return f"no checkpoint was completed in {checkpoints_dir}"
  return f"the last complete checkpoint is step {step} in {checkpoints_dir}"


def coordinator_reachable(address: str) -> bool:
  host, _, port = address.rpartition(":")
  try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
  except (OSError, ValueError):
    return False
  return True


def main(argv: list[str]) -> None:
  for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)  # the process group's signals are not ours
  address, directory, count, resume, me = argv
  if sys.stdin.buffer.read().endswith(b"quiet"):
    return
  who = "this process ended abnormally (crashed or killed)"
  # Process 0 hosts the coordinator itself; without an address (a cluster
  # jax detected) a lost coordinator cannot be told from another crash.
  if me != "0" and address and not coordinator_reachable(address):
    who = (f"process 0 (the coordinator) of {count} stopped (lost host, "
           "killed or crashed)")
  sys.stderr.write(f"\nerror: {who}; {kept(directory)}; {resume}\n")


if __name__ == "__main__":
  main(sys.argv[1:])
