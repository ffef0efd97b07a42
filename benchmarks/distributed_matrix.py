"""Every stage and method under every strategy, on a tiny model: does it train, export and load? (issue 29, item 2)

Each case is ``finechat train ... --nproc-per-node 2 max_steps=2`` on a tiny Llama (2 layers, hidden 64, the test
tokenizer from tests/tiny.py) with ``distributed.strategy=S``; then, if the checkpoint holds shards,
``finechat export --checkpoint`` into a plain folder; then the result is loaded as its front end loads it
(``finechat.load`` + 4 generated tokens for a chat model or adapter; ``load_reward_model`` + two scores for
stage rm). A combination finechat refuses before start shows its one-line reason. One case at a time, 2
processes x 1 thread, gloo; prints a markdown table (and writes it to --out when given). Usage:

    python benchmarks/distributed_matrix.py [--strategies ddp,fsdp2,zero2,zero3] [--cases sft-lora,rm-full,...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3")
PAIRS = "pairs"  # data names, written by _data
CASES = {  # name: (data, overrides)
    "sft-lora": ("sft", ["method=lora"]),
    "sft-full": ("sft", ["method=full"]),
    "sft-freeze": ("sft", ["method=freeze"]),
    "sft-ptuning": ("sft", ["method=ptuning", "pre_seq_len=4"]),
    "sft-qlora": ("sft", ["method=qlora", "quantization_bit=4"]),
    "sft-qlora8": ("sft", ["method=qlora", "quantization_bit=8"]),
    "sft-lora-packing": ("sft", ["method=lora", "packing=true"]),
    "pretrain-full": ("text", ["stage=pretrain", "method=full"]),
    "rm-lora": (PAIRS, ["stage=rm", "method=lora", "template=null"]),
    "rm-full": (PAIRS, ["stage=rm", "method=full", "template=null"]),
    "dpo-lora": (PAIRS, ["stage=dpo", "method=lora", "template=null"]),
    "dpo-full": (PAIRS, ["stage=dpo", "method=full", "template=null"]),
    "dpo-freeze": (PAIRS, ["stage=dpo", "method=freeze", "template=null"]),
    "orpo-lora": (PAIRS, ["stage=orpo", "method=lora", "template=null"]),
    "simpo-lora": (PAIRS, ["stage=simpo", "method=lora", "template=null"]),
    "kto-lora": ("kto", ["stage=kto", "method=lora", "template=null"]),
    "kto-full": ("kto", ["stage=kto", "method=full", "template=null"]),
    "grpo-lora": ("prompts", ["stage=grpo", "method=lora", "template=null", "num_generations=2",
                              "max_completion_length=4", "rewards=[format]"]),
    "grpo-full": ("prompts", ["stage=grpo", "method=full", "template=null", "num_generations=2",
                              "max_completion_length=4", "rewards=[format]"]),
}


def _data(folder: Path) -> dict[str, Path]:
    sft = folder / "alpaca.json"
    sft.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
                               for i in range(1, 41)]))
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "chosen": f"{i} + {i} = {2 * i}.",
                                         "rejected": "I do not know."}) + "\n" for i in range(2, 22)))
    kto = folder / "kto.jsonl"
    kto.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"{i} + {i} = {2 * i}." if i % 2 else "I do not know."}],
        "label": bool(i % 2)}) + "\n" for i in range(2, 22)))
    text = folder / "corpus.txt"
    text.write_text("\n".join(f"The quick brown fox jumps over {i} lazy dogs." for i in range(40)) + "\n")
    return {"sft": sft, PAIRS: pairs, "kto": kto, "text": text,
            "prompts": ROOT / "data" / "samples" / "preference" / "arithmetic_sft.jsonl"}


def _load_check(folder: Path, model: Path, reward: bool) -> str:
    """Load the result as its front end does, in a fresh process; returns 'ok ...' or the error's last line."""
    code = ("import sys\nfrom pathlib import Path\nfolder, model = Path(sys.argv[1]), sys.argv[2]\n"
            + ("from finechat.eval.reward_scoring import load_reward_model\n"
               "from finechat.data.formats import Conversation, Turn\n"
               "rm = load_reward_model(folder, device='cpu')\nq = Conversation([Turn('user', 'What is 2 plus 2?')])\n"
               "s = rm.score([(q, '2 + 2 = 4.'), (q, 'I do not know.')])\nprint('OK scores', [round(x, 3) for x in s])"
               if reward else
               "import finechat\nadapter = (folder / 'adapter_config.json').is_file()\n"
               "bot = finechat.load(model if adapter else str(folder), adapter=str(folder) if adapter else None, "
               "device='cpu', max_new_tokens=4, do_sample=False)\n"
               "print('OK', 'adapter' if adapter else 'model', repr(bot.chat('Count to 3.')[0]))"))
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(model)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    ok = [line for line in lines if line.startswith("OK")]
    return ok[-1][3:] if ok and proc.returncode == 0 else f"load failed: {lines[-1][:160] if lines else proc.returncode}"


def run_case(work: Path, model: Path, data: dict, name: str, strategy: str, steps: int) -> dict:
    kind, overrides = CASES[name]
    out = work / f"{name}-{strategy}"
    cmd = [sys.executable, "-m", "finechat", "train", f"model={model}", f"data=[{data[kind]}]", f"output_dir={out}",
           "template=alpaca", f"max_steps={steps}", f"save_steps={steps}", "logging_steps=1", "cutoff_len=64",
           "per_device_train_batch_size=2", "report_to=[none]", "lora_target=[q_proj,v_proj]", "max_samples=16",
           "--nproc-per-node", "2", f"distributed.strategy={strategy}", *overrides]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    row = {"case": name, "strategy": strategy, "seconds": round(time.monotonic() - started)}
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode == 2 and err and "error:" in err[-1]:
        return {**row, "train": "refused", "note": err[-1].split("error: ", 1)[-1][:180]}
    if proc.returncode != 0:  # the failing rank's exception, not the launcher's closing line
        cause = [line for line in err if re.match(r"^[\w.]*(Error|Exception)\b", line)] or err or [""]
        return {**row, "train": f"failed (exit {proc.returncode})", "note": cause[-1][:180]}
    checkpoint = out / f"checkpoint-{steps}"
    losses = [json.loads(line).get("loss") for line in (out / "train_log.jsonl").read_text().splitlines()]
    row.update(train="ok", loss=next((x for x in reversed(losses) if x is not None), None))
    from finechat.train.shard_files import shard_engine

    folder = checkpoint
    if shard_engine(checkpoint):
        folder = work / f"{name}-{strategy}-export"
        exp = subprocess.run([sys.executable, "-m", "finechat", "export", "--checkpoint", str(checkpoint), "--out",
                              str(folder)], capture_output=True, text=True, timeout=600)
        row["export"] = "ok" if exp.returncode == 0 else f"failed: {(exp.stderr.strip().splitlines() or [''])[-1][:160]}"
        if exp.returncode != 0:
            return row
    else:
        row["export"] = "plain checkpoint"
    row["load"] = _load_check(folder, model, reward=overrides[0] == "stage=rm")
    return row


def table(rows: list[dict]) -> str:
    lines = ["| case | strategy | train | final loss | export | load (front end) | s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r['loss']:.4f}" if isinstance(r.get("loss"), float) else ""
        train = r["train"] + (f": {r['note']}" if r.get("note") else "")
        lines.append(f"| {r['case']} | {r['strategy']} | {train} | {loss} | {r.get('export', '')} | "
                     f"{r.get('load', '')} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save_tiny_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="finechat-matrix-") as tmp:
        work = Path(tmp)
        model = save_tiny_model(work / "tiny")
        data = _data(work)
        for name in args.cases.split(","):
            for strategy in args.strategies.split(","):
                row = run_case(work, model, data, name, strategy, args.steps)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    Path(args.out).write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
