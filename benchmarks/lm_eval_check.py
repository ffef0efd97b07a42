"""lm-evaluation-harness three ways on one model folder: finechat eval --tasks, lm-eval's hf backend, and
lm-eval's local-completions / local-chat-completions against `finechat serve`; prints one table.

    python benchmarks/lm_eval_check.py [--model FOLDER] [--limit N] [--port 8765]

The folder defaults to the default model's converted Hugging Face folder. The log-likelihood columns should
agree to 2e-3 per scored choice (the script prints the largest difference) and the accuracies exactly.
Runs offline on the project's own tasks (data/tasks/finechat_mc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "data" / "tasks" / "finechat_mc"
MC = "finechat_mc_en,finechat_mc_zh"


def run(cmd: list[str], **kwargs) -> float:
    """Run a command from the repository root; its wall time in seconds."""
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, **kwargs)
    return time.time() - start


def lm_eval(args: list[str], out: Path) -> tuple[dict, dict, float]:
    """lm-eval's own command line: (results, {task: [loglikelihood per scored choice]}, seconds)."""
    seconds = run([sys.executable, "-m", "lm_eval", *args, "--include_path", str(TASKS), "--output_path", str(out),
                   "--log_samples"])
    results = json.loads(max(out.rglob("results_*.json"), key=os.path.getmtime).read_text())
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.split("_20")[0].removeprefix("samples_")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows.sort(key=lambda r: r["doc_id"])
        samples[task] = [float(resp[0][0]) for r in rows for resp in r["resps"] if isinstance(resp[0], list)]
    return results, samples, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face model folder (default: the default model's folder)")
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from finechat.models.resolve import default_model_dir

    folder = Path(args.model or default_model_dir())
    limit = ["--limit", str(args.limit)] if args.limit else []
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    work = Path(tempfile.mkdtemp(prefix="lm_eval_check-"))

    ours_seconds = run([sys.executable, "-m", "finechat", "eval", "--tasks", str(TASKS), "--model", str(folder),
                        "--output-dir", str(work / "finechat"), *limit], env=env)
    ours = json.loads((work / "finechat" / "lm_eval_results.json").read_text())
    hf, hf_ll, hf_seconds = lm_eval(["--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
                                     "--device", "cpu", "--tasks", MC, *limit], work / "hf")
    server = subprocess.Popen([sys.executable, "-m", "finechat", "serve", "--model", str(folder), "--port",
                               str(args.port)], env=env, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{args.port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        served, served_ll, served_seconds = lm_eval(
            ["--model", "local-completions", "--model_args",
             f"model=default,base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={folder},"
             "num_concurrent=4", "--tasks", MC, *limit], work / "served")
        chat, _, chat_seconds = lm_eval(
            ["--model", "local-chat-completions", "--model_args",
             f"model=default,base_url={url}/v1/chat/completions,num_concurrent=4", "--apply_chat_template",
             "--tasks", "finechat_qa_en", *limit], work / "chat")
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"\nmodel folder: {folder}   limit: {args.limit or 'all'}\n")
    print("| task | metric | finechat eval --tasks | lm_eval --model hf | lm_eval local-completions -> finechat serve |")
    print("|---|---|---:|---:|---:|")
    for task in MC.split(","):
        for metric in ("acc", "acc_norm"):
            key = f"{metric},none"
            print(f"| {task} | {metric} | {ours['results'][task][key]:.4f} | {hf['results'][task][key]:.4f} | "
                  f"{served['results'][task][key]:.4f} |")
    qa, ours_qa = chat["results"]["finechat_qa_en"], ours["results"]["finechat_qa_en"]
    print(f"| finechat_qa_en | exact_match | {ours_qa['exact_match,strip']:.4f} (plain prompt) | - | "
          f"{qa['exact_match,strip']:.4f} (local-chat-completions: chat template) |")
    print(f"\nwall time (s): finechat eval {ours_seconds:.0f} (all three tasks), hf {hf_seconds:.0f}, "
          f"local-completions {served_seconds:.0f}, local-chat-completions {chat_seconds:.0f}")
    worst = max(abs(a - b) for task in hf_ll for a, b in zip(hf_ll[task], served_ll[task]))
    count = sum(len(v) for v in hf_ll.values())
    print(f"\nlargest |server - hf| log-likelihood over {count} scored choices: {worst:.2e} (goal <= 2e-3)")
    return 0 if worst <= 2e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
