"""The engine contract: what every front end, the server, the tools and the evaluation need from an engine.

:class:`ChatEngine` is the one type the rest of finechat holds an engine by. Two engines implement it:
the PyTorch one (:class:`finechat.generate.engine.ChatModel`) and llama.cpp
(:class:`finechat.generate.llamacpp.LlamaCppChatModel`); ``tests/test_generate_engine.py`` checks both.

Adding an engine (vLLM, say): the short way is a subclass of ``ChatModel`` that overrides
:meth:`ChatEngine.generate_ids` (and ``scorer`` / ``score_batch`` when it can score), as llama.cpp does; the
prompts, templates, stops, hooks and the ``chat`` family then come with it. An engine written from scratch
implements every member below with the same meaning.

A :class:`TurnHook` changes answers without wrapping the engine: the engine calls each hook in
``engine.hooks`` once per answer with the messages the prompt is built from; the hook hands back the
messages to use and, optionally, a function that finishes the shown answer (the medical demo puts
retrieved records into the prompt and appends their sources and a notice). ``stream_chat`` keeps the plain
answer in the history, so what a hook adds is never fed back to the model.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from finechat.data.templates import Message
from finechat.generate.settings import GenerationSettings

Finish = Callable[[str], str]


@runtime_checkable
class TurnHook(Protocol):
    """Changes one answer: the messages its prompt is built from, and the text shown at its end."""

    def begin(self, messages: list[Message]) -> tuple[list[Message], Finish | None]:
        """The messages to build this answer's prompt from, and a function of the whole answer (or None)."""


@runtime_checkable
class ChatEngine(Protocol):
    """A model that answers conversations (ChatGLM-6B's ``chat`` / ``stream_chat`` API and OpenAI's messages).

    Data members: ``model`` (the engine's model object; its ``config`` gives ``model_type`` and the context
    length), ``tokenizer`` (a transformers tokenizer: the server decodes and counts with it), ``template``
    (the chat template, ``finechat.data.templates``), ``generation`` (the default ``GenerationSettings``),
    ``source`` (where the model came from: the server's default model name), ``hooks`` (the
    :class:`TurnHook` s called on every answer) and ``lock`` (held while a generation runs on the shared
    model; a caller that drives the model itself, as the batch scheduler's batch-1 path does, holds it too).
    """

    model: Any
    tokenizer: Any
    template: Any
    generation: GenerationSettings
    source: str | None
    hooks: list[TurnHook]
    lock: threading.Lock

    @property
    def eos_token(self) -> str:
        """The tokenizer's end-of-sequence text ("" when it has none)."""

    # -- prompts -----------------------------------------------------------------------------------------
    def build_prompt(self, messages: list[Message], tools: list | None = None, hooks: bool = True) -> str:
        """The prompt text for ``messages`` (the hooks applied unless ``hooks=False``), ending where the model
        starts its answer."""

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt text, special tokens as the template wants them."""

    def stop_token_ids(self) -> list[int]:
        """Token ids that end an answer (end of sequence, end of turn)."""

    def stop_strings(self, settings: GenerationSettings) -> list[str]:
        """Texts that end an answer: the template's and ``settings.stop``."""

    def postprocess(self, text: str) -> str:
        """The template's clean-up of an answer's text."""

    # -- generation ------------------------------------------------------------------------------------
    def generate_ids(self, input_ids: list[int], settings: GenerationSettings,
                     cancelled: Callable[[], bool] | None = None) -> Iterator[list[int]]:
        """Yield new token ids as they come; closing the iterator cancels the generation. ``cancelled()``, when
        given, is asked during the work (the prompt's prefill included, where the engine can stop inside it): once
        it says True the generation ends without more tokens (a server's client left)."""

    def stream_text(self, messages: list[Message], tools: list | None = None, generate: Any = None,
                    stats: dict | None = None, prompt_ids: list[int] | None = None,
                    skip_special_tokens: bool = True, hooks: bool = True, **gen: Any) -> Iterator[str]:
        """Yield the growing answer text for ``messages`` (``generate`` replaces ``generate_ids``; with
        ``hooks``, the hooks' finish of the whole answer comes last)."""

    def stream_chat(self, query: str, history: list | None = None, system: str | None = None,
                    **gen: Any) -> Iterator[tuple[str, list]]:
        """Yield ``(partial_response, history + [(query, partial_response)])`` as the answer grows."""

    def chat(self, query: str, history: list | None = None, system: str | None = None,
             **gen: Any) -> tuple[str, list]:
        """``(response, history + [(query, response)])``: the last item of ``stream_chat``."""

    def chat_messages(self, messages: list[Message], **gen: Any) -> str:
        """One whole answer for OpenAI-style ``messages``."""

    # -- scores ----------------------------------------------------------------------------------------
    def scorer(self, top_n: int = 0) -> Any:
        """A scorer of one growing sequence (``extend(ids)`` -> a ``TokenScore`` per id), or None."""

    def score_batch(self, sequences: list[list[int]], starts: list[int], pad_id: int = 0) -> list[list[Any]]:
        """Scores of ``sequences[i][starts[i]:]``, each token given the tokens before it."""


def last(items: Iterable[Any], default: Any = None) -> Any:
    """The last item of a stream (``default`` when it yields nothing): a whole answer from a streamed one."""
    tail = collections.deque(items, maxlen=1)
    return tail[0] if tail else default


def chat_answer(stream: Iterable[tuple[str, list]], query: str, history: list | None) -> tuple[str, list]:
    """Drain a ``stream_chat`` stream into ``chat``'s ``(response, history + [(query, response)])``.

    The one ``chat`` of finechat: the engines' and the tool agent's both end here.
    """
    return last(stream, ("", list(history or []) + [(query, "")]))


def begin_turn(hooks: Iterable[TurnHook], messages: list[Message]) -> tuple[list[Message], Finish | None]:
    """Apply ``hooks`` in order: the messages to build the prompt from and the finish of all of them (or None)."""
    finishers: list[Finish] = []
    for hook in hooks:
        messages, finish = hook.begin(messages)
        if finish is not None:
            finishers.append(finish)
    if not finishers:
        return messages, None

    def finish_all(text: str) -> str:
        for finish in finishers:
            text = finish(text)
        return text

    return messages, finish_all
