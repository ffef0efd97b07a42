"""The chat engine behind every front end: ``chat`` / ``stream_chat`` with ChatGLM-6B's history semantics.

``ChatModel.chat(query, history)`` returns ``(response, history + [(query, response)])`` and
``stream_chat`` yields ``(partial_response, history + [(query, partial_response)])`` as tokens arrive, the
way ChatGLM-6B's ``model.chat`` / ``model.stream_chat`` do, for any causal LM and template. Generation
always stops at the template's end-of-turn tokens and strings, and a consumer that stops iterating (a
Ctrl-C in the terminal, a client that disconnects) cancels the generation at the next token.

Token generation goes through :meth:`ChatModel.generate_ids`, which uses transformers' ``generate`` in a
worker thread with a streamer, or the model's fast decoder when it has one (``finechat.generate.fast``).
``ChatModel`` implements :class:`finechat.generate.contract.ChatEngine`, the contract the front ends hold an
engine by; the hooks in ``ChatModel.hooks`` (:class:`~finechat.generate.contract.TurnHook`) change its
answers (the medical demo's retrieval) without a wrapper.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from finechat.data.templates import Message, get_template, history_to_messages
from finechat.generate.contract import TurnHook, begin_turn, chat_answer, last
from finechat.generate.fast import fast_decoder_for, generate_tokens
from finechat.generate.sampling import generate_kwargs, seeded_global_rng
from finechat.generate.scoring import Scorer, TokenScore, score_batch
from finechat.generate.settings import GenerationSettings

__all__ = ["ChatModel", "GenerationSettings", "last"]


class _IdStreamer:
    """Receives token ids from ``generate`` (a transformers streamer) and hands them over through a queue."""

    def __init__(self, cancel: threading.Event):
        self.queue: queue.Queue = queue.Queue()
        self.cancel = cancel
        self._skipped_prompt = False

    def put(self, value: Any) -> None:
        if not self._skipped_prompt:  # generate() first sends the prompt ids
            self._skipped_prompt = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


def _stop_on_cancel(cancel: threading.Event, cancelled: Callable[[], bool] | None = None):
    from transformers import StoppingCriteria

    class StopOnCancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # noqa: ANN001
            import torch

            stop = cancel.is_set() or (cancelled is not None and cancelled())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return StopOnCancel()


class _Cancelled(Exception):
    """Raised inside ``generate``'s forward pass when its request was cancelled (caught in the worker)."""


@contextlib.contextmanager
def _stop_between_layers(model: Any, cancelled: Callable[[], bool] | None) -> Iterator[None]:
    """Within the block, a forward pass of ``model`` stops before its next decoder layer once ``cancelled()``.

    ``generate`` prefills a prompt in one forward pass, with no place to stop between tokens; a hook before each
    decoder layer (transformers' ``GradientCheckpointingLayer``, as native ChatGLM-6B's blocks are too) gives a
    long prompt as many chances to stop as the model has layers, whatever the architecture or adapter.
    """
    if cancelled is None:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    me = threading.get_ident()

    def check(module: Any, args: Any) -> None:
        if threading.get_ident() == me and cancelled():  # this request's forward passes only (scoring may run beside)
            raise _Cancelled

    handles = [m.register_forward_pre_hook(check) for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ChatModel:
    """A model, its tokenizer and its template, with ChatGLM-6B's ``chat`` / ``stream_chat`` API.

    ``.model`` and ``.tokenizer`` are the underlying transformers objects; ``.lock`` is held while a
    generation runs on the model; ``.hooks`` change every answer (see ``finechat.generate.contract``).
    """

    def __init__(self, model: Any, tokenizer: Any, template: Any = None, generation: GenerationSettings | None = None,
                 source: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.template = template if template is not None and not isinstance(template, str) else get_template(
            template, tokenizer, model_type
        )
        defaults = dict(getattr(self.template, "generation_defaults", ()) or ())
        self.generation = generation or GenerationSettings.from_kwargs(None, **defaults)
        self.source = source
        self.lock = threading.Lock()  # one generation at a time on the shared model (and its caches)
        self.hooks: list[TurnHook] = []
        self.use_fast_decoder = True  # False: always transformers' generate
        self.compile_decoder = False  # True: torch.compile the fast decoder's one-token step
        self.fast_decoder_cache: tuple[Any, Any] | None = None  # (model, its fast decoder or None)

    # -- prompts ---------------------------------------------------------------------------------------
    @property
    def eos_token(self) -> str:
        return self.tokenizer.eos_token or ""

    def build_prompt(self, messages: list[Message], tools: list | None = None, hooks: bool = True) -> str:
        """The prompt for ``messages`` with the hooks applied (the text ``stream_text`` generates from)."""
        return self._render(begin_turn(self.hooks, messages)[0] if hooks else messages, tools)

    def _render(self, messages: list[Message], tools: list | None = None) -> str:
        if tools and hasattr(self.template, "tokenizer"):
            return self.template.render(messages, self.eos_token, add_generation_prompt=True, tools=tools)
        return self.template.render(messages, self.eos_token, add_generation_prompt=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        # A built-in template is plain text: let the tokenizer add its own BOS (or ChatGLM's [gMASK]<sop>).
        # A Jinja chat template already wrote every special token it wants.
        add_special = not hasattr(self.template, "tokenizer")
        return self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"]

    def stop_strings(self, settings: GenerationSettings) -> list[str]:
        return list(dict.fromkeys(self.template.stops(self.eos_token) + list(settings.stop)))

    def stop_token_ids(self) -> list[int]:
        """Token ids that end a turn: EOS plus any stop string that is a single special token."""
        ids = []
        eos = self.tokenizer.eos_token_id
        if isinstance(eos, int):
            ids.append(eos)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.append(gen_eos)
        elif isinstance(gen_eos, list):
            ids.extend(gen_eos)
        vocab = self.tokenizer.get_vocab()
        for s in self.template.stops(self.eos_token):
            if s in vocab:
                ids.append(vocab[s])
        return list(dict.fromkeys(ids))

    # -- scores (log-probabilities) --------------------------------------------------------------------
    # Every engine has these two (the server and the lm-eval glue ask for them by name, not by class).
    def scorer(self, top_n: int = 0) -> Scorer | None:
        """A scorer of one growing sequence (``extend(ids)``: a ``TokenScore`` per id), or None without a PyTorch model."""
        return Scorer(self.model, top_n) if hasattr(self.model, "parameters") else None

    def score_batch(self, sequences: list[list[int]], starts: list[int], pad_id: int = 0) -> list[list[TokenScore]]:
        """Scores of ``sequences[i][starts[i]:]``, each token given the tokens before it (lm-eval's log-likelihoods)."""
        return score_batch(self.model, sequences, starts, pad_id=pad_id)

    # -- token generation ----------------------------------------------------------------------------
    def generate_ids(self, input_ids: list[int], settings: GenerationSettings,
                     cancelled: Callable[[], bool] | None = None) -> Iterator[list[int]]:
        """Yield new token ids as they are generated; closing the iterator cancels generation.

        Models with a fast decoder (Llama/Qwen2, ChatGLM-6B) use it (``finechat.generate.fast``: same greedy
        tokens, less overhead per token); others, and models with a prefix adapter, use transformers'
        ``generate`` in a worker thread. ``cancelled()`` (the server's client left) is asked while the prompt is
        prefilled (between chunks of positions on the Llama fast decoder, between layers on ChatGLM-6B's and in
        ``generate``) and before each new token: once True, generation ends with no more tokens.
        """
        import torch

        fast = fast_decoder_for(self)
        if fast is not None:
            with self.lock:  # one generation at a time on a shared model (and its KV cache)
                tokens = generate_tokens(fast, input_ids, settings, self.stop_token_ids(), cancelled=cancelled)
                try:
                    for token in tokens:
                        yield [token]
                finally:
                    tokens.close()
            return
        cancel = threading.Event()
        streamer = _IdStreamer(cancel)
        device = next(self.model.parameters()).device
        ids = torch.tensor([input_ids], device=device)
        kwargs = generate_kwargs(settings, len(input_ids), self.stop_token_ids(), self.tokenizer.pad_token_id)
        kwargs.update(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                      stopping_criteria=[_stop_on_cancel(cancel, cancelled)])
        error: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode(), seeded_global_rng(settings.seed, device), \
                        _stop_between_layers(self.model, cancelled):
                    self.model.generate(**kwargs)
            except _Cancelled:
                streamer.end()  # stopped inside a forward pass: no more tokens, no error
            except BaseException as e:  # noqa: BLE001  handed to the consumer
                error.append(e)
                streamer.end()

        with self.lock:  # one generate() at a time on a shared model
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            try:
                while True:
                    item = streamer.queue.get()
                    if item is None:
                        break
                    yield item
            finally:
                cancel.set()
                thread.join()
        if error:
            raise error[0]

    def stream_text(self, messages: list[Message], tools: list | None = None, generate: Any = None,
                    stats: dict | None = None, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True,
                    hooks: bool = True, verbatim: bool = False, **gen: Any) -> Iterator[str]:
        """Yield the growing answer text for ``messages``, cut at the first stop string.

        ``generate`` replaces :meth:`generate_ids` (the server passes its batching scheduler's); ``stats``, when
        given, receives ``prompt_tokens``, ``completion_tokens`` (stop token included) and ``finish_reason``
        ("stop" or "length"). ``prompt_ids`` skips building the prompt from ``messages`` (already encoded).
        ``skip_special_tokens=False`` keeps markers such as MOSS's ``<eoc>`` in the text (the tool runtime).
        With hooks, the prompt is built from the messages they hand back and one last text, the whole answer
        finished by them, follows the stream; ``hooks=False`` leaves them out (a caller that applied them once
        for an answer of several rounds, as the tool agent does).
        ``verbatim=True`` (a text completion) yields the model's text exactly: no chat clean-up (stripping, the
        template's ``postprocess``), and decoded after the prompt's last tokens, so a leading space stays.
        """
        messages, finish = begin_turn(self.hooks, messages) if hooks else (messages, None)
        stream = self._answer_text(messages, tools, generate, stats, prompt_ids, skip_special_tokens, verbatim, **gen)
        if finish is None:
            yield from stream
            return
        text = ""
        try:
            for text in stream:
                yield text
        finally:
            stream.close()
        yield finish(text)

    def _answer_text(self, messages: list[Message], tools: list | None = None, generate: Any = None,
                     stats: dict | None = None, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True,
                     verbatim: bool = False, **gen: Any) -> Iterator[str]:
        """``stream_text`` without the hooks: ``messages`` as they are."""
        settings = GenerationSettings.from_kwargs(self.generation, **gen)
        if prompt_ids is None:
            prompt_ids = self.encode_prompt(self._render(messages, tools))
        finish = (lambda text: text) if verbatim else self.postprocess
        decode = _decoder_after(self.tokenizer, prompt_ids if verbatim else [], skip_special_tokens)
        stops = self.stop_strings(settings)
        stop_ids = set(self.stop_token_ids())
        new_ids: list[int] = []
        shown = ""
        stats = {} if stats is None else stats
        stats.update(prompt_tokens=len(prompt_ids), completion_tokens=0, finish_reason="length")
        gen_iter = (generate or self.generate_ids)(prompt_ids, settings)
        try:
            for step in gen_iter:
                ended = next((i for i, t in enumerate(step) if t in stop_ids), None)
                new_ids.extend(step if ended is None else step[:ended])
                stats["completion_tokens"] += len(step) if ended is None else ended + 1
                if ended is not None:
                    stats["finish_reason"] = "stop"
                    break
                text = decode(new_ids)
                cut = _first_stop(text, stops)
                if cut is not None:
                    stats["finish_reason"] = "stop"
                    text = text[:cut]
                    if text != shown:
                        yield finish(text)
                    return
                if text.endswith("\ufffd"):  # half of a multi-byte character
                    continue
                visible = text[: len(text) - held_back(text, stops)]
                if visible != shown:
                    shown = visible
                    yield finish(visible)
            final = decode(new_ids)
            cut = _first_stop(final, stops)
            final = final[:cut] if cut is not None else final
            if cut is None and stats["finish_reason"] == "length":
                final = final.rstrip("\ufffd")  # the token budget ended inside a multi-byte character
            if cut is not None or len(new_ids) < settings.max_new_tokens and stats["finish_reason"] == "length":
                stats["finish_reason"] = "stop"
            if final != shown:
                yield finish(final)
        finally:
            gen_iter.close()

    def postprocess(self, text: str) -> str:
        fn = getattr(self.template, "postprocess", None)
        return fn(text) if fn else text.strip()

    # -- ChatGLM-6B's API ----------------------------------------------------------------------------
    def stream_chat(self, query: str, history: list | None = None, system: str | None = None,
                    **gen: Any) -> Iterator[tuple[str, list]]:
        """Yield ``(partial_response, history + [(query, partial_response)])`` as the answer grows.

        With hooks, the last item shows the finished answer; its history keeps the plain one (what a hook
        adds, such as cited sources, is not fed back to the model).
        """
        history = list(history or [])
        messages, finish = begin_turn(self.hooks, history_to_messages(query, history, system))
        response = ""
        for response in self.stream_text(messages, hooks=False, **gen):
            yield response, history + [(query, response)]
        if response == "":
            yield "", history + [(query, "")]
        if finish is not None:
            yield finish(response), history + [(query, response)]

    def chat(self, query: str, history: list | None = None, system: str | None = None,
             **gen: Any) -> tuple[str, list]:
        """Answer ``query`` given ``history``; returns ``(response, history + [(query, response)])``."""
        return chat_answer(self.stream_chat(query, history, system, **gen), query, history)

    def chat_messages(self, messages: list[Message], **gen: Any) -> str:
        """One answer for OpenAI-style ``messages``."""
        return last(self.stream_text(messages, **gen), "")


def _first_stop(text: str, stops: list[str]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop string (not shown yet)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def _decoder_after(tokenizer: Any, context: list[int], skip_special_tokens: bool) -> Any:
    """``decode(ids)``: the text ``ids`` add after the last few ``context`` tokens (a leading space a tokenizer
    drops at the start of a text stays); plain ``decode`` without context."""
    context = list(context[-6:])
    head = tokenizer.decode(context, skip_special_tokens=skip_special_tokens) if context else ""

    def decode(ids: list[int]) -> str:
        if not context:
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        full = tokenizer.decode(context + list(ids), skip_special_tokens=skip_special_tokens)
        return full[len(head):] if full.startswith(head) else tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    return decode
