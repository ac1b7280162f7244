"""Requests as careless or hostile clients send them, for serve.py's tests
and its load benchmark (`benchmarks/serve_load.py`).

Bodies are built by hand (`multipart`) so that any file name, header or
size can be sent; the huge pictures are written row by row through zlib
(`streamed_png`), never held decoded: a 174 KB PNG can declare 13376x13376
pixels. `post` sends to 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import io
import json
import struct
import urllib.parse
import zlib
from typing import Any

import numpy as np
from PIL import Image

BOUNDARY = "segldm-probe-boundary"


def multipart(fields: dict[str, Any]) -> tuple[bytes, str]:
  """{name: str | (filename, bytes)} -> (body, Content-Type). File names
  go in as UTF-8 bytes, whatever they hold."""
  out = io.BytesIO()
  for name, value in fields.items():
    out.write(f"--{BOUNDARY}\r\n".encode())
    if isinstance(value, tuple):
      filename, data = value
      out.write(f'Content-Disposition: form-data; name="{name}"; '
                .encode() + b'filename="' + filename.encode("utf-8")
                + b'"\r\nContent-Type: application/octet-stream\r\n\r\n')
      out.write(data)
    else:
      out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'
                f"{value}".encode())
    out.write(b"\r\n")
  out.write(f"--{BOUNDARY}--\r\n".encode())
  return out.getvalue(), f"multipart/form-data; boundary={BOUNDARY}"


def _chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def streamed_png(width: int, height: int, value: int = 0) -> bytes:
  """A greyscale PNG of `width` x `height` pixels of `value`, compressed
  one row at a time (memory: one row)."""
  row = b"\x00" + bytes([value]) * width
  z = zlib.compressobj(9)
  idat = [z.compress(row) for _ in range(height)] + [z.flush()]
  return (b"\x89PNG\r\n\x1a\n"
          + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0,
                                        0, 0))
          + _chunk(b"IDAT", b"".join(idat)) + _chunk(b"IEND", b""))


def declared_png(width: int, height: int) -> bytes:
  """A PNG header declaring `width` x `height` with almost no data (the
  image decoder refuses it at open beyond its limit)."""
  return (b"\x89PNG\r\n\x1a\n"
          + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0,
                                        0, 0))
          + _chunk(b"IDAT", zlib.compress(b"\x00")) + _chunk(b"IEND", b""))


def encoded(array: np.ndarray, fmt: str = "PNG", **save) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt, **save)
  return buf.getvalue()


def post(url: str, path: str, fields: dict[str, Any], *,
         headers: dict[str, str] | None = None, timeout: float = 600
         ) -> tuple[int, dict[str, Any]]:
  """POSTs a multipart form to the server at `url` (http://127.0.0.1:PORT/)
  -> (status, JSON body)."""
  body, content_type = multipart(fields)
  return request(url, "POST", path, body, {"Content-Type": content_type,
                                           **(headers or {})}, timeout)


def request(url: str, method: str, path: str, body: bytes = b"",
            headers: dict[str, str] | None = None, timeout: float = 600
            ) -> tuple[int, dict[str, Any]]:
  parts = urllib.parse.urlsplit(url)
  if parts.hostname != "127.0.0.1":
    raise ValueError(f"probes go to 127.0.0.1 only, not {parts.hostname}")
  conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                    timeout=timeout)
  try:
    conn.request(method, path, body=body or None, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
  finally:
    conn.close()
  try:
    return response.status, json.loads(data)
  except ValueError:
    return response.status, {"text": data[:200].decode("latin-1")}


def memory_kb(pid: int) -> dict[str, int]:
  """{"rss", "peak"} of a process in KiB (VmRSS, VmHWM)."""
  out = {}
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(("VmRSS", "VmHWM")):
        out["rss" if line.startswith("VmRSS") else "peak"] = int(
            line.split()[1])
  return out


def reset_peak(pid: int) -> None:
  """Starts a process's peak RSS (VmHWM) afresh from its RSS now."""
  with open(f"/proc/{pid}/clear_refs", "w") as f:
    f.write("5")
