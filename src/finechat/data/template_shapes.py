"""Render a chat template once per conversation *shape*, then paste each record's texts in.

Why our own: a Jinja chat template is a small program, and rendering it (in transformers' sandboxed
environment, which checks every attribute access) was about a third of the CPU time of tokenizing an
instruction data set. Neither transformers nor ``datasets`` caches renders. But most chat templates only
*paste* each message's text between fixed pieces that depend on the roles, the position in the
conversation and the special tokens. For such a template the text of a conversation is fixed by its roles
except for the pasted texts: render once per sequence of roles with placeholder texts, cut the result at the
placeholders, and build every later conversation of that shape by joining the cut pieces with its texts.

Which templates qualify is read from the template's syntax tree (jinja2's own parser), never guessed from
outputs alone: every read of a message's ``content`` must flow straight into the output (through string
concatenation only) or into a type test whose answer is the same for every text (``is string``,
``is defined``); messages may otherwise be read only by their role or another key (absent here: the
messages given have exactly a role and a content), iterated, counted or indexed by a constant. A template
that filters, compares, searches, splits, trims or stores a text (``| trim``, ``'<think>' in content``,
``{% set %}``, macros, ``loop.previtem``) does not qualify and is rendered as before. As a second guard, the
first conversation of every shape is also rendered in full and compared; a shape whose pasted render
differs is rendered in full from then on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_PLACEHOLDER_BASE = 0xF0000  # Supplementary Private Use Area-A: one placeholder character per message
_MAX_MESSAGES = 4096  # placeholders available; longer conversations render in full
_MAX_SHAPES = 4096  # distinct role sequences kept; later new shapes render in full
_PLACEHOLDERS = re.compile(f"([{chr(_PLACEHOLDER_BASE)}-{chr(_PLACEHOLDER_BASE + _MAX_MESSAGES - 1)}])")
_FIXED_TESTS = {"string", "defined", "undefined", "none"}  # same answer for every text


def shape_renderer(environment: Any, source: str, render: Callable[[list[dict]], str]
                   ) -> Callable[[list[dict]], str] | None:
    """A renderer equal to ``render`` (messages -> text) that renders once per shape, or None when the
    template ``source`` does not only paste message texts (see the module docstring)."""
    if getattr(environment, "autoescape", False):
        return None  # escaping would change pasted texts
    try:
        tree = environment.parse(source)
    except Exception:  # noqa: BLE001 - a template jinja2 cannot parse here is rendered as before
        return None
    if _has_placeholder(source) or not _pastes_texts_only(tree):
        return None
    shapes: dict[tuple, tuple[list[str], list[int]] | None] = {}

    def fast(messages: list[dict]) -> str:
        key = tuple(m["role"] for m in messages)
        if key not in shapes:
            if len(shapes) >= _MAX_SHAPES or len(messages) > _MAX_MESSAGES:
                return render(messages)
            shapes[key] = _cut(render, messages)
        cut = shapes[key]
        if cut is None:
            return render(messages)
        pieces, order = cut
        out = [pieces[0]]
        for i, index in enumerate(order):
            out.append(messages[index]["content"])
            out.append(pieces[i + 1])
        return "".join(out)

    return fast


def _has_placeholder(text: str) -> bool:
    return _PLACEHOLDERS.search(text) is not None


def _cut(render: Callable[[list[dict]], str], messages: list[dict]) -> tuple[list[str], list[int]] | None:
    """The fixed pieces of this shape's render and which message's text goes between them; None where the
    pasted render of ``messages`` is not its full render."""
    try:
        text = render([{"role": m["role"], "content": chr(_PLACEHOLDER_BASE + i)} for i, m in enumerate(messages)])
    except Exception:  # noqa: BLE001 - the full render raises (or not) exactly as before
        return None
    parts = _PLACEHOLDERS.split(text)
    pieces, order = parts[0::2], [ord(p) - _PLACEHOLDER_BASE for p in parts[1::2]]
    pasted = pieces[0] + "".join(messages[index]["content"] + pieces[i + 1] for i, index in enumerate(order))
    try:
        return (pieces, order) if pasted == render(messages) else None
    except Exception:  # noqa: BLE001
        return None


def _pastes_texts_only(tree: Any) -> bool:
    from jinja2 import nodes

    message_names = {"messages"}
    for loop in tree.find_all(nodes.For):
        names = [loop.iter, *loop.iter.find_all(nodes.Name)]
        if isinstance(loop.target, nodes.Name) and any(isinstance(n, nodes.Name) and n.name == "messages"
                                                       for n in names):
            message_names.add(loop.target.name)
    for node, parents in _walk(tree, []):
        if isinstance(node, (nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.AssignBlock)):
            if any(isinstance(n, nodes.Name) and n.name in message_names for n in node.find_all(nodes.Name)):
                return False  # a text captured in a macro or block could be changed there
        if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name) and node.node.name == "loop" \
                and node.attr in ("previtem", "nextitem", "cycle"):
            return False
        if isinstance(node, nodes.Name) and node.name in message_names and not _allowed(node, parents, nodes):
            return False
    return True


def _walk(node: Any, parents: list) -> Any:
    yield node, parents
    for child in node.iter_child_nodes():
        yield from _walk(child, [*parents, node])


def _key(node: Any, nodes: Any) -> Any:
    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        return node.arg.value
    return None


def _allowed(name: Any, parents: list, nodes: Any) -> bool:
    """Whether this use of ``messages`` or a message is one that cannot depend on the texts."""
    parent = parents[-1] if parents else None
    if name.ctx == "store":
        return isinstance(parent, nodes.For) and parent.target is name
    if isinstance(parent, nodes.For) and parent.iter is name:
        return True
    if isinstance(parent, nodes.Filter) and parent.name == "length" and parent.node is name:
        return True
    # messages[0]['role'], message['content'], message.role: follow constant keys down to the value read
    node, depth = name, len(parents)
    while depth > 0 and isinstance(parents[depth - 1], (nodes.Getitem, nodes.Getattr)) \
            and parents[depth - 1].node is node:
        depth -= 1
        node = parents[depth]
        key = _key(node, nodes)
        if isinstance(key, int) and not isinstance(key, bool):
            continue  # one message of the list: its key follows
        if key == "content":
            return _pasted(node, parents[:depth], nodes)
        called = depth > 0 and isinstance(parents[depth - 1], nodes.Call) and parents[depth - 1].node is node
        return isinstance(key, str) and not called  # the role, or a key these messages do not have
    return False


def _pasted(value: Any, parents: list, nodes: Any) -> bool:
    """Whether a message's text goes straight into the output (concatenated) or into a fixed type test."""
    if parents and isinstance(parents[-1], nodes.Test) and parents[-1].node is value:
        return parents[-1].name in _FIXED_TESTS
    node, depth = value, len(parents)
    while depth > 0 and isinstance(parents[depth - 1], (nodes.Add, nodes.Concat)):
        depth -= 1
        node = parents[depth]
    # (an Output inside a macro or block is already refused in _pastes_texts_only)
    return depth > 0 and isinstance(parents[depth - 1], nodes.Output) \
        and any(n is node for n in parents[depth - 1].nodes)
