"""Data at scale: wall time and peak RSS of finechat's data path against datasets.load_dataset + .map, by size.

For each size (default 10k, 100k, 1M records) an ADGEN-like data set is generated once as JSONL and as Parquet
under ``--cache-dir`` (reused by later runs). Each step runs in its own fresh process, so that its peak RSS
(``ru_maxrss``, including finished worker processes) is its own:

=======================  =========================================================================================
finechat read jsonl      ``iter_conversations`` over the JSONL: every record read and made a Conversation
finechat read parquet    the same over the Parquet file (pyarrow record batches)
finechat stats           ``finechat data stats FILE.jsonl --json --png none --num-proc 1`` (reads, tokenizes, counts)
finechat stats 2p        the same with ``--num-proc 2``
finechat tokenize 1p     ``build_dataset`` of the JSONL into a fresh memory-mapped cache, one process
finechat tokenize 2p     the same from the Parquet file, ``num_proc=2``
finechat tokenize 2p jsonl  the same from the JSONL, ``num_proc=2``, into the cache "train start" reads (so that
                         at 10M records the training start does not wait for a one-process pass)
finechat cache reuse     ``build_dataset`` of the JSONL again in a new process: the key (a hash of the file) and the
                         memory-mapped cache of "tokenize 1p", ready to train from
finechat train start     ``run_training`` (``max_steps=1``) on the JSONL with the cache of "tokenize 1p" warm:
                         reading the cache, model, Trainer and the first step
datasets map 1p / 2p     ``load_dataset("json")`` + ``.map(batched=True)`` rendering the tokenizer's chat
                         template and encoding, into a fresh ``datasets`` cache (``num_proc`` 1 / 2)
datasets map again       the same again, served from the ``datasets`` cache
... 1t                   a tokenizing step with the Rust tokenizer on one thread (``TOKENIZERS_PARALLELISM=false``):
                         "datasets map 1p" alone spreads its batch encoding over every core (~1.4 of 2 cores
                         here), so "datasets map 1p 1t" is the one-core baseline that two processes are measured
                         against (finechat's worker processes encode on one thread each)
=======================  =========================================================================================

Loading the tokenizer is timed apart (``tokenizer_seconds``), not in ``seconds``. Both sides use the same
tokenizer (the default model's, SmolLM2) and its chat template; finechat also computes
the labels (trained spans) and the baseline does not. Training uses a tiny Llama (2 layers, hidden 64, the
tokenizer's vocabulary) so that the numbers show the data path, not the model.

    python benchmarks/data_scale.py [--sizes 10000,100000,1000000] [--cache-dir DIR] [--steps stats,...] [--repeat 3]

On a shared machine, ``--repeat 3`` runs the steps three times interleaved and reports each step's median
(tokenizing steps start from an empty cache every time), so that the side-by-side ratios do not depend on
which step happened to run while the machine was busiest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = ["finechat read jsonl", "finechat read parquet", "finechat stats", "finechat stats 2p", "finechat tokenize 1p", "finechat tokenize 2p", "finechat tokenize 2p jsonl", "finechat cache reuse", "finechat train start",
         "datasets map 1p", "datasets map 2p", "datasets map again", "finechat tokenize 1p 1t", "datasets map 1p 1t"]
ONE_THREAD = " 1t"
CUTOFF = 1024


def _peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024  # Linux reports KiB


def generate(folder: Path, n: int) -> tuple[Path, Path]:
    """``adgen_N.jsonl`` and ``adgen_N.parquet`` (written once, streamed: memory flat in ``n``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from finechat.data.synthetic import adgen_record
    from finechat.files import atomic_file

    jsonl, parquet = folder / f"adgen_{n}.jsonl", folder / f"adgen_{n}.parquet"
    folder.mkdir(parents=True, exist_ok=True)
    if not jsonl.is_file():
        import random

        rng = random.Random(0)
        with atomic_file(jsonl) as fh:
            for _ in range(n):
                fh.write(json.dumps(adgen_record(rng), ensure_ascii=False) + "\n")
    if not parquet.is_file():
        tmp = parquet.with_suffix(".tmp")
        schema = pa.schema([("content", pa.string()), ("summary", pa.string())])
        with pq.ParquetWriter(tmp, schema) as writer, open(jsonl, encoding="utf-8") as fh:
            batch: list[dict] = []
            for line in fh:
                batch.append(json.loads(line))
                if len(batch) == 100_000:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        os.replace(tmp, parquet)
    return jsonl, parquet


def _tokenizer():
    from transformers import AutoTokenizer

    from finechat.models.resolve import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


def _tiny_model(folder: Path, tokenizer) -> Path:
    if not (folder / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                             tie_word_embeddings=True)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) and its finished worker processes."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child(step: str, jsonl: Path, parquet: Path, work: Path) -> dict:
    """Run one step in this (fresh) process; returns its wall time and what it produced."""
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    out: dict = {}
    one_thread = step.endswith(ONE_THREAD)
    step = step.removesuffix(ONE_THREAD)
    if one_thread:
        work = work / "one_thread"  # its own caches
    if step.startswith("finechat read"):
        from finechat.data.formats import ReadResult, iter_conversations

        result = ReadResult([])
        n = sum(1 for _ in iter_conversations(str(parquet if step.endswith("parquet") else jsonl), result))
        out = {"examples": n, "skipped": len(result.skipped)}
    elif step.startswith("finechat stats"):
        import contextlib
        import io

        from finechat.cli import main as cli

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = cli(["data", "stats", str(jsonl), "--json", "--png", "none", "--num-proc",
                        "2" if step.endswith("2p") else "1"])
        out = {"rc": code, "examples": json.loads(buf.getvalue())["examples"]}
    elif step.startswith("finechat tokenize") or step == "finechat cache reuse":
        from finechat.data.templates import get_template
        from finechat.data.token_cache import build_dataset
        from finechat.data.tokenize import TokenizeSettings

        tok = _tokenizer()
        out["tokenizer_seconds"] = round(time.perf_counter() - t0, 2)  # loading the tokenizer, not the data
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        two = step.endswith("2p")  # from the Parquet file
        procs = 2 if "2p" in step else 1
        rows, stats = build_dataset(str(parquet if two else jsonl), tok, get_template("tokenizer", tok),
                                    TokenizeSettings(cutoff_len=CUTOFF), cache_dir=work / ("cache2" if two else "cache"),
                                    num_proc=procs, progress=False)
        out.update(examples=len(rows), tokens=stats.tokens, from_cache=stats.from_cache)
    elif step == "finechat train start":
        from finechat.train.recipe import run_training
        from finechat.train.train_config import TrainConfig

        model = _tiny_model(work / "tiny", _tokenizer())
        t0, cpu0 = time.perf_counter(), _cpu_seconds()  # the tiny model is written once; not part of the step
        cfg = TrainConfig(model=str(model), data=[str(jsonl)], output_dir=str(work / "run"), max_steps=1,
                          save_steps=1, logging_steps=1, per_device_train_batch_size=4, report_to=["none"],
                          cutoff_len=CUTOFF, overwrite_output_dir=True, do_eval=False, lora_rank=4, template="tokenizer")
        result = run_training(cfg, cache_dir=str(work / "cache"))
        run = json.loads((Path(result.final_checkpoint) / "finechat_run.json").read_text(encoding="utf-8"))
        out = {"steps": result.global_step, "from_cache": "from cache" in run["data"].get("summary", "")}
    elif step.startswith("datasets map"):
        import datasets

        tok = _tokenizer()
        out["tokenizer_seconds"] = round(time.perf_counter() - t0, 2)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        datasets.disable_progress_bars()
        procs = 2 if step.endswith("2p") else 1
        cache = work / ("hf_cache2" if procs == 2 else "hf_cache")

        def encode(batch: dict) -> dict:
            texts = [tok.apply_chat_template([{"role": "user", "content": c}, {"role": "assistant", "content": s}],
                                             tokenize=False) for c, s in zip(batch["content"], batch["summary"])]
            return {"input_ids": tok(texts, add_special_tokens=False, truncation=True, max_length=CUTOFF)["input_ids"]}

        ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=str(cache))
        ds = ds.map(encode, batched=True, num_proc=procs if procs > 1 else None, remove_columns=ds.column_names)
        out["examples"] = len(ds)
    else:
        raise SystemExit(f"unknown step {step!r}")
    return {"seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(_cpu_seconds() - cpu0, 2),
            "peak_rss_mb": round(_peak_mb()), **out}


def run_step(step: str, jsonl: Path, parquet: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--jsonl", str(jsonl), "--parquet", str(parquet),
           "--work", str(work)]
    env = dict(os.environ, **({"TOKENIZERS_PARALLELISM": "false"} if step.endswith(ONE_THREAD) else {}))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "seconds": None, "peak_rss_mb": None}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - t0, 2)  # with Python start and imports
    return result


def _fresh_cache(work: Path, step: str) -> None:
    """Remove what an earlier repeat of this step cached, so that each repeat tokenizes again."""
    import shutil

    name = {"finechat tokenize 1p": "cache", "finechat tokenize 2p": "cache2", "finechat tokenize 2p jsonl": "cache",
            "datasets map 1p": "hf_cache",
            "datasets map 2p": "hf_cache2"}[step.removesuffix(ONE_THREAD)]
    shutil.rmtree((work / "one_thread" if step.endswith(ONE_THREAD) else work) / name, ignore_errors=True)


def _median_run(runs: list[dict]) -> dict:
    """The run with the median time (an error wins), with the highest peak RSS of all repeats."""
    bad = [r for r in runs if r.get("error")]
    if bad:
        return bad[0]
    ordered = sorted(runs, key=lambda r: r["seconds"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    if len(runs) > 1:
        out["all_seconds"] = [r["seconds"] for r in runs]
    return out


def table(results: dict[int, dict[str, dict]], sizes: list[int], steps: list[str]) -> str:
    def cell(r: dict | None) -> str:
        if not r:
            return "-"
        if r.get("error"):
            return "error"
        cpu = f" ({r['cpu_seconds']:.1f} CPU-s)" if r.get("cpu_seconds") is not None else ""
        return f"{r['seconds']:.1f} s{cpu} / {r['peak_rss_mb']} MB"

    head = "| step | " + " | ".join(f"{n:,} records" for n in sizes) + " |"
    lines = [head, "|---" * (len(sizes) + 1) + "|"]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(cell(results.get(n, {}).get(step)) for n in sizes) + " |")
    ratios = []
    for n in sizes:
        r = results.get(n, {})
        two, one_thread = r.get("finechat tokenize 2p"), r.get("datasets map 1p 1t")
        if two and one_thread and two.get("seconds") and one_thread.get("seconds"):
            ours_1t = r.get("finechat tokenize 1p 1t") or {}
            ratios.append(f"{n:,}: tokenize 2p speed vs datasets map 1p on one thread "
                          f"{one_thread['seconds'] / two['seconds']:.2f}x"
                          + (f", vs finechat 1p on one thread {ours_1t['seconds'] / two['seconds']:.2f}x"
                             if ours_1t.get("seconds") else ""))
        ours, theirs = r.get("finechat tokenize 1p"), r.get("datasets map 1p")
        if ours and theirs and ours.get("seconds") and theirs.get("seconds"):
            two = r.get("finechat tokenize 2p", {}).get("seconds")
            ratios.append(f"{n:,}: tokenize 1p speed vs datasets map 1p {theirs['seconds'] / ours['seconds']:.2f}x"
                          + (f", 2p vs datasets map 1p {theirs['seconds'] / two:.2f}x" if two else "")
                          + f", peak RSS {ours['peak_rss_mb']} vs {theirs['peak_rss_mb']} MB"
                          + (f"; CPU-seconds datasets map 1p / tokenize 1p {theirs['cpu_seconds'] / ours['cpu_seconds']:.2f}x"
                             if ours.get("cpu_seconds") and theirs.get("cpu_seconds") else ""))
    return "\n".join(lines + [""] + ratios)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="record counts, comma-separated")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "finechat_data_scale"),
                        help="where generated data sets are kept between runs")
    parser.add_argument("--steps", default=",".join(STEPS), help="which steps to run, comma-separated")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the steps this many times, interleaved; report each step's median time")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--jsonl", help=argparse.SUPPRESS)
    parser.add_argument("--parquet", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.jsonl), Path(args.parquet), Path(args.work))))
        return 0
    sizes = [int(x) for x in args.sizes.split(",")]
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    flags = " ".join(sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx512", "amx"))}))
    print(f"CPU: {os.cpu_count()} cores, flags: {flags or 'no AVX512'}; load average at start: {os.getloadavg()}",
          flush=True)
    results: dict[int, dict[str, dict]] = {}
    for n in sizes:
        t0 = time.perf_counter()
        jsonl, parquet = generate(Path(args.cache_dir), n)
        print(f"\n{n:,} records: {jsonl} ({jsonl.stat().st_size / 2**20:.0f} MiB), {parquet} "
              f"({parquet.stat().st_size / 2**20:.0f} MiB), ready in {time.perf_counter() - t0:.0f} s", flush=True)
        with tempfile.TemporaryDirectory(dir=args.cache_dir) as work:
            runs: dict[str, list[dict]] = {step: [] for step in steps}
            warm = False
            for rep in range(args.repeat):  # steps interleaved, so that a change of machine load hits every step
                for step in steps:
                    if step in ("finechat train start", "finechat cache reuse") and not warm:
                        run_step("finechat tokenize 1p", jsonl, parquet, Path(work))  # warm the cache first
                    if step.startswith(("finechat tokenize", "datasets map")) and step != "datasets map again":
                        _fresh_cache(Path(work), step)
                    runs[step].append(r := run_step(step, jsonl, parquet, Path(work)))
                    warm = warm or (step in ("finechat tokenize 1p", "finechat tokenize 2p jsonl") and not r.get("error"))
                    print(f"  {step:<22} {json.dumps(r)}" + (f" (run {rep + 1})" if args.repeat > 1 else ""),
                          flush=True)
            results[n] = {step: _median_run(r) for step, r in runs.items()}
        if args.json:
            Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    print("\n" + table(results, sizes, steps))
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
