"""Chat with a model in the terminal (streams answers; reads one query per line from a pipe)."""

from __future__ import annotations

import argparse
import dataclasses

from finechat.config import add_config_arguments, config_from_args, field
from finechat.infer.engine import GenerationSettings
from finechat.models.load import ModelOptions


@dataclasses.dataclass
class ChatConfig(GenerationSettings, ModelOptions):
    """Settings of ``finechat chat``."""

    system: str | None = field(None, help="system prompt")

    def __post_init__(self) -> None:
        GenerationSettings.__post_init__(self)
        ModelOptions.__post_init__(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ChatConfig)


def main(args: argparse.Namespace) -> int:
    import finechat
    from finechat.serve.terminal import run_terminal_chat

    cfg = config_from_args(ChatConfig, args)
    bot = finechat.load(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, device=cfg.device, template=cfg.template,
                        quantization_bit=cfg.quantization_bit, trust_remote_code=cfg.trust_remote_code)
    names = {f.name for f in dataclasses.fields(GenerationSettings)}
    typed = {k for k in vars(args) if k in names} | {o.split("=", 1)[0] for o in args.overrides or []}
    if args.config:
        from finechat.config import load_yaml

        typed |= set(load_yaml(args.config))
    # Only the settings the user chose override the template's own defaults (e.g. ChatGLM's top_p 0.7).
    generation = {k: getattr(cfg, k) for k in names if k in typed}
    return run_terminal_chat(bot, generation, system=cfg.system)
