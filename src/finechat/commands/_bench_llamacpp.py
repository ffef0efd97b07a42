"""``finechat bench --engine llama.cpp``: rows for the model exported to GGUF and run by llama.cpp.

For each GGUF type (f16, q8_0, q4_1, ...) the benched fp32 model is written with
:func:`finechat.models.gguf_writer.write_gguf` to a temporary folder and measured in the same process as the
PyTorch rows, on the same prompt and held-out text:

* file size and bytes per parameter; peak RSS while the row runs (llama.cpp's mmap'd weights included);
* prefill tokens/s (the prompt evaluated into an empty cache) and decode tokens/s through finechat's
  engine (:class:`~finechat.generate.llamacpp.LlamaCppChatModel`, every token through ``stream_text``,
  detokenizing and stop checks included) against bare ``llama-cpp-python`` (``Llama.generate``) on the same
  loaded model, in alternating rounds, each the median gap between consecutive tokens;
* perplexity on the bundled held-out text, in the same non-overlapping windows as the PyTorch rows
  (llama.cpp's logits for every position), and top-1 agreement with the fp32 model;
* whether llama.cpp's greedy tokens equal transformers' ``generate`` in fp32.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from finechat.commands._bench_report import BenchRow, _release_memory, peak_memory_mb, reset_peak_memory
from finechat.generate.engine import GenerationSettings
from finechat.generate.llamacpp import LlamaCppChatModel, LlamaCppModel, import_llama_cpp
from finechat.models.gguf_writer import OUTTYPES, check_gguf_file, write_gguf


def _bare_decode(llm: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens straight from ``Llama.generate``; returns (tokens, median seconds between tokens)."""
    tokens, stamps = [], []
    for token in llm.generate(prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, reset=True):
        stamps.append(time.perf_counter())
        tokens.append(int(token))
        if len(tokens) >= new_tokens:
            break
    return tokens, statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))


def _engine_decode(bot: LlamaCppChatModel, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens through finechat's engine and ``stream_text``; the clock ticks as each token is handed over."""
    tokens, stamps = [], []

    def clocked(ids: list[int], settings: GenerationSettings):
        for step in bot.generate_ids(ids, settings):
            stamps.append(time.perf_counter())
            tokens.extend(step)
            yield step

    bot.stop_token_ids = lambda: []  # as the other rows: no stop token, exactly new_tokens tokens
    for _ in bot.stream_text([], generate=clocked, prompt_ids=prompt, greedy=True, max_new_tokens=new_tokens):
        pass
    return tokens, statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))


def _prefill(llm: Any, prompt: list[int], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        times.append(time.perf_counter() - start)
    llm.reset()
    return len(prompt) / statistics.median(times)


def perplexity_and_top1_llamacpp(llama_cpp: Any, path: Path, ids: torch.Tensor, threads: int,
                                 window: int = 512) -> tuple[float, torch.Tensor]:
    """Perplexity and top-1 predictions from llama.cpp's logits, in the PyTorch rows' windows."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=window, n_batch=window, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    total_nll, count, top1 = 0.0, 0, []
    try:
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start:start + window + 1]
            if chunk.numel() < 2:
                break
            llm.reset()
            llm.eval(chunk[:-1].tolist())
            logits = torch.from_numpy(llm.scores[: chunk.numel() - 1].copy())  # [len, vocab]
            total_nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            count += chunk.numel() - 1
            top1.append(logits.argmax(-1))
    finally:
        llm.close()
    return float(torch.exp(torch.tensor(total_nll / count))), torch.cat(top1)


def bench_llamacpp(model: Any, tokenizer: Any, gguf_types: tuple[str, ...], text_ids: torch.Tensor,
                   prompt: list[int], reference_top1: torch.Tensor, reference_tokens: list[int], new_tokens: int = 48,
                   rounds: int = 5, threads: int | None = None, log: Any = print) -> list[BenchRow]:
    """One row per GGUF type for the fp32 ``model``; speeds alternate finechat's engine and bare llama-cpp-python."""
    llama_cpp = import_llama_cpp()
    threads = threads or torch.get_num_threads()
    unknown = [t for t in gguf_types if t not in OUTTYPES]
    if unknown:
        raise ValueError(f"unknown GGUF type(s) {', '.join(unknown)}; valid: {', '.join(OUTTYPES)}")
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory(prefix="finechat-bench-gguf-") as folder:
        for outtype in gguf_types:
            path = Path(folder) / f"model-{outtype}.gguf"
            log(f"[llama.cpp {outtype}] exporting ...")
            write_gguf(model, tokenizer, path, outtype, progress=False)
            _release_memory()
            reset_peak_memory(torch.device("cpu"))
            log(f"[llama.cpp {outtype}] perplexity on {text_ids.numel()} held-out tokens ...")
            ppl, top1 = perplexity_and_top1_llamacpp(llama_cpp, path, text_ids, threads)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                                  n_threads_batch=threads, verbose=False)
            bot = LlamaCppChatModel(LlamaCppModel(llm, check_gguf_file(path)), tokenizer, None)
            log(f"[llama.cpp {outtype}] prefill and decode ({new_tokens} tokens, {threads} threads) ...")
            prefill = _prefill(llm, prompt)
            _bare_decode(llm, prompt, 3)  # warm-up
            bare_gaps, engine_gaps, tokens = [], [], []
            for _ in range(rounds):
                tokens, gap = _bare_decode(llm, prompt, new_tokens)
                bare_gaps.append(gap)
                engine_tokens, gap = _engine_decode(bot, prompt, new_tokens)
                engine_gaps.append(gap)
                if engine_tokens != tokens[: len(engine_tokens)]:
                    raise RuntimeError("finechat's llama.cpp engine and bare llama-cpp-python disagree on greedy tokens")
            peak = peak_memory_mb(torch.device("cpu"))
            size = path.stat().st_size
            agreement = float((top1 == reference_top1[: top1.numel()]).float().mean())
            rows.append(BenchRow(f"llama.cpp {outtype}", size, size / n_params, peak, prefill,
                                 1 / statistics.median(engine_gaps), float("nan"), ppl, agreement,
                                 tokens == reference_tokens, False, engine="llama.cpp",
                                 bare_decode_tok_s=1 / statistics.median(bare_gaps)))
            llm.close()
            del bot, llm
    return rows
