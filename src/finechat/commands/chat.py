"""Chat with a model in the terminal (streams answers; reads one query per line from a pipe)."""

from __future__ import annotations

import argparse
import dataclasses

from finechat.commands._options import Assistant, AssistantOptions, load_chat_model
from finechat.config import add_config_arguments, config_from_args, field, load_yaml
from finechat.console import log
from finechat.generate.settings import GenerationSettings
from finechat.models.options import ModelOptions
from finechat.serve.terminal import run_terminal_chat
from finechat.tools.agent import Agent


@dataclasses.dataclass
class ChatConfig(GenerationSettings, ModelOptions, AssistantOptions):
    """Settings of ``finechat chat``."""

    system: str | None = field(None, help="system prompt")
    show_thoughts: bool = field(False, help="show MOSS's inner thoughts when tools are on")
    max_tool_rounds: int = field(4, help="most rounds of tool calls per answer")

    def __post_init__(self) -> None:
        GenerationSettings.__post_init__(self)
        ModelOptions.__post_init__(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ChatConfig)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(ChatConfig, args)
    assistant = Assistant.prepare(cfg)
    bot = assistant.attach(load_chat_model(cfg))  # the medical demo is a hook on the engine: tools get it too
    names = {f.name for f in dataclasses.fields(GenerationSettings)}
    typed = {k for k in vars(args) if k in names} | {o.split("=", 1)[0] for o in args.overrides or []}
    if args.config:
        typed |= set(load_yaml(args.config))
    # Only the settings the user chose override the template's own defaults (e.g. ChatGLM's top_p 0.7).
    generation = {k: getattr(cfg, k) for k in names if k in typed}
    agent = None
    if assistant.registry is not None:
        registry = assistant.registry
        agent = Agent(bot, registry, max_rounds=cfg.max_tool_rounds, show_thoughts=cfg.show_thoughts)
        log(f"tools: {', '.join(registry.names)} ({agent.protocol} protocol)")
        search = registry.get("Search")
        if search is not None and hasattr(getattr(search.fn, "backend", None), "summary"):
            log(f"search: {search.fn.backend.summary}")
    return run_terminal_chat(bot, generation, system=cfg.system, agent=agent)
