"""The Chat tab: ``finechat serve`` on a checkpoint, as a child process, behind the board's own address.

The board loads no model itself: a model that takes all memory, or crashes, ends a child, not the board. The
child is the project's own server and page (same engine, tools, medical retrieval), bound to 127.0.0.1 on a
free port with an API key only the board knows; the board forwards ``/chat/...`` to it (streams included), so
the browser talks to one address, under the board's key and Host / Origin / content-type checks.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from finechat.serve.board.workspace import Workspace
from finechat.serve.schemas import ApiError

CHAT_LOG = ".board-chat.log"
FORWARDED = ("content-type", "cache-control")
# The chat page in the board's frame: same rules as the page, but the board (same origin) may frame it.
FRAME_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
             "object-src 'none'; base-uri 'none'; frame-ancestors 'self'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChatServer:
    """At most one ``finechat serve`` child: start it on a model (+ adapter), report its state, forward to it."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.key = ""
        self.info: dict = {}
        self._client: Any = None

    def start(self, model: str, adapter: str | None, tools: str | None, knowledge: str | None,
              medical: bool) -> dict:
        self.stop()
        argv = ["serve", "--model", model, "--host", "127.0.0.1"]
        if adapter:
            argv += ["--adapter", adapter]
        if tools:
            argv += ["--tools", tools]
        if knowledge:
            argv += ["--knowledge", knowledge]
        if medical:
            argv += ["--medical"]
        self.port, self.key = free_port(), secrets.token_urlsafe(24)
        argv += ["--port", str(self.port)]
        env = {**os.environ, "FINECHAT_API_KEY": self.key}
        log = open(self.ws.root / CHAT_LOG, "w", encoding="utf-8")  # noqa: SIM115  the child writes it
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "finechat", *argv], cwd=self.ws.root,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        finally:
            log.close()
        self.info = {"model": model, "adapter": adapter, "tools": tools, "knowledge": knowledge, "medical": medical,
                     "started": time.time(), "command": "finechat " + " ".join(argv)}
        return self.status()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None
        self.info = {}

    def status(self) -> dict:
        if self.process is None:
            return {"state": "off"}
        log = _tail(self.ws.root / CHAT_LOG)
        if self.process.poll() is not None:
            return {**self.info, "state": "failed", "returncode": self.process.returncode, "log": log}
        return {**self.info, "state": "ready" if self._healthy() else "loading", "log": log}

    def _healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    async def forward(self, request: Any, path: str) -> Any:
        """Send ``request`` on to the chat server's ``/path`` and stream its answer back."""
        import httpx
        from starlette.background import BackgroundTask
        from starlette.responses import StreamingResponse

        if self.process is None or self.process.poll() is not None:
            raise ApiError(409, "model: no chat model is loaded; pick a checkpoint and press Load in the Chat tab",
                           param="model", code="no_model")
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5))
        headers = {"authorization": f"Bearer {self.key}"}
        if "content-type" in request.headers:
            headers["content-type"] = request.headers["content-type"]
        url = f"http://127.0.0.1:{self.port}/{path}"
        upstream_request = self._client.build_request(request.method, url, params=request.query_params,
                                                      headers=headers, content=await request.body())
        try:
            upstream = await self._client.send(upstream_request, stream=True)
        except httpx.HTTPError:
            raise ApiError(503, "model: the chat model is still loading; try again in a moment", param="model",
                           code="loading") from None
        out = {k: v for k, v in upstream.headers.items() if k.lower() in FORWARDED}
        out["content-security-policy"] = FRAME_CSP
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=out,
                                 background=BackgroundTask(upstream.aclose))

    async def close(self) -> None:
        self.stop()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _tail(path: Path, size: int = 3000) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[-size:]
