"""Damage for the integrity tests: what a flipped bit on disk does."""

import pathlib


def flip_array_byte(step_dir: pathlib.Path) -> None:
  """One bit in the middle of the largest data file of the params item."""
  files = [f for f in (step_dir / "params").rglob("*")
           if f.is_file() and f.parent.name == "d"]
  big = max(files, key=lambda f: f.stat().st_size)
  data = bytearray(big.read_bytes())
  data[len(data) // 2] ^= 0x04
  big.write_bytes(bytes(data))
