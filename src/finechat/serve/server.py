"""Running the app with uvicorn so that no client can take the server down: slow clients, floods, shutdown.

uvicorn holds a connection that never finishes its request for ever (its keep-alive timeout starts only
after a response, and any byte received stops it), and takes connections until the process runs out of file
descriptors, then logs the same error as fast as it can. :func:`make_server` adds what it lacks:

- a request deadline: a connection gets ``request_timeout`` seconds from its first byte (or from opening)
  to send a complete request, headers and body, else it is closed (slowloris);
- a cap on open connections: past ``max_connections`` a new connection closes the one that has waited
  longest without a complete request, or is itself refused when every connection is busy;
- a log filter that lets the same warning or error through at most a few times a second, then says how
  many it held back;
- a drain on SIGTERM / Ctrl-C: running requests get ``shutdown_timeout`` seconds to finish, then end
  cleanly (a 503 in OpenAI's error shape, a final event in a stream) before uvicorn would cut them off.

These hook into uvicorn's h11 protocol class (uvicorn's own settings have no request deadline and no
connection cap that closes sockets; ``limit_concurrency`` answers 503 in plain text but keeps the socket).
Headers larger than h11's 16 KiB limit are already a 400.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from finechat.config import field

LOGGERS = ("uvicorn.error", "uvicorn.access", "asyncio")


@dataclasses.dataclass
class ConnectionLimits:
    """How long and how many connections the server holds, and how it stops."""

    max_connections: int = field(256, help="most open connections; past it, idle ones are closed first")
    request_timeout: float = field(20.0, help="seconds a client has to send a complete request; slower ones are "
                                              "closed")
    shutdown_timeout: float = field(10.0, help="seconds running requests get to finish on SIGTERM / Ctrl-C; then "
                                               "they end with a 503 (a final error event in a stream)")

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        for name in ("request_timeout", "shutdown_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class RateLimit(logging.Filter):
    """Lets each distinct warning or error (logger, level, message template, exception type) through at most
    ``per_second`` times a second; the first one after a held-back run says how many were held back."""

    def __init__(self, per_second: int = 5, clock: Any = time.monotonic):
        super().__init__()
        self.per_second, self.clock = per_second, clock
        self._window_lock = threading.Lock()
        self._seen: dict[tuple, list] = {}  # key -> [window start, passed in window, held back since last shown]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        key = (record.name, record.levelno, str(record.msg), exc)
        now = self.clock()
        with self._window_lock:
            if len(self._seen) > 1000:  # many distinct messages: forget the old windows
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < 1.0}
            state = self._seen.setdefault(key, [now, 0, 0])
            if now - state[0] >= 1.0:
                state[0], state[1] = now, 0
            if state[1] >= self.per_second:
                state[2] += 1
                return False
            state[1] += 1
            held, state[2] = state[2], 0
        if held:
            record.msg = f"{record.msg} [{held} more like this held back]"
        return True


def install_log_limit(per_second: int = 5) -> None:
    """Put one :class:`RateLimit` on uvicorn's and asyncio's loggers (once per process)."""
    shared = RateLimit(per_second)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimit) for f in logger.filters):
            logger.addFilter(shared)


def make_server(app: Any, host: str, port: int, limits: ConnectionLimits | None = None,
                log_level: str = "info") -> Any:
    """A ``uvicorn.Server`` for ``app`` with the request deadline, connection cap, log limit and drain above."""
    import uvicorn

    limits = limits or ConnectionLimits()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_guarded_protocol(limits),
                            timeout_graceful_shutdown=limits.shutdown_timeout)
    install_log_limit()
    return _server_class()(config, getattr(getattr(app, "state", None), "drain", None), limits.shutdown_timeout)


def serve(app: Any, host: str, port: int, limits: ConnectionLimits | None = None) -> None:
    """Serve ``app`` until SIGTERM / Ctrl-C (see :func:`make_server`)."""
    make_server(app, host, port, limits).run()


def _server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server; on the first SIGTERM / Ctrl-C it also starts the app's drain."""

        def __init__(self, config: Any, drain: Any, timeout: float):
            super().__init__(config)
            self.drain, self.timeout = drain, timeout

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit and self.drain is not None:
                # end running requests a little before uvicorn's own deadline, so their endings get out
                self.drain.begin(after=max(0.0, self.timeout - min(1.0, self.timeout / 2)))
            super().handle_exit(sig, frame)

    return DrainingServer


def _guarded_protocol(limits: ConnectionLimits) -> type:
    """uvicorn's h11 protocol with a request deadline and a cap on open connections."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._deadline: Any = None
            self._waiting_since = time.monotonic()
            self._arm()
            if len(self.connections) > limits.max_connections:
                self._make_room()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self._waiting():
                self._arm()  # a new request on a kept-alive connection: its clock starts with its first byte
            super().data_received(data)

        def on_response_complete(self) -> None:
            self._disarm()  # idle until the next request: uvicorn's keep-alive timeout applies
            self._waiting_since = time.monotonic()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _waiting(self) -> bool:
            """Whether this connection still owes a complete request (nothing sent yet, or headers or body
            unfinished with no answer started)."""
            cycle = self.cycle
            return cycle is None or cycle.response_complete or (cycle.more_body and not cycle.response_started)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.request_timeout, self._expire)

        def _disarm(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._waiting() and not self.transport.is_closing():
                self.logger.warning("closed a connection that sent no complete request in %ss",
                                    limits.request_timeout)
                self.transport.close()

        def _make_room(self) -> None:
            idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)
                    and c._waiting() and not c.transport.is_closing()]
            victim = min(idle, key=lambda c: c._waiting_since) if idle else self
            self.logger.warning("%s open connections: closed %s", limits.max_connections,
                                "the new one (all are busy)" if victim is self else "the longest-waiting idle one")
            victim._disarm()
            victim.transport.close()

    return GuardedH11Protocol
