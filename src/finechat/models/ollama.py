"""Write an Ollama ``Modelfile`` beside an exported GGUF: FROM, TEMPLATE, SYSTEM, stop tokens, sampling.

Ollama's TEMPLATE is a Go template, and a Jinja chat template cannot be translated in general. But a chat
template is, in practice, "each role's content between a fixed prefix and suffix", so the pieces are read
off the tokenizer's own rendering of a conversation with marker contents: the text around each marker is
that role's prefix and suffix, split at the end-of-turn token. The pieces are then checked by rendering a
*different* conversation both ways (Jinja, and the Go template's logic in Python); if the two differ (a
template with per-turn logic, e.g. round numbers), the Modelfile gets no TEMPLATE and says why, and
Ollama falls back to the chat template stored in the GGUF's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finechat.files import atomic_file

_MARK = {"system": "QxSYSTEMxQ", "user": "QxUSERxQ", "assistant": "QxASSISTANTxQ", "user2": "QxUSER2xQ"}


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _split_at_end_of_turn(gap: str, stops: list[str]) -> tuple[str, str]:
    """(suffix of the turn before, prefix of the turn after): the cut goes after the end-of-turn marker."""
    for stop in stops:
        if stop and stop in gap:
            cut = gap.index(stop) + len(stop)
            while cut < len(gap) and gap[cut] in "\r\n":
                cut += 1
            return gap[:cut], gap[cut:]
    return "", gap


def _role_pieces(tokenizer: Any, stops: list[str]) -> tuple[dict, str | None] | None:
    """{role: (prefix, suffix)} and the default system prompt the template inserts, or None if unreadable."""
    m = _MARK
    try:
        full = _render(tokenizer, [{"role": "system", "content": m["system"]}, {"role": "user", "content": m["user"]},
                                   {"role": "assistant", "content": m["assistant"]},
                                   {"role": "user", "content": m["user2"]}])
        bare = _render(tokenizer, [{"role": "user", "content": m["user"]}])
    except Exception:  # noqa: BLE001  a template that refuses a system turn, raises on roles, ...
        return None
    marks = [m["system"], m["user"], m["assistant"], m["user2"]]
    if any(full.count(x) != 1 for x in marks):
        return None
    at = [full.index(x) for x in marks]
    if at != sorted(at):
        return None
    gaps = [full[at[i] + len(marks[i]):at[i + 1]] for i in range(3)]
    sys_suffix, user_prefix = _split_at_end_of_turn(gaps[0], stops)
    user_suffix, asst_prefix = _split_at_end_of_turn(gaps[1], stops)
    asst_suffix, user_prefix2 = _split_at_end_of_turn(gaps[2], stops)
    if user_prefix2 != user_prefix or full[at[3] + len(marks[3]):] != user_suffix + asst_prefix:
        return None
    pieces = {"system": (full[:at[0]], sys_suffix), "user": (user_prefix, user_suffix),
              "assistant": (asst_prefix, asst_suffix)}
    turn = user_prefix + m["user"] + user_suffix + asst_prefix
    default_system = None
    if bare != turn:
        head = pieces["system"][0]
        tail = sys_suffix + turn
        if not (bare.startswith(head) and bare.endswith(tail)):
            return None
        default_system = bare[len(head):len(bare) - len(tail)]
    return pieces, default_system


def _simulate(pieces: dict, messages: list[dict]) -> str:
    """What the Go template written by :func:`go_template` renders for ``messages`` (Ollama's loop)."""
    text = "".join(pieces[msg["role"]][0] + msg["content"] + pieces[msg["role"]][1] for msg in messages)
    return text + pieces["assistant"][0]


def go_template(pieces: dict) -> str:
    """An Ollama TEMPLATE (Go text/template over .Messages) from each role's prefix and suffix."""
    parts = ["{{ range .Messages }}"]
    for i, role in enumerate(("system", "user", "assistant")):
        prefix, suffix = pieces[role]
        parts.append(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{prefix}{{{{ .Content }}}}{suffix}')
    parts.append("{{ end }}{{ end }}" + pieces["assistant"][0])
    return "".join(parts)


def modelfile_text(gguf_name: str, tokenizer: Any, stops: list[str], sampling: dict) -> tuple[str, str | None]:
    """The Modelfile's text and, when no TEMPLATE could be written, the reason."""
    lines = ["# Written by finechat export --to gguf. Run: ollama create NAME -f THIS_FILE && ollama run NAME",
             f"FROM ./{gguf_name}"]
    note = None
    read = _role_pieces(tokenizer, stops) if getattr(tokenizer, "chat_template", None) else None
    if read is None:
        note = ("the chat template has per-turn logic a fixed TEMPLATE cannot express; Ollama uses the template "
                "stored in the GGUF" if getattr(tokenizer, "chat_template", None) else "the tokenizer has no chat template")
    else:
        pieces, default_system = read
        check = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                 {"role": "user", "content": "2+2?"}]
        expected = _render(tokenizer, check)
        with_system = ([{"role": "system", "content": default_system}] if default_system is not None else []) + check
        template = go_template(pieces)
        if _simulate(pieces, with_system) != expected or '"""' in template:
            note = "the chat template renders turns differently from a fixed prefix/suffix; Ollama uses the GGUF's"
        else:
            lines.append(f'TEMPLATE """{template}"""')
            if default_system:
                lines.append(f'SYSTEM """{default_system}"""')
    if note:
        lines.insert(1, f"# No TEMPLATE: {note}.")
    for stop in dict.fromkeys(s for s in stops if s.strip()):
        lines.append(f"PARAMETER stop {_quote(stop)}")
    for ollama_name, value in sampling.items():
        lines.append(f"PARAMETER {ollama_name} {value}")
    return "\n".join(lines) + "\n", note


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_modelfile(gguf_path: str | Path, tokenizer: Any, stops: list[str], sampling: dict) -> tuple[Path, str | None]:
    """Write ``NAME.Modelfile`` beside ``gguf_path`` (atomically); returns its path and why TEMPLATE is missing, if it is."""
    gguf_path = Path(gguf_path)
    text, note = modelfile_text(gguf_path.name, tokenizer, stops, sampling)
    out = gguf_path.with_suffix(".Modelfile")
    with atomic_file(out) as fh:
        fh.write(text)
    return out, note
