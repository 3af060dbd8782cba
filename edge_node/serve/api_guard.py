"""Request checks in front of every route of the node's local API (an ASGI middleware).

The API listens on loopback, but the radiologist's browser is on the same machine, so any web
page it has open can send requests to it (CSRF), and a name that resolves to 127.0.0.1 can
make the page's own origin the node (DNS rebinding). In order, each request:

1. ``Host`` must name this node: the configured host, ``127.0.0.1``, ``localhost`` or
   ``[::1]`` (plus ``api.allowed_hosts``), with the port the server listens on (no port only
   when that is 80). Anything else is 400: a rebinding page sends its own name.
2. A request with an ``Origin`` header must come from the node's own page
   (``http://<allowed host>:<port>``; ``Origin: null`` is foreign), and one that a browser
   marks ``Sec-Fetch-Site: cross-site`` or ``same-site`` (another port of 127.0.0.1 is the
   same site) is refused unless it is a top-level navigation (a link to the node's page):
   403. So another page can neither write nor embed a thumbnail or probe which ids exist.
   Clients that send neither header (curl, scripts) pass: they are not a browser tricked by
   a page.
3. Their body must be of the route's media type: ``application/json``, except the routes in
   ``upload_types`` (``POST /api/predict``: ``application/dicom``); otherwise 415. An HTML
   form cannot send either type, and a cross-origin fetch with them needs a CORS preflight
   that this server never grants.
4. Bodies are bounded: a ``Content-Length`` above the route's bound is 413 before anything is
   read, and a body without one (chunked) is counted while it streams and cut at the bound
   (`BodyTooLarge`, answered 413 here when a handler lets it propagate). A body nested too
   deep for ``json.loads`` (RecursionError in any route) is answered 400, not 500.

Refusals are JSON ``{"error": ...}`` and carry no request data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
JSON_TYPE = "application/json"
MAX_JSON_BYTES = 64 * 1024  # any body but an upload: labels are a few hundred bytes
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


class BodyTooLarge(Exception):
    """The request body passed its bound while it was read (answered 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


class BadJson(ValueError):
    """A body that is not JSON, or nested too deep to parse."""


def parse_json(body: bytes) -> Any:
    """``json.loads`` that turns every way a body can fail (bytes, syntax, nesting deep
    enough to exhaust the recursion limit) into BadJson."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadJson(type(exc).__name__) from exc


def host_name(value: str) -> str:
    """The host part of a ``Host`` value, lower case; IPv6 literals keep their brackets."""
    return value.strip().lower().rstrip(".")


def split_host(value: str) -> tuple[str, int | None] | None:
    """(host, port) of a ``Host`` header; None when it is not host[:port]."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/@ \t\\"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        host, _, port_text = value.partition(":")
        port_text = port_text if ":" in value else None
    if port_text is None:
        return host_name(host), None
    if not port_text.isdigit() or len(port_text) > 5:
        return None
    return host_name(host), int(port_text)


def allowed_host_names(configured: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host names the node answers to: its configured host, loopback names, ``extra``."""
    names = {*LOOPBACK_NAMES, *(host_name(h) for h in extra)}
    host = host_name(configured)
    names.add(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    return frozenset(names)


class RequestGuard:
    """ASGI middleware: Host, Origin, content type and body size checks (module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        hosts: Iterable[str],
        upload_types: Mapping[str, str],
        max_upload_bytes: int,
        max_body_bytes: int = MAX_JSON_BYTES,
    ) -> None:
        self.app = app
        self.hosts = frozenset(hosts)
        self.upload_types = dict(upload_types)
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        server = scope.get("server")
        port = int(server[1]) if server and server[1] is not None else None
        refusal = self._refusal(scope, headers, port)
        if refusal is not None:
            await _send_json(send, *refusal)
            return
        path = str(scope.get("path", ""))
        limit = self.max_upload_bytes if path in self.upload_types else self.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                await _send_json(send, 400, "Content-Length is not a number")
                return
            if int(length) > limit:
                await _send_json(send, 413, f"request body larger than {limit} bytes")
                return
        await self._call_capped(scope, receive, send, limit)

    def _refusal(
        self, scope: Scope, headers: dict[str, str], port: int | None
    ) -> tuple[int, str] | None:
        if not self._host_ok(headers.get("host", ""), port):
            return 400, "Host header does not name this node (see api.allowed_hosts)"
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, port):
            return 403, "cross-origin request refused: only the node's own page may use the API"
        site = headers.get("sec-fetch-site", "none")
        navigation = headers.get("sec-fetch-mode") == "navigate"
        method = str(scope.get("method", "GET")).upper()
        if site not in ("same-origin", "none") and (method not in SAFE_METHODS or not navigation):
            return 403, "cross-site request refused: only the node's own page may use the API"
        if method in SAFE_METHODS:
            return None
        path = str(scope.get("path", ""))
        want = self.upload_types.get(path, JSON_TYPE)
        given = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if given != want:
            return 415, f"Content-Type must be {want}"
        return None

    def _host_ok(self, value: str, port: int | None) -> bool:
        parsed = split_host(value)
        if parsed is None or parsed[0] not in self.hosts:
            return False
        given_port = parsed[1] if parsed[1] is not None else 80
        return port is None or given_port == port

    def _origin_ok(self, origin: str, port: int | None) -> bool:
        try:
            parts = urlsplit(origin.strip())
            origin_port = parts.port
        except ValueError:
            return False
        if parts.scheme != "http" or parts.path or parts.query or not parts.hostname:
            return False
        host = parts.hostname.lower()
        if ":" in host:
            host = f"[{host}]"
        origin_port = origin_port if origin_port is not None else 80
        return host in self.hosts and (port is None or origin_port == port)

    async def _call_capped(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:
            if not started:
                await _send_json(send, 413, str(exc))
        except RecursionError:
            # json.loads on a body nested deeper than the interpreter's recursion limit (a
            # route parsing JSON itself): the request's fault, 400, not a 500
            log.warning("request to %s refused: nested too deep to parse", scope.get("path"))
            if not started:
                await _send_json(send, 400, "request body nested too deep")


def _headers(scope: Scope) -> dict[str, str]:
    """Header names lower case; a repeated header keeps its first value."""
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        out.setdefault(name, raw_value.decode("latin-1"))
    return out


async def _send_json(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
