"""What the record pass before the model loads costs (``finechat.train.preflight.check_records``).

``finechat train`` parses every record of its local data files before it loads the model, so that a bad record
far down fails in one line at once. This measures that pass on generated JSONL files (alpaca-style SFT records and
preference pairs), beside the bare minimum of reading them (``json.loads`` of each line), with the peak memory the
pass allocates (tracemalloc: flat in the record count, as it keeps nothing).

    python benchmarks/preflight_records.py                  # 100,000 records; writes docs/results/preflight.md
    python benchmarks/preflight_records.py --records 20000 --write ''
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from finechat.train.preflight import check_records  # noqa: E402
from finechat.train.train_config import TrainConfig  # noqa: E402


def sft_record(i: int) -> dict:
    return {"instruction": f"Write a short product description for item {i}: a cotton shirt, blue, loose fit.",
            "input": "", "output": f"This blue cotton shirt ({i}) has a loose fit and a soft feel. " * 3}


def pair_record(i: int) -> dict:
    return {"instruction": f"Question {i}: what is {i} plus {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."}


def write(path: Path, make, records: int) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(records):
            f.write(json.dumps(make(i), ensure_ascii=False) + "\n")
    return path


def bare_read(path: Path) -> None:
    with path.open(encoding="utf-8") as f:
        for line in f:
            json.loads(line)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_mib(fn) -> float:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", default=str(ROOT / "docs" / "results" / "preflight.md"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage, make, kind in (("sft", sft_record, "conversations"), ("dpo", pair_record, "pairs")):
            data = write(Path(tmp) / f"{stage}.jsonl", make, args.records)
            cfg = TrainConfig(data=[str(data)], stage=stage, output_dir=str(Path(tmp) / "out"))
            check = timed(functools.partial(check_records, cfg, kind), args.repeats)
            bare = timed(functools.partial(bare_read, data), args.repeats)
            small = write(Path(tmp) / f"{stage}-small.jsonl", make, args.records // 10)
            small_cfg = TrainConfig(data=[str(small)], stage=stage, output_dir=str(Path(tmp) / "out"))
            rows.append((stage, data.stat().st_size / 2**20, check, bare,
                         peak_mib(functools.partial(check_records, small_cfg, kind)),
                         peak_mib(functools.partial(check_records, cfg, kind))))
    cpu = " ".join(sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith("avx512")})) \
        if Path("/proc/cpuinfo").exists() else ""
    lines = [f"# The record pass before the model loads ({args.records:,} records, median of {args.repeats})", "",
             "`python benchmarks/preflight_records.py` on this machine: " f"{platform.processor() or platform.machine()}, "
             f"Python {platform.python_version()}, one process (flags: {cpu or 'no AVX512'}; load average "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores).", "",
             "| stage | file MiB | full pass s | µs / record | bare json.loads s | pass / bare | peak MiB "
             f"({args.records // 10:,} records) | peak MiB ({args.records:,}) |",
             "|---|---|---|---|---|---|---|---|"]
    for stage, size, check, bare, peak_small, peak in rows:
        lines.append(f"| {stage} | {size:.1f} | {check:.2f} | {check / args.records * 1e6:.1f} | {bare:.2f} | "
                     f"{check / bare:.1f}x | {peak_small:.2f} | {peak:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        from finechat.files import write_text_atomic

        write_text_atomic(args.write, text)


if __name__ == "__main__":
    main()
