"""The board's Export and Evaluate jobs beyond GGUF and BLEU / Rouge, on a real board (127.0.0.1) running real
``finechat export`` / ``finechat eval`` child processes on a tiny model: a merged Hugging Face folder and an
8-bit quantized folder from a LoRA adapter (path and size shown, the folder loads with finechat), and the
shipped lm-eval task with a limit, base and adapter side by side."""

import json
from pathlib import Path

import pytest
from board_helpers import Board
from eval_helpers import make_adapter

PROMPT = "What is the capital of France?"


@pytest.fixture()
def board(tmp_path, tiny_model_dir):
    b = Board(tmp_path, model_dir=tiny_model_dir)
    make_adapter(b.workspace / "models" / "tiny", b.workspace / "runs" / "lora" / "checkpoint-1")
    try:
        yield b
    finally:
        b.stop_all()
        b.stop()


def finished(board, body):
    r = board.post(body.pop("route"), body)
    assert r.status_code == 200, r.text
    job = board.wait(r.json()["id"], lambda j: j["state"] in ("finished", "failed", "stopped"), timeout=300)
    assert job["state"] == "finished", job["log"]
    return job


def test_export_merged_and_quantized_folders(board):
    import finechat

    adapter = "runs/lora/checkpoint-1"
    merged = finished(board, {"route": "/api/export/start", "name": "merged", "model": "models/tiny",
                              "adapter": adapter, "to": "hf"})
    out = board.workspace / "exports" / "merged" / "model"
    assert merged["result"]["path"] == str(out) and merged["result"]["bytes"] > 0
    assert merged["result"]["bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    record = json.loads((out / "finechat_export.json").read_text())
    assert record["merged"] is True and not (out / "adapter_config.json").exists()
    bot = finechat.load(str(out))
    with_adapter = finechat.load(str(board.workspace / "models" / "tiny"), adapter=str(board.workspace / adapter))
    answer = bot.chat(PROMPT, [], greedy=True, max_new_tokens=6)[0]
    assert answer == with_adapter.chat(PROMPT, [], greedy=True, max_new_tokens=6)[0]  # the adapter is merged in

    pytest.importorskip("bitsandbytes")
    quantized = finished(board, {"route": "/api/export/start", "name": "q8", "model": "models/tiny",
                                 "adapter": adapter, "to": "hf", "quantization_bit": 8})
    qout = board.workspace / "exports" / "q8" / "model"
    assert quantized["result"]["path"] == str(qout) and quantized["result"]["bytes"] > 0
    assert "--quantization-bit" in quantized["argv"]
    config = json.loads((qout / "config.json").read_text())
    assert config["quantization_config"]["load_in_8bit"] is True
    qbot = finechat.load(str(qout))
    assert isinstance(qbot.chat(PROMPT, [], greedy=True, max_new_tokens=4)[0], str)
    listed = {j["id"]: j["state"] for j in board.http.get("/api/jobs").json()["jobs"]}
    assert listed["exports/merged"] == listed["exports/q8"] == "finished"


def test_lm_eval_tasks_base_and_adapter_side_by_side(board):
    pytest.importorskip("lm_eval")
    task = "data/tasks/finechat_mc/finechat_mc_en.yaml"
    assert (board.workspace / task).is_file()  # the shipped tasks are copied into the workspace
    job = finished(board, {"route": "/api/eval/start", "name": "mc", "model": "models/tiny", "tasks": task,
                           "limit": 2, "base": True, "adapters": ["runs/lora/checkpoint-1"]})
    assert job["argv"][job["argv"].index("--limit") + 1] == "2.0"
    report = job["report"]
    header = next(line for line in report.splitlines() if "task metric" in line)
    assert "base" in header and "checkpoint-1" in header
    acc = next(line for line in report.splitlines() if line.strip("| ").startswith("finechat_mc_en acc "))
    values = [float(v) for v in acc.split("|")[2:] if v.strip()]
    assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
    result = Path(board.workspace / "evals" / "mc" / "result")
    per_entry = {p.parent.name: json.loads(p.read_text()) for p in result.glob("*/lm_eval_results.json")}
    assert len(per_entry) == 2
    for run in per_entry.values():
        assert run["n-samples"]["finechat_mc_en"]["effective"] == 2  # --limit reached lm-eval
