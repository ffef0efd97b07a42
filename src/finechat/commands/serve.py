"""Serve a model over HTTP: an OpenAI-compatible API, ChatGLM-6B's POST / and a web chat page."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket
import sys

from finechat.config import add_config_arguments, config_from_args, field
from finechat.models.load import ModelOptions
from finechat.serve.api import ServeSettings

API_KEY_ENV = "FINECHAT_API_KEY"


@dataclasses.dataclass
class ServeConfig(ServeSettings, ModelOptions):
    """Settings of ``finechat serve`` and ``finechat web``."""

    host: str = field("127.0.0.1", help="address to bind; anything but loopback exposes the server to the network")
    port: int = field(8000, help="TCP port (0 = any free port)")
    tools: str | None = field(None, help="tools run inside the server: calculator,solver,search,text2image, all, or my_tools.py:function")
    docs: str | None = field(None, help="folder of .txt/.md/.jsonl documents for the search tool")
    medical: bool = field(False, help="medical demo: every answer ends with a not-medical-advice notice")
    knowledge: str | None = field(None, help="disease table (CSV) or knowledge graph (JSON) to retrieve from "
                                            "before answering, with sources shown (implies --medical)")

    def __post_init__(self) -> None:
        ServeSettings.__post_init__(self)
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


def main(args: argparse.Namespace, announce_page: bool = False) -> int:
    import uvicorn

    import finechat
    from finechat.models.load import log
    from finechat.serve.api import create_app

    cfg = config_from_args(ServeConfig, args)
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(cfg.host) and not api_key:
        log(f"WARNING: listening on {cfg.host} with no API key: anyone who can reach this machine can use the "
            f"model. Set --api-key or {API_KEY_ENV}.")
    registry = None
    if cfg.tools or cfg.docs:  # before loading the model: a wrong tool name or folder fails at once
        from finechat.tools.registry import build_registry

        registry = build_registry(cfg.tools or "", docs=cfg.docs)
        log(f"server-side tools: {', '.join(registry.names)}")
    bot = finechat.load(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, device=cfg.device, template=cfg.template,
                        quantization_bit=cfg.quantization_bit, trust_remote_code=cfg.trust_remote_code,
                        compile=cfg.compile)
    if cfg.medical or cfg.knowledge:  # ChatDoctor's autonomous mode + the notice (finechat.medical.retrieval)
        from finechat.medical.retrieval import DiseaseTable, MedicalAssistant

        bot = MedicalAssistant(bot, DiseaseTable.load(cfg.knowledge) if cfg.knowledge else None)
    settings = ServeSettings(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ServeSettings)})
    settings.api_key = api_key
    app = create_app(bot, settings, tools=registry)
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
    uvicorn.run(app, host=cfg.host, port=port, log_level="info", timeout_graceful_shutdown=5)
    return 0
