"""Start the board: a local web app to prepare data, train, evaluate, chat and export (finechat board).

  finechat board                          # http://127.0.0.1:7860/, workspace ./finechat-board
  finechat board --workspace DIR --port 0

Runs, evaluations and exports are `finechat` child processes whose state lives in their folders in the
workspace: a board restart or a browser reload finds them again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from finechat.commands.serve import API_KEY_ENV, free_port, is_loopback
from finechat.config import add_config_arguments, config_from_args, field, finechat_home
from finechat.console import log
from finechat.errors import ConfigError
from finechat.serve.board.board_app import BoardSettings, create_board_app
from finechat.serve.server import ConnectionLimits, serve


@dataclasses.dataclass
class BoardConfig(ConnectionLimits):
    """Settings of ``finechat board``."""

    workspace: str | None = field(None, help="folder for uploads, runs, evaluations and exports (default: "
                                             "./finechat-board, or $FINECHAT_HOME/board when FINECHAT_HOME is set)")
    host: str = field("127.0.0.1", help="address to bind; anything but loopback exposes the board to the network")
    port: int = field(7860, help="TCP port (0 = any free port)")
    api_key_file: str | None = field(None, help=f"read the API key from this file (or set {API_KEY_ENV})")
    allowed_hosts: list[str] = field([], help="Host names accepted besides localhost, 127.0.0.1 and [::1]")
    max_running: int = field(1, help="jobs (runs, evaluations, exports) running at once; the rest wait in the queue")
    max_upload_mb: int = field(64, help="largest upload in MB")
    recipes: str | None = field(None, help="folder of recipe YAML files to start a run from (default: ./recipes)")

    def __post_init__(self) -> None:
        ConnectionLimits.__post_init__(self)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_running < 1 or self.max_upload_mb < 1:
            raise ValueError("max_running and max_upload_mb must be >= 1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, BoardConfig)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(BoardConfig, args)
    api_key = None
    if cfg.api_key_file:
        try:
            api_key = open(cfg.api_key_file, encoding="utf-8").read().strip()
        except OSError as e:
            raise ConfigError(f"{cfg.api_key_file}: cannot read the API key file: {e.strerror}") from None
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(cfg.host) and not api_key:
        log(f"WARNING: listening on {cfg.host} with no API key: anyone who can reach this machine can start "
            f"processes and read the workspace. Set {API_KEY_ENV} or --api-key-file.")
    workspace = cfg.workspace or (str(finechat_home() / "board") if os.environ.get("FINECHAT_HOME")
                                  else "finechat-board")
    settings = BoardSettings(api_key=api_key, allowed_hosts=[cfg.host, *cfg.allowed_hosts],
                             max_body_bytes=cfg.max_upload_mb * 1_000_000, max_running=cfg.max_running,
                             recipes=cfg.recipes)
    app = create_board_app(workspace, settings)
    port = cfg.port or free_port(cfg.host)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"finechat board: open http://{shown}:{port}/ in a browser (workspace {app.state.board.ws.root}"
          f"{', API key required' if api_key else ''})", flush=True)
    limits = ConnectionLimits(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ConnectionLimits)})
    serve(app, cfg.host, port, limits)
    return 0
