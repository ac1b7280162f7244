"""Who may drive the server: the page's own origin, by the server's names.

Any web page a user visits can send a form to a server on their machine
(a cross-site POST needs no permission) and, by pointing a name of its own
at 127.0.0.1 (DNS rebinding), even read the answers. `Guard`, an ASGI
middleware in front of the app, answers before the app sees the request:

* a Host header that is not a name of this server: 400. Names: the served
  address, localhost names, this machine's host name, any IP address
  literal (rebinding needs a domain name), and the hosts of `allow_origins`;
* a state-changing request (POST, PUT, PATCH, DELETE) whose Origin is
  neither the page's own (the Host it was sent to) nor in `allow_origins`:
  403. A request without Origin (curl, scripts) is served;
* a request body larger than `max_body` bytes (Content-Length), or a
  state-changing request without Content-Length: 413 / 411, before any of
  it is read.

Errors are {"error": one line}, like the app's.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.parse
from typing import Any, Iterable

from segldm_jax import errors

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
_CHANGES_STATE = {"POST", "PUT", "PATCH", "DELETE"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split_host(value: str) -> tuple[str, int | None]:
  """"name:port", "[::1]:port" or "name" -> (lower-case name, port)."""
  value = value.strip().lower()
  if value.startswith("["):
    name, _, rest = value[1:].partition("]")
    port = rest[1:] if rest.startswith(":") else ""
  else:
    name, _, port = value.partition(":")
  name = name.rstrip(".")
  return name, int(port) if port.isdigit() else None


def _is_ip(name: str) -> bool:
  try:
    ipaddress.ip_address(name)
    return True
  except ValueError:
    return False


def origin_of(url: str) -> tuple[str, str, int | None] | None:
  """"http://Name:80/..." -> ("http", "name", 80); None for "null" or
  anything without a scheme and a host."""
  parts = urllib.parse.urlsplit(url.strip())
  if not parts.scheme or not parts.hostname:
    return None
  try:
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
  except ValueError:
    return None
  return parts.scheme.lower(), parts.hostname.lower().rstrip("."), port


def parse_origins(urls: Iterable[str]) -> set[tuple[str, str, int | None]]:
  """--allow_origin values -> origins, or an InputError naming a bad one."""
  out = set()
  for url in urls:
    origin = origin_of(url)
    if origin is None:
      raise errors.InputError(f"--allow_origin {url!r}: give an origin such "
                              "as http://myhost:7860")
    out.add(origin)
  return out


class Guard:
  """ASGI middleware: see the module docstring."""

  def __init__(self, app, *, host: str, port: int,
               allow_origins: Iterable[str] = (), max_body: int):
    self.app, self.port, self.max_body = app, port, max_body
    self.allow_origins = parse_origins(allow_origins)
    self.names = {*LOCAL_NAMES, _split_host(host)[0], socket.gethostname()
                  .lower(), *(o[1] for o in self.allow_origins)}
    self.names -= {"0.0.0.0", "::", ""}

  def host_allowed(self, name: str) -> bool:
    return name in self.names or _is_ip(name)

  def problem(self, method: str, headers: dict[str, str]
              ) -> tuple[int, str] | None:
    """(status, one line) for a request to refuse, else None."""
    host = headers.get("host", "")
    name, port = _split_host(host)
    if not self.host_allowed(name):
      return 400, (f"host {host!r} is not a name of this server: open it as "
                   f"http://127.0.0.1:{self.port}/ (or start serve.py with "
                   f"--allow_origin http://{host})")
    if method not in _CHANGES_STATE:
      return None
    if "origin" in headers:
      origin = origin_of(headers["origin"])
      own = origin is not None and (origin[1], origin[2]) == (
          name, port or _DEFAULT_PORTS.get(origin[0]))
      if not own and origin not in self.allow_origins:
        return 403, (f"a request from the page at {headers['origin']} was "
                     "refused: only this server's own page may send one (a "
                     "deliberate deployment: serve.py --allow_origin ORIGIN)")
    length = headers.get("content-length")
    if length is None or not length.isdigit():
      return 411, "a request with a body must say its length (Content-Length)"
    if int(length) > self.max_body:
      return 413, (f"the request is {length} bytes; this server takes at "
                   f"most {self.max_body} (three images of --max_pixels)")
    return None

  async def __call__(self, scope: dict[str, Any], receive, send) -> None:
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1")
               for k, v in scope.get("headers", [])}
    found = self.problem(scope.get("method", "GET"), headers)
    if found is None:
      return await self.app(scope, receive, send)
    status, message = found
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
