"""The checks in front of every route that keep other web sites out: Host names, JSON-only bodies, page headers.

Any web page the user visits may send requests to a server on 127.0.0.1. A form post or a ``text/plain``
fetch is a "simple" cross-site request, sent without asking the server first (no CORS preflight); and DNS
rebinding points an attacker's own name at 127.0.0.1, so that its page may even read the answers. Hence:

- the ``Host`` header must name this server (localhost, 127.0.0.1, [::1], the address it was bound to, or a
  name the user allowed), else 421;
- POST bodies must be ``Content-Type: application/json`` (a cross-site page cannot send that without a
  preflight, which the server refuses unless CORS allows the origin), else 415;
- every response carries the page's security headers (Content-Security-Policy, nosniff, no referrer), so the
  page's scripts and styles under ``/static`` get them as ``/`` does.

Starlette's ``TrustedHostMiddleware`` answers in plain text, refuses requests without a Host (HTTP/1.0) and
cuts ``[::1]:8000`` at its first colon; ours answers in OpenAI's error shape and parses IPv6 literals.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from typing import Any

from finechat.serve.schemas import error_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
BODY_METHODS = ("POST", "PUT", "PATCH")


def api_key_problem(authorization: str, api_key: str | None) -> str | None:
    """Why an ``Authorization`` header does not carry ``api_key``: "missing" (no ``Bearer KEY``) or "invalid"
    (another key, compared in constant time); None when it does or no key is set. The server and the board
    word their own 401s from it."""
    if not api_key:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return "missing"
    return None if hmac.compare_digest(token.strip().encode(), api_key.encode()) else "invalid"


class HostNames:
    """The Host names a server accepts: the loopback names and ``allowed`` (its bind address, the user's list).

    ``*`` accepts any name. A server bound to all interfaces (``0.0.0.0`` / ``::``) also accepts any IP
    address and the machine's own name: DNS rebinding needs a name that the attacker controls.
    """

    def __init__(self, allowed: list[str]):
        names = {_normalize(name) for name in allowed}
        self.any = "*" in names
        self.any_address = bool(names & set(WILDCARD_ADDRESSES))
        if self.any_address:
            names.add(_normalize(socket.gethostname()))
        self.names = names | set(LOOPBACK_NAMES)

    def allows(self, host_header: str) -> bool:
        if self.any:
            return True
        host = _normalize(_strip_port(host_header))
        if host in self.names:
            return True
        if self.any_address:
            try:
                ipaddress.ip_address(host)
                return True
            except ValueError:
                return False
        return False


def _strip_port(value: str) -> str:
    value = value.strip()
    if value.startswith("["):  # [::1]:8000
        return value[1:].partition("]")[0]
    name, colon, port = value.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else value


def _normalize(name: str) -> str:
    name = name.strip().lower().rstrip(".")
    return name[1:-1] if name.startswith("[") and name.endswith("]") else name


class RequestGuard:
    """ASGI middleware: 421 for a Host this server does not answer to, 415 for a body that is not JSON, and the
    security ``headers`` on every response (added where a route did not set them)."""

    def __init__(self, app: Any, hosts: HostNames, headers: dict[str, str]):
        self.app, self.hosts = app, hosts
        self.headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host")
        if host is not None and not self.hosts.allows(host.decode("latin-1")):
            shown = host.decode("latin-1")[:100]
            return await self._reply(send, 421, f"this server does not answer to the host {shown!r}; start it "
                                     "with --allowed-hosts NAME to accept that name", "host_not_allowed")
        if scope["method"] in BODY_METHODS and not _is_json(headers.get(b"content-type")):
            return await self._reply(send, 415, "send the body as JSON with 'Content-Type: application/json'",
                                     "unsupported_media_type")
        await self.app(scope, receive, self._with_headers(send))

    def _with_headers(self, send: Any) -> Any:
        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        return send_with_headers

    async def _reply(self, send: Any, status: int, message: str, code: str) -> None:
        body = json.dumps(error_body(message, code=code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *self.headers]})
        await send({"type": "http.response.body", "body": body})


def _is_json(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.split(b";")[0].strip().lower() == b"application/json"
