"""Option groups that several commands share, and the steps that act on them (``chat``, ``serve``, ``web``).

A group is a dataclass mixed into a command's config: its fields become the command's flags and YAML keys.
"""

from __future__ import annotations

import dataclasses

from finechat.config import field
from finechat.generate.chat_loader import load
from finechat.generate.contract import ChatEngine
from finechat.generate.engine import ChatModel
from finechat.medical.retrieval import DiseaseTable, attach_medical
from finechat.models.options import ModelOptions
from finechat.tools.toolbox import ToolRegistry, build_registry


@dataclasses.dataclass
class AssistantOptions:
    """What the assistant may do besides answering: call tools, search documents, the medical demo."""

    tools: str | None = field(None, help="tools the model may call: calculator,solver,search,text2image, all, or "
                                         "my_tools.py:function")
    docs: str | None = field(None, help="folder of .txt/.md/.jsonl documents for the search tool")
    medical: bool = field(False, help="medical demo: every answer ends with a not-medical-advice notice")
    knowledge: str | None = field(None, help="disease table (CSV) or knowledge graph (JSON) to retrieve from "
                                            "before answering, with sources shown (implies --medical)")


@dataclasses.dataclass
class Assistant:
    """The parts built from :class:`AssistantOptions`, checked before the (slow) model load."""

    registry: ToolRegistry | None
    table: DiseaseTable | None
    medical: bool

    @classmethod
    def prepare(cls, options: AssistantOptions) -> Assistant:
        """Read the tools and the disease table now, so a wrong tool name, folder or table fails at once."""
        registry = build_registry(options.tools or "", docs=options.docs) if options.tools or options.docs else None
        table = DiseaseTable.load(options.knowledge) if options.knowledge else None
        return cls(registry, table, options.medical or bool(options.knowledge))

    def attach(self, bot: ChatEngine) -> ChatEngine:
        """``bot`` made the medical demo (ChatDoctor's retrieval + the notice, a hook) when asked for; returns it."""
        return attach_medical(bot, self.table) if self.medical else bot


def load_chat_model(options: ModelOptions) -> ChatModel:
    """The model ``options`` name with its adapter and template, ready to chat."""
    return load(options.model, adapter=options.adapter, dtype=options.dtype, device=options.device,
                template=options.template, quantization_bit=options.quantization_bit,
                trust_remote_code=options.trust_remote_code, compile=options.compile, engine=options.engine)
