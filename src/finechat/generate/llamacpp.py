"""llama.cpp as an engine: a GGUF file run by ``llama-cpp-python`` behind the same :class:`ChatModel` API.

``finechat.load(model, engine="llama.cpp")`` (``--engine llama.cpp`` on chat / serve / web / eval) returns a
:class:`LlamaCppChatModel`: prompts are built and tokenized exactly as on the PyTorch engine (the GGUF's own
tokenizer and chat template, read by transformers), and only :meth:`generate_ids` changes: the prompt ids
go to ``Llama.generate``, which keeps the KV cache of the longest common prefix between calls (the history
of a conversation is not computed again) and samples in C. ``stream_text`` / ``stream_chat`` / ``chat``
stop at the template's end-of-turn token, the server's queue and tools and the evaluation work unchanged,
and closing the token iterator stops llama.cpp at the next token (cancellation).

Sampling maps one to one (temperature 0 / greedy is llama.cpp's greedy sampler, ``seed`` its ``dist``
seed); where llama.cpp differs, it is said once per model (see ``_differences``): it applies top_p before
the temperature, and its repetition penalty counts the answer's tokens only, not the prompt's.
Log-probabilities (the server's ``logprobs`` / ``echo``, lm-eval's log-likelihoods through ``finechat eval
--tasks``) come from a second, lazily opened llama.cpp context: :mod:`finechat.generate.llamacpp_logprobs`.
llama-cpp-python is an optional extra (``pip install 'finechat[llamacpp]'``; it compiles llama.cpp).
"""

from __future__ import annotations

import functools
import os
import random
import types
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from finechat.console import log
from finechat.errors import FinechatError, ModelLoadError
from finechat.generate.engine import ChatModel
from finechat.generate.llamacpp_logprobs import LlamaCppScorer, ScoringContext, score_batch
from finechat.generate.scoring import TokenScore
from finechat.generate.settings import GenerationSettings
from finechat.models.device import busy_cpu_threads
from finechat.models.gguf_writer import check_gguf_file
from finechat.models.resolve import default_gguf_path, resolve_model_path

ENGINES = ("torch", "llama.cpp", "vllm")
MISSING = ("the llama.cpp engine needs llama-cpp-python: pip install 'finechat[llamacpp]' (or make llamacpp; "
           "it compiles llama.cpp, about a quarter of an hour on 2 cores)")
DEFAULT_MAX_CONTEXT = 4096  # the KV cache is allocated up front: cap the context unless asked for more


def llama_threads() -> int:
    """llama.cpp's threads, by the rule of finechat's PyTorch engine: ``OMP_NUM_THREADS`` when set (the user's
    choice), one on a busy CPU (load average at or above the cores), else every core.

    Why: llama.cpp's threads meet at a barrier after each operation, as OpenMP's do, and wait there for a thread
    the OS has descheduled; with the load average at 11-16 on 2 cores, ``finechat serve --engine llama.cpp`` with
    two threads had not finished 20 answers of 32 tokens (the default model's Q4_1 GGUF) after 10 minutes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    named = os.environ.get("OMP_NUM_THREADS", "")
    if named.isdigit() and int(named) > 0:
        return min(int(named), cores)
    return busy_cpu_threads()[0] or cores


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module, or a clear error naming the extra to install."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ModelLoadError(MISSING) from e
    return llama_cpp


def resolve_gguf(model: str) -> Path:
    """The GGUF file for ``default``, a .gguf path or a folder holding one GGUF; a Hugging Face folder is an error."""
    if model in ("default", "", None):
        return default_gguf_path()
    folder, gguf_file = resolve_model_path(model)
    if gguf_file is None:
        raise ModelLoadError(f"{model} is a Hugging Face folder; the llama.cpp engine runs GGUF files. Convert it "
                             f"first: finechat export --to gguf --model {model} --out {Path(model).name}.gguf")
    return folder / gguf_file


class LlamaCppModel:
    """What the rest of finechat asks of ``ChatModel.model``: ``config`` (model type, context) and the runner."""

    def __init__(self, llm: Any, info: dict):
        self.llm = llm
        self.config = types.SimpleNamespace(model_type=info.get("architecture"),
                                            max_position_embeddings=llm.n_ctx(), engine="llama.cpp")
        self.generation_config = None
        self.eot_token_id = info.get("eot_token_id")


class LlamaCppChatModel(ChatModel):
    """A :class:`ChatModel` whose tokens come from llama.cpp (``.model.llm`` is the ``llama_cpp.Llama``)."""

    engine = "llama.cpp"

    def __init__(self, model: LlamaCppModel, tokenizer: Any, template: Any = None, source: str | None = None,
                 scoring: ScoringContext | None = None):
        super().__init__(model, tokenizer, template, source=source)
        self._said: set[str] = set()
        self.scoring = scoring  # a second context with logits_all, opened on the first request for scores

    def scorer(self, top_n: int = 0) -> LlamaCppScorer | None:
        """A scorer of one growing sequence on llama.cpp's scoring context (see ``generate.llamacpp_logprobs``)."""
        return None if self.scoring is None else LlamaCppScorer(self.scoring, top_n)

    def score_batch(self, sequences: list[list[int]], starts: list[int], pad_id: int = 0) -> list[list[TokenScore]]:
        """Scores of ``sequences[i][starts[i]:]`` from llama.cpp (one sequence at a time; no padding needed)."""
        if self.scoring is None:
            raise FinechatError("this llama.cpp engine has no scoring context")
        return score_batch(self.scoring, sequences, starts)

    def stop_token_ids(self) -> list[int]:
        ids = super().stop_token_ids()
        eot = self.model.eot_token_id  # the end of turn the GGUF names (e.g. <|im_end|>)
        return ids + [eot] if isinstance(eot, int) and eot not in ids else ids

    def _differences(self, settings: GenerationSettings) -> None:
        """Say once per model where llama.cpp's sampling is not exactly finechat's own."""
        notes = []
        if settings.do_sample and settings.top_p < 1 and settings.temperature != 1:
            notes.append(("top_p", "llama.cpp applies top_p before the temperature (finechat's engine after it), "
                                   "so the kept set of tokens differs slightly"))
        if settings.repetition_penalty != 1:
            notes.append(("repetition_penalty", "llama.cpp's repetition penalty counts the answer's tokens only, "
                                                "finechat's engine also the prompt's"))
        for key, text in notes:
            if key not in self._said:
                self._said.add(key)
                log(f"llama.cpp engine: {text}.")

    def generate_ids(self, input_ids: list[int], settings: GenerationSettings,
                     cancelled: Callable[[], bool] | None = None) -> Iterator[list[int]]:
        """Yield new token ids from llama.cpp; closing the iterator, or ``cancelled()`` saying True, stops it at
        the next token (llama.cpp evaluates the prompt in one call of its own, which cannot be stopped)."""
        llm = self.model.llm
        max_new = settings.max_new_tokens
        if settings.max_length is not None:
            max_new = max(1, min(max_new, settings.max_length - len(input_ids)))
        room = llm.n_ctx() - len(input_ids)
        if room < 1:
            raise FinechatError(f"the prompt has {len(input_ids)} tokens; the llama.cpp context holds {llm.n_ctx()} "
                                "(load with a larger n_ctx)")
        max_new = min(max_new, room)
        self._differences(settings)
        greedy = not settings.do_sample or settings.temperature == 0
        stop_ids = set(self.stop_token_ids())  # as the PyTorch engine: the end-of-turn token is the last one
        with self.lock:  # one generation at a time on the shared context (and its KV cache)
            # llama.cpp draws from its own generator, seeded per answer: a seeded answer repeats
            llm.set_seed(settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**31))
            tokens = llm.generate(
                input_ids, temp=0.0 if greedy else settings.temperature, top_p=settings.top_p,
                top_k=settings.top_k, min_p=0.0, typical_p=1.0, repeat_penalty=settings.repetition_penalty,
                presence_penalty=settings.presence_penalty, frequency_penalty=settings.frequency_penalty, reset=True)
            try:
                for count, token in enumerate(tokens, 1):
                    yield [int(token)]
                    if count >= max_new or token in stop_ids or (cancelled is not None and cancelled()):
                        break
            finally:
                tokens.close()


def load_llamacpp(model: str = "default", adapter: str | None = None, template: str | None = None,
                  n_ctx: int | None = None, n_threads: int | None = None, **generation: Any) -> LlamaCppChatModel:
    """Load a GGUF into llama.cpp with its tokenizer and chat template (``finechat.load(..., engine="llama.cpp")``)."""
    if adapter:
        raise ModelLoadError("the llama.cpp engine runs one GGUF file; merge the adapter into it first: "
                             f"finechat export --to gguf --model {model} --adapter {adapter} --out merged.gguf")
    path = resolve_gguf(model)
    info = check_gguf_file(path)  # a truncated or foreign file is one clear line, before llama.cpp sees it
    llama_cpp = import_llama_cpp()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot read the tokenizer from the GGUF: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    context = n_ctx or min(info.get("context_length") or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)
    threads = n_threads or llama_threads()
    log(f"Loading {path.name} into llama.cpp (context {context}, {threads} threads) ...")
    try:
        open_context = functools.partial(llama_cpp.Llama, model_path=str(path), n_ctx=context, n_threads=threads,
                                         n_threads_batch=threads, last_n_tokens_size=context, verbose=False)
        llm = open_context()
    except ValueError as e:
        raise ModelLoadError(f"{path}: llama.cpp cannot load it: {e}") from e
    # the scoring context keeps its KV cache in f32 (llama.cpp's default f16 moves log-probs by ~1e-2): an f32
    # GGUF then scores as the PyTorch engine does, to ~1e-5
    f32 = llama_cpp.GGML_TYPE_F32
    scoring = ScoringContext(functools.partial(open_context, logits_all=True, type_k=f32, type_v=f32))
    bot = LlamaCppChatModel(LlamaCppModel(llm, info), tokenizer, template, source=str(path), scoring=scoring)
    # Free llama.cpp's model when the bot goes, and at the latest at exit while Python can still run the
    # library's close (its own __del__ at interpreter shutdown fails with a traceback on stderr).
    weakref.finalize(bot, scoring.close)
    weakref.finalize(bot, llm.close)
    if generation:
        bot.generation = GenerationSettings.from_kwargs(bot.generation, **generation)
    return bot
