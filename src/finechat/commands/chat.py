"""Chat with a model in the terminal (streams answers; reads one query per line from a pipe)."""

from __future__ import annotations

import argparse
import dataclasses

from finechat.config import add_config_arguments, config_from_args, field
from finechat.generate.engine import GenerationSettings
from finechat.models.load import ModelOptions


@dataclasses.dataclass
class ChatConfig(GenerationSettings, ModelOptions):
    """Settings of ``finechat chat``."""

    system: str | None = field(None, help="system prompt")
    tools: str | None = field(None, help="tools the model may call: calculator,solver,search,text2image, all, or my_tools.py:function")
    docs: str | None = field(None, help="folder of .txt/.md/.jsonl documents for the search tool")
    show_thoughts: bool = field(False, help="show MOSS's inner thoughts when tools are on")
    max_tool_rounds: int = field(4, help="most rounds of tool calls per answer")
    medical: bool = field(False, help="medical demo: every answer ends with a not-medical-advice notice")
    knowledge: str | None = field(None, help="disease table (CSV) or knowledge graph (JSON) to retrieve from "
                                            "before answering, with sources shown (implies --medical)")

    def __post_init__(self) -> None:
        GenerationSettings.__post_init__(self)
        ModelOptions.__post_init__(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ChatConfig)


def main(args: argparse.Namespace) -> int:
    import finechat
    from finechat.serve.terminal import run_terminal_chat

    cfg = config_from_args(ChatConfig, args)
    registry = None
    if cfg.tools or cfg.docs:  # before loading the model: a wrong tool name or folder fails at once
        from finechat.tools.registry import build_registry

        registry = build_registry(cfg.tools or "", docs=cfg.docs)
    table = None
    if cfg.knowledge:  # before loading the model: a bad table fails at once
        from finechat.medical.retrieval import DiseaseTable

        table = DiseaseTable.load(cfg.knowledge)
    bot = finechat.load(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, device=cfg.device, template=cfg.template,
                        quantization_bit=cfg.quantization_bit, trust_remote_code=cfg.trust_remote_code,
                        compile=cfg.compile)
    names = {f.name for f in dataclasses.fields(GenerationSettings)}
    typed = {k for k in vars(args) if k in names} | {o.split("=", 1)[0] for o in args.overrides or []}
    if args.config:
        from finechat.config import load_yaml

        typed |= set(load_yaml(args.config))
    # Only the settings the user chose override the template's own defaults (e.g. ChatGLM's top_p 0.7).
    generation = {k: getattr(cfg, k) for k in names if k in typed}
    agent = None
    if registry is not None:
        from finechat.models.load import log
        from finechat.tools.agent import Agent

        agent = Agent(bot, registry, max_rounds=cfg.max_tool_rounds, show_thoughts=cfg.show_thoughts)
        log(f"tools: {', '.join(registry.names)} ({agent.protocol} protocol)")
        search = registry.get("Search")
        if search is not None and hasattr(getattr(search.fn, "backend", None), "summary"):
            log(f"search: {search.fn.backend.summary}")
    if cfg.medical or cfg.knowledge:  # ChatDoctor's autonomous mode + the notice (finechat.medical.retrieval)
        from finechat.medical.retrieval import MedicalAssistant

        bot = MedicalAssistant(bot, table)
    return run_terminal_chat(bot, generation, system=cfg.system, agent=agent)
