"""The one training-example schema every data format is read into: a Conversation of Turns.

Readers (``finechat.data.formats``) fill it from any supported file; templates and tokenization
(``finechat.data.templates``, ``finechat.data.tokenize``) read it.
"""

from __future__ import annotations

import dataclasses

from finechat.errors import DataError

ROLES = ("user", "assistant", "tool")


@dataclasses.dataclass
class Turn:
    """One turn: ``user`` text, an ``assistant`` answer (or tool call), or a ``tool`` result."""

    role: str
    content: str
    name: str | None = None  # tool name for tool turns, when the data names it

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DataError(f"turn role {self.role!r} is not one of {', '.join(ROLES)}")


@dataclasses.dataclass
class Conversation:
    """A training example: optional system text, turns, optional tool definitions and where it came from."""

    turns: list[Turn]
    system: str | None = None
    tools: list | None = None
    source: str | None = None  # file the record was read from
    line: int | None = None  # 1-based line where the record starts
    meta: dict = dataclasses.field(default_factory=dict)

    def messages(self) -> list[dict[str, str]]:
        """Template messages: ``[{"role", "content"}]`` with the system message first when there is one."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        out += [{"role": t.role, "content": t.content} for t in self.turns]
        return out

    @property
    def where(self) -> str:
        return f"{self.source or '<data>'}:{self.line or '?'}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Conversation:
        return cls(turns=[Turn(**t) for t in d["turns"]], system=d.get("system"), tools=d.get("tools"),
                   source=d.get("source"), line=d.get("line"), meta=dict(d.get("meta") or {}))
