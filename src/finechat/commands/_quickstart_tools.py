"""``finechat quickstart --task tools``: teach the default model to call tools, and show the tool loop working.

Generate tool-use conversations with results from the real tools (:mod:`finechat.tools.demo_data`: arithmetic
through ``Calculate``, equations through ``Solve``, look-ups through ``Search`` over a few shipped notes), score the
untuned model on held-out questions through the real tool loop (:mod:`finechat.tools.accuracy`: the share answered
through a correct call whose exact result is in the final answer), LoRA-tune it on the OpenAI-style layout (the
``native`` protocol chat, serve and the web page use with it), score it again, and print the table, two
transcripts and the commands that show the same in chat, through the OpenAI API and on the web page.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from finechat.console import log
from finechat.files import write_jsonl_atomic, write_text_atomic
from finechat.generate.chat_loader import load as load_chat_model
from finechat.tools.accuracy import score_tool_use
from finechat.tools.agent import Agent
from finechat.tools.demo_data import (
    DEMO_DOCS,
    DEMO_TOOLS,
    demo_registry,
    generate_tool_examples,
    tool_records,
)
from finechat.train.recipe import run_training
from finechat.train.train_config import TrainConfig

DEFAULTS = {"output_dir": "output/quickstart-tools", "max_steps": 50, "learning_rate": 3e-3, "train_examples": 400,
            "eval_examples": 30, "max_new_tokens": 48, "batch_size": 4}
ROWS = (("all held-out questions", "accuracy"), ("  arithmetic (Calculate)", "arithmetic"),
        ("  equations (Solve)", "equation"), ("  look-ups (Search)", "lookup"), ("answers with any tool call", "called_a_tool"))


def run_tools(args: argparse.Namespace, lora_target: list[str]) -> int:
    t_start = time.time()
    out = Path(args.output_dir)
    docs = out / "docs"  # a copy of the shipped notes, so the printed commands name a folder of the user's own
    for source in sorted(DEMO_DOCS.glob("*.md")):
        write_text_atomic(docs / source.name, source.read_text(encoding="utf-8"))
    registry = demo_registry(docs)
    train = generate_tool_examples(args.train_examples, seed=args.seed, split="train", registry=registry)
    held_out = generate_tool_examples(args.eval_examples, seed=args.seed, split="heldout", registry=registry)
    train_file = out / "data" / "tools_train.jsonl"
    write_jsonl_atomic(train_file, tool_records(train, "openai", registry))
    write_jsonl_atomic(out / "data" / "tools_train_moss.jsonl", tool_records(train, "moss", registry))
    write_jsonl_atomic(out / "data" / "tools_heldout.jsonl", [e.to_dict() for e in held_out])
    gen = {"greedy": True, "max_new_tokens": args.max_new_tokens}
    timings: dict[str, float] = {}

    log(f"[1/3] Asking the untuned model {len(held_out)} held-out questions with tools ({DEMO_TOOLS}) ...")
    t0 = time.time()
    before, before_records = _score(args.model, None, registry, held_out, gen, "Before")
    timings["eval before (s)"] = time.time() - t0

    log(f"[2/3] LoRA fine-tuning on {len(train)} tool-use conversations for {args.max_steps} steps of "
        f"{args.batch_size} ...")
    lora_dir = out / "lora"
    if (lora_dir / "finechat_run.json").is_file():  # our own earlier quickstart run: start afresh
        shutil.rmtree(lora_dir)
    t0 = time.time()
    result = run_training(train_config(args, train_file, lora_dir, lora_target))
    timings["training (s)"] = time.time() - t0
    adapter = result.final_checkpoint or str(lora_dir)

    log("[3/3] Asking the tuned model the same questions ...")
    t0 = time.time()
    after, after_records = _score(args.model, adapter, registry, held_out, gen, "After")
    timings["eval after (s)"] = time.time() - t0
    timings["total (s)"] = time.time() - t_start

    table = _table(before, after, args.max_steps)
    losses = result.metrics
    train_line = (f"training loss {losses.get('first_loss', float('nan')):.3f} -> "
                  f"{losses.get('final_loss', float('nan')):.3f} in {timings['training (s)']:.0f} s; "
                  f"total {timings['total (s)']:.0f} s")
    shown = _transcripts(before_records, after_records)
    example = out / "openai_tools.py"
    write_text_atomic(example, OPENAI_EXAMPLE)
    model_flag = "" if args.model == "default" else f"--model {args.model} "
    commands = [
        "Chat with the result (each call and its result are printed as they run; a pipe gives one answer a line):",
        f"  finechat chat {model_flag}--adapter {adapter} --greedy --tools calculator",
        f"  finechat chat {model_flag}--adapter {adapter} --greedy --tools {DEMO_TOOLS} --docs {docs}",
        f"  printf 'What is 1234 * 5678?\\n' | finechat chat {model_flag}--adapter {adapter} --greedy --tools calculator",
        "Serve it; the web page at http://127.0.0.1:8000/ shows each call folded above the answer:",
        f"  finechat serve {model_flag}--adapter {adapter} --tools {DEMO_TOOLS} --docs {docs}",
        "A client that passes OpenAI `tools` gets `tool_calls` back and runs them itself (with the server above running):",
        f"  python {example}",
    ]
    report = {"before": before, "after": after, "adapter": adapter, "timings": timings, "train": losses,
              "held_out": str(out / "data" / "tools_heldout.jsonl"), "commands": commands}
    _write_json(out / "quickstart.json", report)
    write_jsonl_atomic(out / "before" / "answers.jsonl", before_records)
    write_jsonl_atomic(out / "after" / "answers.jsonl", after_records)
    write_text_atomic(out / "quickstart.md", f"{table}\n\n{train_line}\n\n```\n{shown}\n```\n")

    print()
    print(f"Held-out questions ({len(held_out)}, never trained on): the share answered through a correct tool call "
          "whose exact result is in the final answer; greedy decoding")
    print(table)
    print(train_line)
    print()
    print(shown)
    print()
    print("\n".join(commands))
    return 0


def train_config(args: argparse.Namespace, train_file: Path, lora_dir: Path, lora_target: list[str]) -> TrainConfig:
    """The LoRA run of the demo: every linear layer of the default model, rank 8, cosine schedule."""
    return TrainConfig(
        model=args.model, method="lora", data=[str(train_file)], format="openai", datasets=["tools-synthetic"],
        output_dir=str(lora_dir), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_ratio=0.1, lora_rank=8,
        lora_target=lora_target, lora_alpha=16, lora_dropout=0.0, cutoff_len=512,
        logging_steps=max(1, args.max_steps // 8), save_steps=args.max_steps, seed=args.seed, report_to=["none"],
        group_by_length=True,
    )


def _score(model: str, adapter: str | None, registry, examples, gen: dict, name: str) -> tuple[dict, list[dict]]:
    bot = load_chat_model(model, adapter=adapter)
    summary, records = score_tool_use(Agent(bot, registry), examples, desc=name, **gen)
    del bot
    return summary, records


def _table(before: dict, after: dict, steps: int) -> str:
    head = f"after LoRA ({steps} steps)"
    lines = [f"| {'held-out questions':<28} | before (untuned) | {head} |",
             f"|{'-' * 30}|{'-' * 18}|{'-' * (len(head) + 2)}|"]
    for label, key in ROWS:
        if key in before or key in after:
            lines.append(f"| {label:<28} | {before.get(key, 0.0):>16.2f} | {after.get(key, 0.0):>{len(head)}.2f} |")
    return "\n".join(lines)


def _transcript(record: dict) -> list[str]:
    lines = [f"user: {record['question']}"]
    for call in record["calls"]:
        lines.append(f"  [tool] {call['call']}")
        lines.append("  => " + call["result"].replace("\n", "\n     "))
    lines.append(f"assistant: {record['answer']}")
    lines.append(f"expected {record['expected']!r}: {record['reason']}")
    return lines


def _transcripts(before: list[dict], after: list[dict], count: int = 2) -> str:
    """The first question of each of ``count`` kinds, before and after."""
    blocks, kinds = [], []
    for i, record in enumerate(after):
        if record["kind"] in kinds or len(kinds) >= count:
            continue
        kinds.append(record["kind"])
        blocks.append(f"--- example {len(kinds)} ({record['kind']}) ---")
        blocks += ["before:"] + ["  " + line for line in _transcript(before[i])]
        blocks += ["after:"] + ["  " + line for line in _transcript(record)]
    return "\n".join(blocks)


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


OPENAI_EXAMPLE = '''"""The tuned model through the OpenAI API with `tools`: it answers with a tool call, this script runs it with
finechat's own tools and sends the result back, the model answers. Start the server first (finechat quickstart --task
tools prints how). Usage: python openai_tools.py [BASE_URL] [QUESTION]"""

import json
import sys
from pathlib import Path

from openai import OpenAI

from finechat.tools.demo_data import demo_registry  # Calculate, Solve and Search: the tools the model was trained with

base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"  # another port: pass its /v1 URL
question = sys.argv[2] if len(sys.argv) > 2 else "What is 1234 * 5678?"
registry = demo_registry(Path(__file__).resolve().parent / "docs")  # Search looks through the notes copied beside this
client = OpenAI(base_url=base_url, api_key="unused")
tools = registry.openai_schemas()
messages = [{"role": "user", "content": question}]
reply = client.chat.completions.create(model="default", messages=messages, tools=tools, temperature=0)
message = reply.choices[0].message
print("finish_reason:", reply.choices[0].finish_reason)
if not message.tool_calls:
    print("answer:", message.content)
    sys.exit(0)
messages.append({"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in message.tool_calls]})
for call in message.tool_calls:
    result = registry.call(call.function.name, json.loads(call.function.arguments))
    print(f"tool call: {call.function.name}({call.function.arguments}) => {result.content}")
    messages.append({"role": "tool", "tool_call_id": call.id, "content": result.content})
final = client.chat.completions.create(model="default", messages=messages, tools=tools, temperature=0)
print("answer:", final.choices[0].message.content)
'''
