"""A live finechat server on 127.0.0.1 (uvicorn in a thread) and a scripted model double for serving tests."""

from __future__ import annotations

import threading
import time

from finechat.generate.engine import ChatModel
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


class ScriptedChat(ChatModel):
    """A model double: whatever the prompt, it "generates" the tokens of ``text``, one every ``delay`` seconds."""

    def __init__(self, tokenizer, text: str, delay: float = 0.0):
        super().__init__(model=None, tokenizer=tokenizer, template="tokenizer")
        self.script = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.delay = delay
        self.running = 0  # generations in progress (a dropped client must bring this back to 0)
        self.prompts: list[list[int]] = []

    def generate_ids(self, input_ids, settings):
        self.running += 1
        self.prompts.append(list(input_ids))
        try:
            for token in self.script[: settings.max_new_tokens]:
                if self.delay:
                    time.sleep(self.delay)
                yield [token]
        finally:
            self.running -= 1


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
