"""A live finechat server on 127.0.0.1 (uvicorn in a thread) for serving tests, and the scripted model double."""

from __future__ import annotations

import contextlib
import threading
import time

from scripted import ScriptedChat  # noqa: F401  (the serving tests import it from here)

from finechat.serve.server import ConnectionLimits, make_server


class LiveServer:
    """Runs ``app`` on a free port of 127.0.0.1 until ``stop()``, as ``finechat serve`` does (same uvicorn setup)."""

    def __init__(self, app, limits: ConnectionLimits | None = None):
        self.app = app
        self.server = make_server(app, "127.0.0.1", 0, limits or ConnectionLimits(shutdown_timeout=2),
                                  log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def healthy(url: str) -> bool:
    """Whether a server at ``url`` answers /health (a refused or hung connection is "not yet")."""
    import httpx

    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_cli_server(args: list[str], announce: str, env: dict):
    """Start ``finechat ARGS`` and wait until the address it announces (regex group 1) answers /health."""
    import re
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "finechat", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=env)
    line = process.stdout.readline()
    match = re.search(announce, line)
    if not match or not wait_until(lambda: healthy(match.group(1)), timeout=60):
        process.terminate()
        process.wait(timeout=30)
        raise AssertionError(f"the server did not come up: {line!r}")
    return process, match.group(1)


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def chromium_page(url: str):
    """A page of a headless Debian Chromium (fresh profile, removed after) opened at ``url``."""
    import shutil
    import tempfile

    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="finechat-chromium-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                           args=CHROMIUM_ARGS)
            try:
                page = context.new_page()
                page.goto(url)
                yield page
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
