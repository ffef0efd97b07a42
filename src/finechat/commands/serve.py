"""Serve a model over HTTP: an OpenAI-compatible API, ChatGLM-6B's POST / and a web chat page."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket
import sys
from pathlib import Path

from finechat.commands._options import Assistant, AssistantOptions, load_chat_model
from finechat.config import add_config_arguments, config_from_args, field
from finechat.console import log
from finechat.errors import ConfigError
from finechat.models.options import ModelOptions
from finechat.serve.api import create_app
from finechat.serve.schemas import ServeSettings
from finechat.serve.server import ConnectionLimits, serve

API_KEY_ENV = "FINECHAT_API_KEY"


@dataclasses.dataclass
class ServeConfig(ServeSettings, ConnectionLimits, ModelOptions, AssistantOptions):
    """Settings of ``finechat serve`` and ``finechat web``."""

    host: str = field("127.0.0.1", help="address to bind; anything but loopback exposes the server to the network")
    port: int = field(8000, help="TCP port (0 = any free port)")
    api_key_file: str | None = field(None, help=f"read the API key from this file (unlike --api-key, it stays "
                                                f"out of `ps`, as {API_KEY_ENV} does)")

    def __post_init__(self) -> None:
        ServeSettings.__post_init__(self)
        ConnectionLimits.__post_init__(self)
        ModelOptions.__post_init__(self)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ServeConfig)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_api_key(cfg: ServeConfig) -> str | None:
    """The key from --api-key, --api-key-file or FINECHAT_API_KEY (in that order; the first two exclude each
    other); a key file that cannot be read or holds no single line is a one-line error."""
    if cfg.api_key and cfg.api_key_file:
        raise ConfigError("give --api-key or --api-key-file, not both")
    if cfg.api_key_file:
        path = Path(cfg.api_key_file)
        try:
            lines = path.read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the API key file: {getattr(e, 'strerror', None) or e}") from None
        if len(lines) != 1 or not lines[0].strip():
            raise ConfigError(f"{path}: the API key file must hold the key on one line, found {len(lines)} lines")
        return lines[0].strip()
    if cfg.api_key:
        log(f"note: --api-key shows in `ps` to every user of this machine; {API_KEY_ENV} or --api-key-file do not")
        return cfg.api_key
    return os.environ.get(API_KEY_ENV) or None


def main(args: argparse.Namespace, announce_page: bool = False) -> int:
    cfg = config_from_args(ServeConfig, args)
    api_key = resolve_api_key(cfg)
    if not is_loopback(cfg.host) and not api_key:
        log(f"WARNING: listening on {cfg.host} with no API key: anyone who can reach this machine can use the "
            f"model. Set {API_KEY_ENV} or --api-key-file.")
    assistant = Assistant.prepare(cfg)
    if assistant.registry is not None:
        log(f"server-side tools: {', '.join(assistant.registry.names)}")
    bot = assistant.attach(load_chat_model(cfg))
    settings = ServeSettings(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ServeSettings)})
    settings.api_key = api_key
    settings.allowed_hosts = [cfg.host, *cfg.allowed_hosts]  # the Host names it was bound for, and the user's
    app = create_app(bot, settings, tools=assistant.registry)
    port = cfg.port or free_port(cfg.host)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    base = f"http://{shown}:{port}"
    key_note = " (API key required)" if api_key else ""
    if announce_page:
        print(f"finechat web: open {base}/ in a browser", flush=True)
    else:
        print(f"finechat serve: OpenAI API at {base}/v1{key_note}, ChatGLM API at POST {base}/, web page at {base}/",
              flush=True)
    sys.stdout.flush()
    limits = ConnectionLimits(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ConnectionLimits)})
    serve(app, cfg.host, port, limits)
    return 0
