"""Fine-tune the default model with LoRA in minutes on a CPU, and show before / after.

``--task tools`` teaches it to call tools instead (finechat.commands._quickstart_tools); the default task is:

The whole finechat loop in one command: generate ADGEN-like training and held-out data (attribute strings ->
Chinese advertising copy, finechat.data.synthetic), score the untuned model on the held-out set (BLEU-4,
Rouge-1/2/L, eval loss), LoRA-tune it (finechat.train.recipe.run_training), score it again, print the table
and example answers side by side, and print the commands to chat with, evaluate and export the result.
"""

from __future__ import annotations

import argparse

from finechat.commands._quickstart_tools import DEFAULTS as TOOLS_DEFAULTS
from finechat.commands._quickstart_tools import run_tools
from finechat.console import log
from finechat.data.synthetic import write_adgen
from finechat.errors import ConfigError
from finechat.eval.compare import Entry, run_entry, side_by_side
from finechat.eval.metrics import format_table
from finechat.eval.predict import load_examples
from finechat.files import write_text_atomic
from finechat.generate.settings import GenerationSettings
from finechat.models.device import cpu_threads
from finechat.train.recipe import run_training
from finechat.train.train_config import TrainConfig

RUNS_MODEL = True  # runs under models.device.cpu_threads (see finechat.cli)

DEFAULT_MODEL_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


ADGEN_DEFAULTS = {"output_dir": "output/quickstart", "max_steps": 40, "learning_rate": 5e-3, "train_examples": 400,
                  "eval_examples": 8, "max_new_tokens": 80, "batch_size": 4}
TASKS = {"adgen": ADGEN_DEFAULTS, "tools": TOOLS_DEFAULTS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def default(key: str) -> str:
        return f"(adgen: {ADGEN_DEFAULTS[key]}, tools: {TOOLS_DEFAULTS[key]})"

    parser.add_argument("--task", choices=list(TASKS), default="adgen",
                        help="adgen: ADGEN-like advertising copy, scored by BLEU / Rouge; tools: calling Calculate, "
                             "Solve and Search, scored by the share of held-out questions answered through a correct "
                             "tool call with the exact result")
    parser.add_argument("--model", default="default", help="base model ('default': SmolLM2-135M-Instruct)")
    parser.add_argument("--output-dir", help=f"where data, adapter and reports go {default('output_dir')}")
    parser.add_argument("--max-steps", type=int, help=f"LoRA optimizer steps {default('max_steps')}")
    parser.add_argument("--batch-size", type=int, help=f"training examples per step {default('batch_size')}")
    parser.add_argument("--learning-rate", type=float, help=f"LoRA learning rate {default('learning_rate')}")
    parser.add_argument("--train-examples", type=int, help=f"generated training examples {default('train_examples')}")
    parser.add_argument("--eval-examples", type=int,
                        help=f"held-out examples scored before and after {default('eval_examples')}")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"answer length limit when scoring (tools: per round) {default('max_new_tokens')}")
    parser.add_argument("--seed", type=int, default=42, help="random seed (data, adapter init, data order)")


def main(args: argparse.Namespace) -> int:
    for key, value in TASKS[args.task].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.max_steps < 1 or args.eval_examples < 1 or args.train_examples < args.batch_size:
        raise ConfigError("--max-steps and --eval-examples must be >= 1 and --train-examples >= --batch-size")
    with cpu_threads():  # restored afterwards: the caller's thread count is its own
        if args.task == "tools":
            return run_tools(args, DEFAULT_MODEL_LORA_TARGETS if args.model == "default" else [])
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import json
    import shutil
    import time
    from pathlib import Path

    t_start = time.time()
    out = Path(args.output_dir)
    train_file, dev_file = out / "data" / "adgen_train.jsonl", out / "data" / "adgen_dev.jsonl"
    write_adgen(train_file, args.train_examples, seed=args.seed)
    write_adgen(dev_file, args.eval_examples, seed=args.seed + 1_000_003)  # a different stream: held out
    examples = load_examples(dev_file)
    settings = GenerationSettings(greedy=True, max_new_tokens=args.max_new_tokens)
    timings: dict[str, float] = {}

    log(f"[1/3] Scoring the untuned model on {len(examples)} held-out examples ...")
    t0 = time.time()
    before, before_records = run_entry(Entry("before", model=args.model), examples, out / "before", {}, settings,
                                       batch_size=8, with_loss=True)
    timings["eval before (s)"] = time.time() - t0

    log(f"[2/3] LoRA fine-tuning for {args.max_steps} steps of {args.batch_size} examples ...")
    lora_dir = out / "lora"
    if (lora_dir / "finechat_run.json").is_file():  # our own earlier quickstart run: start afresh
        shutil.rmtree(lora_dir)
    cfg = TrainConfig(
        model=args.model, method="lora", data=[str(train_file)], datasets=["adgen-synthetic"],
        output_dir=str(lora_dir), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_ratio=0.1, lora_rank=8,
        # Every linear layer of the default model (Llama): a short run learns the style much faster than
        # with attention-only LoRA. Another model gets peft's per-architecture choice.
        lora_target=DEFAULT_MODEL_LORA_TARGETS if args.model == "default" else [],
        lora_alpha=16, lora_dropout=0.0, cutoff_len=192, logging_steps=max(1, args.max_steps // 8),
        save_steps=args.max_steps, seed=args.seed, report_to=["none"], group_by_length=True,
    )
    t0 = time.time()
    result = run_training(cfg)
    timings["training (s)"] = time.time() - t0
    adapter = result.final_checkpoint or str(lora_dir)

    log("[3/3] Scoring the tuned model ...")
    t0 = time.time()
    after, after_records = run_entry(Entry("after", model=args.model, adapter=adapter), examples, out / "after", {},
                                     settings, batch_size=8, with_loss=True)
    timings["eval after (s)"] = time.time() - t0
    timings["total (s)"] = time.time() - t_start

    table = format_table({"before (untuned)": before, f"after LoRA ({args.max_steps} steps)": after})
    shown = side_by_side({"before": before_records, "after": after_records}, count=2)
    losses = result.metrics
    train_line = (f"training loss {losses.get('first_loss', float('nan')):.3f} -> {losses.get('final_loss', float('nan')):.3f} "
                  f"in {timings['training (s)']:.0f} s; total {timings['total (s)']:.0f} s")
    report = {"before": before, "after": after, "adapter": adapter, "timings": timings, "train": losses,
              "command": f"finechat chat --model {args.model} --adapter {adapter}"}
    write_text_atomic(out / "quickstart.json", json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    write_text_atomic(out / "quickstart.md", f"{table}\n\n{train_line}\n\n```\n{shown}\n```\n")

    print()
    print("ADGEN-like held-out set: BLEU-4 (characters), Rouge-1/2/L F (jieba words), x100; greedy decoding")
    print(table)
    print(train_line)
    print()
    print(shown)
    print()
    print("Chat with the result:")
    model_flag = "" if args.model == "default" else f"--model {args.model} "
    print(f"  finechat chat {model_flag}--adapter {adapter}")
    print("Score it on other data, or merge it into a plain Hugging Face folder:")
    print(f"  finechat eval {model_flag}--adapter {adapter} --data {dev_file}")
    print(f"  finechat export {model_flag}--adapter {adapter} --out {out / 'merged'}")
    return 0
