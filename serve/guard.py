"""Who may drive the server from a browser (pure ASGI middleware, outermost).

* ``Host`` allow-list (a server without ``--api-auth``): only requests naming the server by one of its own names
  (127.0.0.1, localhost, ::1, the ``--host`` it binds and what ``--allowed-hosts`` adds; any port) are answered,
  so a web page elsewhere cannot reach it through DNS rebinding (its requests carry the page's own host name).
  A request without ``Host`` (HTTP/1.0 tools) passes; ``--allowed-hosts '*'`` turns the check off.
* Cross-site posts: a state-changing request (any method but GET, HEAD, OPTIONS) is refused when the browser says
  it comes from another site: ``Sec-Fetch-Site`` other than ``same-origin`` / ``none``, else an ``Origin`` that is
  not the server's own (``null`` included). Requests without either header (curl, ``requests``, ``webuiapi``)
  pass: only browsers send them, and they always do on a cross-site post.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def host_name(value: str) -> str:
    """``Host`` / netloc text -> the lower-case name without port or IPv6 brackets ("[::1]:80" -> "::1")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def allowed_hosts(bind_host: str | None, extra: str | list[str] | None = None) -> set[str] | None:
    """The names the server answers to; None means any (``*`` among ``extra``)."""
    names = set(LOOPBACK_NAMES)
    if bind_host and bind_host not in WILDCARD_BINDS:
        names.add(host_name(bind_host))
    items = extra.split(",") if isinstance(extra, str) else list(extra or ())
    for item in (i.strip() for i in items):
        if item == "*":
            return None
        if item:
            names.add(host_name(item))
    return names


class HostGuard:
    """The two checks of the module docstring; ``hosts`` None skips the Host check (a server behind auth)."""

    def __init__(self, app, hosts: set[str] | None):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers") or []:
            headers.setdefault(k.lower(), v.decode("latin-1"))
        host = headers.get(b"host")
        if self.hosts is not None and host is not None and host_name(host) not in self.hosts:
            return await _refuse(send, 400, "InvalidHost",
                                 "this server does not answer to that host name (see --allowed-hosts)")
        if scope.get("method", "GET").upper() not in SAFE_METHODS and self._cross_site(headers, host):
            return await _refuse(send, 403, "CrossSiteRequest",
                                 "a state-changing request from another site's page is refused")
        return await self.app(scope, receive, send)

    def _cross_site(self, headers: dict, host: str | None) -> bool:
        site = headers.get(b"sec-fetch-site")
        if site is not None:
            return site.strip().lower() not in ("same-origin", "none")
        origin = headers.get(b"origin")
        if origin is None:
            return False
        parts = urlsplit(origin.strip())
        if not parts.netloc:
            return True  # "null" (a sandboxed frame, a file: page) or garbage
        if host is not None and parts.netloc.lower() == host.strip().lower():
            return False  # the server's own origin
        return self.hosts is None or host_name(parts.netloc) not in self.hosts


async def _refuse(send, status: int, error: str, detail: str) -> None:
    data = json.dumps({"error": error, "detail": detail, "body": "", "errors": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
