"""Tokenization cache: first run vs a second run of the same data and settings (served from the disk cache).

Generates an ADGEN-like file (``--rows``, default 3000), tokenizes it with the default model's tokenizer and
template, once on one process, once on all cores (each into a fresh cache), then again from the cache, and
prints the times side by side with the ratios.

    python benchmarks/data_cache.py [--rows 3000] [--model default]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000, help="ADGEN-like rows to generate")
    parser.add_argument("--model", default="default", help="model folder whose tokenizer is used")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from finechat.data.synthetic import write_adgen
    from finechat.data.templates import get_template
    from finechat.data.token_cache import build_dataset
    from finechat.data.tokenize import TokenizeSettings
    from finechat.models.resolve import default_model_dir

    folder = default_model_dir() if args.model == "default" else Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    template = get_template("auto", tokenizer)
    settings = TokenizeSettings(cutoff_len=512)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "adgen.jsonl"
        write_adgen(data, args.rows, args.seed)
        size_kb = data.stat().st_size / 1024

        def run(cache: str, num_proc: int) -> tuple[float, object, list]:
            t0 = time.perf_counter()
            examples, stats = build_dataset(str(data), tokenizer, template, settings, cache_dir=Path(tmp) / cache,
                                            num_proc=num_proc, progress=False)
            return time.perf_counter() - t0, stats, examples

        t_one, s_one, ex_one = run("c1", 1)
        t_all, s_all, ex_all = run("c2", cores)
        # The cached run is short, so noise on a shared machine dominates it: best of three.
        t_hit, s_hit, ex_hit = min((run("c2", cores) for _ in range(3)), key=lambda r: r[0])
    assert not s_one.from_cache and not s_all.from_cache and s_hit.from_cache
    assert ex_one == ex_all == ex_hit, "cached or parallel rows differ from the first run"
    print(f"data: {args.rows} ADGEN-like rows ({size_kb:.0f} KiB), tokenizer: {folder.name}, "
          f"template: {getattr(template, 'name', '?')}, {s_one.tokens} tokens, {cores} cores")
    print(f"{'run':<38}{'seconds':>10}{'rows/s':>12}{'vs first':>10}")
    for name, t in [("first, 1 process", t_one), (f"first, {cores} processes", t_all),
                    ("second (from the cache, best of 3)", t_hit)]:
        print(f"{name:<38}{t:>10.3f}{args.rows / t:>12.0f}{t_one / t:>9.1f}x")
    print(f"cache speed-up (first 1-process run / cached run): {t_one / t_hit:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
