"""`finechat medical run`: a three-stage recipe on a tiny model, then one table with KG accuracy per stage."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from finechat.medical.kg import KGSettings, generate_pairs, load_graph, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples" / "medical"


def test_bundled_recipe_is_valid():
    from finechat.medical.evaluate import stages_output
    from finechat.train.stages import parse_stages

    cfg, _ = stages_output(str(ROOT / "recipes" / "medical" / "recipe.yaml"), [])
    stages = parse_stages(cfg)
    assert [s.name for s in stages] == ["general", "kg", "dialogue"]
    assert stages[1].mix is not None and stages[2].mix is not None
    assert cfg.defaults["template"] == "huatuo" and stages[2].train["template"] == "chatdoctor"
    for s in stages:
        for path in s.train["data"]:
            assert (ROOT / path).is_file(), path
    assert (ROOT / "data" / "samples" / "medical" / "kg_qa.heldout.jsonl").is_file()


def ours(stdout: str) -> str:
    """Our table (KG accuracy + general set): after the stage runner's own table, before the wall time."""
    start = next(i for i, line in enumerate(stdout.splitlines()) if line.startswith("| stage") and "kg-acc" in line)
    return "\n".join(stdout.splitlines()[start:]).split("wall time")[0]


def test_three_stage_run_on_a_tiny_model(tiny_model_dir, tmp_path):
    graph = load_graph(SAMPLES / "graph.json")
    train, held = generate_pairs(graph, KGSettings(seed=3, holdout=0.5, relations="department"))
    write_jsonl(train[:8], tmp_path / "kg.jsonl")
    write_jsonl(held[:3], tmp_path / "held.jsonl")
    recipe = {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"), "continue_from": "adapter",
        "defaults": {"method": "lora", "template": "huatuo", "max_steps": 1, "save_steps": 1, "cutoff_len": 96,
                     "per_device_train_batch_size": 2, "report_to": ["none"], "logging_steps": 1},
        "eval_general": {"data": str(SAMPLES / "general_eval.jsonl"), "max_samples": 2, "max_new_tokens": 4},
        "stages": [
            {"name": "general", "data": [str(SAMPLES / "general.jsonl")]},
            {"name": "kg", "data": [str(tmp_path / "kg.jsonl")],
             "mix": {"data": [str(SAMPLES / "general.jsonl")], "ratio": 0.2}},
            {"name": "dialogue", "data": [str(SAMPLES / "dialogues.jsonl")], "template": "chatdoctor"},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    cmd = [sys.executable, "-m", "finechat.cli", "medical", "run", str(path), "--questions",
           str(tmp_path / "held.jsonl"), "--max-new-tokens", "4"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # the stage runner's own table comes first; ours (KG accuracy + general set) last
    lines = [line for line in ours(result.stdout).splitlines() if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["base", "1. general", "2. kg", "3. dialogue"]
    assert "kg-acc" in lines[0] and "general-rouge-l" in lines[0] and "wall time" in result.stdout
    out = tmp_path / "out"
    assert (out / "medical_summary.md").is_file()
    predictions = (out / "02-kg" / "medical_eval" / "kg_predictions.jsonl").read_text(encoding="utf-8")
    assert len(predictions.splitlines()) == 3 and '"correct"' in predictions
    cache = json.loads((out / "medical_eval.json").read_text(encoding="utf-8"))
    assert len(cache) == 4
    # A second run finds every stage done and every score cached: same table, no training.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    assert again.returncode == 0 and ours(again.stdout) == ours(result.stdout)
    assert "already done" in again.stderr and "medical eval:" not in again.stderr
