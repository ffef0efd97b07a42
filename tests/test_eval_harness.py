"""lm-evaluation-harness on finechat models (finechat eval --tasks) and against finechat serve.

The numbers are checked against lm-eval's own transformers backend on the same folder (for an adapter: on its
merged export), with the project's own offline task files.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eval_helpers import make_adapter
from serve_helpers import LiveServer
from side_by_side import beside

from finechat.cli import main as cli
from finechat.errors import ConfigError
from finechat.eval import harness
from finechat.serve.api import ServeSettings, create_app

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "data" / "tasks" / "finechat_mc"
MC = f"{TASKS / 'finechat_mc_en.yaml'},{TASKS / 'finechat_mc_zh.yaml'}"
LIMIT = 6


def accuracies(results: dict) -> dict:
    return {task: (round(v["acc,none"], 6), round(v["acc_norm,none"], 6)) for task, v in results["results"].items()}


def loglikelihoods(results: dict) -> list[float]:
    """Every scored (context, choice) of every task, in lm-eval's order."""
    return [resp[0][0] for task in sorted(results["samples"]) for sample in results["samples"][task]
            for resp in sample["resps"]]


def configs_only():
    """A task manager for task configs (what resolve_tasks gives): without lm-eval's own index of its thousands of
    task files, which simple_evaluate would otherwise build on every call (seconds each)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


def hf_results(folder, tasks, limit=LIMIT) -> dict:
    from lm_eval import simple_evaluate

    return simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", device="cpu", tasks=tasks,
                           limit=limit, log_samples=True, bootstrap_iters=0, task_manager=configs_only())


@pytest.fixture(scope="module")
def hf_mc(tiny_model_dir) -> dict:
    """lm-eval's transformers backend on the tiny model and the two multiple-choice tasks: the reference that
    several tests compare with, computed once (the tests only read it)."""
    return hf_results(tiny_model_dir, harness.resolve_tasks(MC))


def test_task_files_resolve_and_bad_ones_fail_with_one_line(tmp_path):
    configs = harness.resolve_tasks(str(TASKS))
    assert sorted(c["task"] for c in configs) == ["finechat_mc_en", "finechat_mc_zh", "finechat_qa_en"]
    for config in configs:  # data files found from anywhere, made absolute
        assert all(Path(p).is_file() for p in config["dataset_kwargs"]["data_files"].values())
    with pytest.raises(ConfigError, match="no such task file"):
        harness.resolve_tasks(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: bad\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nowhere.jsonl\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: data file nowhere.jsonl not found"):
        harness.resolve_tasks(str(bad))


def test_a_task_without_its_data_offline_fails_with_one_line_naming_the_dataset(tiny_model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "finechat.cli", "eval", "--tasks", "arc_easy", "--model",
                          str(tiny_model_dir), "--limit", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "arc_easy" in last and "allenai/ai2_arc" in last and "dataset_path: json" in last
    assert "Traceback" not in run.stderr


def test_finechat_eval_equals_lm_eval_cli_on_base_and_on_the_merged_adapter(tiny_model_dir, hf_mc, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "lora")
    merged = tmp_path / "merged"
    assert cli(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(merged)]) == 0
    # lm-eval's own command line on the merged export, from the repository root (where the task files point);
    # it runs beside finechat eval below (two cores: the two do not wait for each other)
    lm_out = tmp_path / "lm"
    lm_eval_argv = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                    f"pretrained={merged},dtype=float32", "--include_path", str(TASKS), "--tasks",
                    "finechat_mc_en,finechat_mc_zh", "--limit", str(LIMIT), "--output_path", str(lm_out),
                    "--device", "cpu"]
    with beside(lm_eval_argv, cwd=ROOT) as (lm_eval_cli,):
        out = tmp_path / "cmp"
        assert cli(["eval", "--tasks", MC, "--model", str(tiny_model_dir), "--compare", "base", str(adapter),
                    "--limit", str(LIMIT), "--batch-size", "4", "--output-dir", str(out)]) == 0
        _, stderr = lm_eval_cli.communicate(timeout=900)
    ours_base = json.loads((out / "base" / "lm_eval_results.json").read_text())
    ours_lora = json.loads((out / "lora" / "lm_eval_results.json").read_text())
    assert "finechat_mc_en acc" in (out / "lm_eval_compare.md").read_text()

    assert lm_eval_cli.returncode == 0, stderr[-3000:]
    theirs_lora = json.loads(next(lm_out.rglob("results_*.json")).read_text())
    assert accuracies(ours_lora) == accuracies(theirs_lora)
    assert accuracies(ours_base) == accuracies(hf_mc)
    assert accuracies(ours_base) != accuracies(ours_lora)  # the (seeded) adapter changes the answers


def test_harness_equals_hf_backend_on_loglikelihoods_and_generations(tiny_bot, tiny_model_dir, hf_mc):
    from lm_eval import simple_evaluate

    tasks = harness.resolve_tasks(MC)
    model = harness.harness_model(tiny_bot, batch_size=3)
    ours = simple_evaluate(model=model, tasks=tasks, limit=LIMIT, log_samples=True, bootstrap_iters=0,
                           task_manager=configs_only())
    theirs = hf_mc
    assert loglikelihoods(ours) == pytest.approx(loglikelihoods(theirs), abs=2e-4)
    assert accuracies(ours) == accuracies(theirs)
    qa = harness.resolve_tasks(str(TASKS / "finechat_qa_en.yaml"))
    ours_qa = simple_evaluate(model=model, tasks=qa, limit=3, log_samples=True, bootstrap_iters=0,
                              task_manager=configs_only())
    theirs_qa = hf_results(tiny_model_dir, qa, limit=3)
    texts = [[s["resps"] for s in r["samples"]["finechat_qa_en"]] for r in (ours_qa, theirs_qa)]
    assert texts[0] == texts[1] and any(t[0][0] for t in texts[0])  # same greedy answers, not all empty


def test_native_chatglm_scores_the_answer_after_sop(tmp_path):
    """ChatGLM-6B is a prefix LM: the context ends with [gMASK]<sop>, the choice follows as an answer would."""
    import torch
    from chatglm_tiny import write_fake_chatglm

    from finechat.generate.chat_loader import load

    bot = load(str(write_fake_chatglm(tmp_path / "chatglm-6b")), dtype="float32")
    model = harness.harness_model(bot)
    context, choice = model._encode_pair("中国的首都是哪座城市？答案：", "北京")
    tok = bot.tokenizer
    assert context[-2:] == [tok.gmask_token_id, tok.bos_token_id] and tok.bos_token_id not in choice
    (value, _), = model._loglikelihood_tokens([(None, context, choice)])
    ids = context + choice
    with torch.inference_mode():
        rows = bot.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert value == pytest.approx(sum(rows[i - 1, ids[i]].item() for i in range(len(context), len(ids))), abs=1e-5)
    results = harness.evaluate(bot, harness.resolve_tasks(str(TASKS / "finechat_mc_zh.yaml")), limit=2)
    assert 0 <= results["results"]["finechat_mc_zh"]["acc,none"] <= 1


def test_lm_eval_against_finechat_serve_matches_the_hf_backend(tiny_bot, tiny_model_dir, hf_mc):
    """local-completions (log-likelihoods, echo) and local-chat-completions (generation) on a live server."""
    from lm_eval import simple_evaluate

    tasks = harness.resolve_tasks(MC)
    srv = LiveServer(create_app(tiny_bot, ServeSettings(model_name="tiny")))
    try:
        served = simple_evaluate(
            model="local-completions", tasks=tasks, limit=LIMIT, log_samples=True, bootstrap_iters=0,
            task_manager=configs_only(),
            model_args=f"model=tiny,base_url={srv.url}/v1/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={tiny_model_dir},num_concurrent=2,max_retries=1")
        qa = harness.resolve_tasks(str(TASKS / "finechat_qa_en.yaml"))
        chat = simple_evaluate(
            model="local-chat-completions", tasks=qa, limit=3, apply_chat_template=True, bootstrap_iters=0,
            task_manager=configs_only(),
            model_args=f"model=tiny,base_url={srv.url}/v1/chat/completions,num_concurrent=1,max_retries=1")
    finally:
        srv.stop()
    theirs = hf_mc
    ours, reference = loglikelihoods(served), loglikelihoods(theirs)
    assert len(ours) == len(reference) == 2 * LIMIT * 4
    assert ours == pytest.approx(reference, abs=2e-3)
    assert accuracies(served) == accuracies(theirs)
    assert 0 <= chat["results"]["finechat_qa_en"]["exact_match,strip"] <= 1


@pytest.mark.slow
def test_default_model_served_loglikelihoods_equal_hf_backend():
    """The real default model: lm-eval's local-completions against finechat serve = its hf backend (2e-3)."""
    from lm_eval import simple_evaluate

    from finechat.generate.chat_loader import load
    from finechat.models.resolve import default_model_dir

    folder = default_model_dir()
    tasks = harness.resolve_tasks(str(TASKS / "finechat_mc_en.yaml"))
    srv = LiveServer(create_app(load(str(folder)), ServeSettings(model_name="default")))
    try:
        served = simple_evaluate(
            model="local-completions", tasks=tasks, limit=4, log_samples=True, bootstrap_iters=0,
            task_manager=configs_only(),
            model_args=f"model=default,base_url={srv.url}/v1/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={folder},num_concurrent=2,max_retries=1")
    finally:
        srv.stop()
    theirs = hf_results(folder, tasks, limit=4)
    assert loglikelihoods(served) == pytest.approx(loglikelihoods(theirs), abs=2e-3)
    assert accuracies(served) == accuracies(theirs)


def test_task_code_runs_only_with_trust_task_code(tmp_path, tiny_model_dir, capsys):
    marker = tmp_path / "task-code-ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n\ndef process_docs(docs):\n    return docs\n")
    data = tmp_path / "test.jsonl"
    data.write_text('{"question": "2+2?", "answer": "4"}\n')
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"task: evil\n{common}process_docs: !function evil.process_docs\n")
    included = tmp_path / "sub"
    included.mkdir()
    (included / "wrapper.yaml").write_text("include: ../evil.yaml\ntask: wrapper\n")
    for spec, where in ((evil, evil), (included / "wrapper.yaml", evil)):
        code = cli(["eval", "--tasks", str(spec), "--model", str(tiny_model_dir)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"{where}: the task runs Python code (!function evil.process_docs" in err and "--trust-task-code" in err
        assert not marker.exists()
    (config,) = harness.resolve_tasks(str(evil), trust_task_code=True)
    assert marker.exists() and callable(config["process_docs"])
    assert harness.resolve_tasks(str(TASKS))  # the project's own task files name no code: no switch needed
