"""finechat board's API on a real server (127.0.0.1) with real `finechat train` child processes on a tiny model:
workspace confinement, the form from TrainConfig's fields, start / stop / resume / queue, restart recovery,
bad input (a 4xx naming the field, never a 500, nothing half-written)."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
from board_helpers import SLOW_STEPS, Board, upload_sample

from finechat.config import field, valid_keys
from finechat.serve.board import forms
from finechat.train.train_config import TrainConfig


@pytest.fixture()
def board(tmp_path, tiny_model_dir):
    b = Board(tmp_path, model_dir=tiny_model_dir)
    try:
        yield b
    finally:
        b.stop_all()
        b.stop()


def error(r, status):
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_paths_stay_inside_the_workspace(board, tmp_path):
    outside = tmp_path / "secret.json"
    outside.write_text('[{"instruction": "a", "output": "b"}]', encoding="utf-8")
    os.symlink(outside, board.workspace / "data" / "link.json")
    os.symlink(tmp_path, board.workspace / "data" / "up")
    for path in [str(outside), "../secret.json", "data/../../secret.json", "data/link.json", "data/up/secret.json",
                 "~/secret.json"]:
        e = error(board.post("/api/data/analyse", {"path": path}), 422)
        assert e["param"] == "path" and e["code"] in ("path_outside_workspace", "invalid_path"), e
    # the same checks guard every path a form names
    e = error(board.post("/api/train/plan", {"config": {"data": ["../secret.json"], "output_dir": "runs/x"}}), 422)
    assert e["param"] == "data"
    e = error(board.post("/api/train/plan", {"config": {"data": ["data/link.json"], "output_dir": "/tmp/x"}}), 422)
    assert e["param"] in ("data", "output_dir")
    e = error(board.post("/api/export/start", {"name": "x", "adapter": "../../etc"}), 422)
    assert e["param"] == "adapter"
    e = error(board.post("/api/chat/start", {"model": "/etc"}), 422)
    assert e["param"] == "model"
    # upload names are names, not paths; the listing leaves out links that lead outside
    e = error(board.post("/api/upload", {"name": "../evil.json", "content": "[]"}), 422)
    assert e["param"] == "name"
    listed = [f["path"] for f in board.http.get("/api/files").json()["files"]]
    assert "data/link.json" not in listed and not any("secret" in p for p in listed)
    assert not (tmp_path / "evil.json").exists()


def test_form_is_generated_from_the_config_fields():
    schema = forms.form_schema()
    keys = [f["key"] for f in schema["fields"]]
    assert sorted(keys) == sorted(k.split(".")[-1] for k in valid_keys(TrainConfig))  # every field, no other
    by_key = {f["key"]: f for f in schema["fields"]}
    for f, _, _ in forms.iter_fields():
        assert by_key[f.name]["help"] == f.metadata["help"]
    assert by_key["method"]["kind"] == "choice" and "lora" in by_key["method"]["choices"]
    assert by_key["learning_rate"]["kind"] == "float" and by_key["max_steps"]["kind"] == "int"
    assert by_key["packing"]["kind"] == "bool" and by_key["data"]["kind"] == "list" and by_key["data"]["path"]
    assert all(key in keys for key in forms.PATH_FIELDS) and all(key in keys for key in forms.COMMON)

    @dataclasses.dataclass
    class Lora:
        lora_rank: int = field(8, help="rank")

    @dataclasses.dataclass
    class Grouped:
        model: str = field("default", help="the model")
        lora: Lora = dataclasses.field(default_factory=Lora)

    walked = [(f.name, group) for f, _, group in forms.iter_fields(Grouped)]
    assert walked == [("model", ""), ("lora_rank", "lora")]  # nested groups keep their flat keys

    @dataclasses.dataclass
    class Mixed(Lora):  # a config mixed from group classes
        seed: int = field(0, help="seed")

    assert [(f.name, g) for f, _, g in forms.iter_fields(Mixed)] == [("lora_rank", "lora"), ("seed", "")]
    groups = {f["group"] for f in schema["fields"]}
    mixins = [b for b in TrainConfig.__mro__[1:] if dataclasses.is_dataclass(b)]
    assert (len(groups) >= len(mixins) > 1) or not mixins  # TrainConfig's own groups show in the form


def test_data_tab_uses_the_data_library(board):
    rows = [{"instruction": "hi", "output": "hello"}, {"instruction": "x"}, {"instruction": "2+2", "output": "4"}]
    path = upload_sample(board, "mixed.jsonl", text="\n".join(json.dumps(r) for r in rows) + "\n")
    r = board.post("/api/data/analyse", {"path": path, "model": "models/tiny"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["format"] == "alpaca" and d["counts"]["conversations"] == 2 and d["counts"]["bad_records"] == 1
    bad = d["bad_records"][0]
    assert bad["file"] == "data/mixed.jsonl" and bad["line"] == 2 and bad["field"] == "output"
    trained = "".join(s["text"] for s in d["examples"][0]["spans"] if s["trained"])
    assert "hello" in trained and "hi" not in trained
    assert sum(b["count"] for b in d["histogram"]) == d["counts"]["examples"]
    assert d["licence"]["commercial_use_text"] in ("yes", "no", "unknown")
    r = board.post("/api/data/analyse", {"path": path, "model": "models/tiny", "dataset": "alpaca"})
    assert r.json()["licence"]["commercial_use_text"] == "no"  # CC BY-NC data
    # an upload in an unknown format: a message naming the field, nothing written
    e = error(board.post("/api/upload", {"name": "notes.docx", "content": "x"}), 422)
    assert e["param"] == "name" and not (board.workspace / "data" / "notes.docx").exists()
    weird = upload_sample(board, "weird.json", [{"foo": 1}, {"bar": 2}])
    e = error(board.post("/api/data/analyse", {"path": weird, "model": "models/tiny"}), 422)
    assert e["param"] == "path" and "/" not in e["message"].split("weird.json")[0].replace("data/", "")


def test_start_stop_resume_queue_and_restart(board):
    data = upload_sample(board)
    long_run = {"model": "models/tiny", "data": [data], "output_dir": "runs/long", "max_steps": 1000, **SLOW_STEPS}
    plan = board.post("/api/train/plan", {"config": long_run}).json()
    assert "max_steps: 1000" in plan["yaml"] and plan["command"] == "finechat train runs/long/board_train.yaml"
    est = board.post("/api/train/estimate", {"config": long_run})
    assert est.status_code == 200 and "estimated peak" in est.json()["table"]
    first = board.post("/api/train/start", {"config": long_run})
    assert first.status_code == 200, first.text
    # the same output folder twice: refused naming the field, the first run untouched
    e = error(board.post("/api/train/start", {"config": long_run}), 409)
    assert e["param"] == "output_dir" and "runs/long" in e["message"]
    short = {**long_run, "output_dir": "runs/short", "max_steps": 2}
    queued = board.post("/api/train/start", {"config": short}).json()
    assert queued["state"] == "queued"  # one run at a time: it waits for the first
    job = board.wait("runs/long", lambda j: len(j["checkpoints"]) >= 1 and len(j["points"]["train"]) >= 1)
    assert job["state"] == "running" and job["progress"]["total"] == 1000

    # the board restarts: the runs are found again from their folders, still running / queued
    board.stop()
    board.start()
    assert board.job("runs/long")["state"] == "running" and board.job("runs/short")["state"] == "queued"

    stopped = board.post("/api/jobs/stop", {"run": "runs/long"}).json()
    assert stopped["state"] == "stopped"
    done = board.wait("runs/short", lambda j: j["state"] in ("finished", "failed"))
    assert done["state"] == "finished", done["log"]
    assert done["results"]["global_step"] == 2 and done["checkpoints"][-1] == "runs/short/checkpoint-2"
    e = error(board.post("/api/jobs/stop", {"run": "runs/short"}), 409)  # a stop on a finished run
    assert e["param"] == "run" and "finished" in e["message"]
    e = error(board.post("/api/jobs/resume", {"run": "runs/short"}), 409)
    assert e["param"] == "run"

    step_before = int(Path(board.job("runs/long")["checkpoints"][-1]).name.split("-")[1])
    resumed = board.post("/api/jobs/resume", {"run": "runs/long"}).json()
    assert resumed["attempt"] == 2 and resumed["argv"][-1] == "resume_from_checkpoint=auto"
    job = board.wait("runs/long", lambda j: j["state"] != "queued" and j["points"]["train"]
                     and j["points"]["train"][-1][0] > step_before + 1)
    assert "resum" in job["log"].lower() or job["attempt"] == 2
    assert [p[0] for p in job["points"]["train"]] == sorted({p[0] for p in job["points"]["train"]})
    board.post("/api/jobs/stop", {"run": "runs/long"})


def test_bad_input_is_a_4xx_naming_the_field(board):
    data = upload_sample(board)
    base = {"model": "models/tiny", "data": [data], "output_dir": "runs/bad"}
    cases = [({**base, "learning_rate": -1}, "learning_rate"), ({**base, "max_steps": "many"}, "max_steps"),
             ({**base, "method": "magic"}, "method"), ({**base, "no_such_key": 1}, "no_such_key"),
             ({**base, "data": ["data/missing.json"]}, "data"), ({**base, "output_dir": ""}, "output_dir")]
    for config, param in cases:
        e = error(board.post("/api/train/start", {"config": config}), 422)
        assert e["param"] == param, (param, e)
    assert not (board.workspace / "runs" / "bad").exists()  # nothing half-written
    assert error(board.post("/api/train/start", {"config": "x"}), 422)["param"] == "config"
    r = board.http.post("/api/train/start", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = board.http.post("/api/upload", content=b"name=x", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415  # the server's content-type guard is on every route
    r = board.http.get("/api/jobs", headers={"host": "evil.example"})
    assert r.status_code == 421
    e = error(board.post("/api/export/start", {"name": "e1", "to": "zip"}), 422)
    assert e["param"] == "to"
    e = error(board.post("/api/eval/start", {"name": "e/1", "data": data}), 422)
    assert e["param"] == "name"
    e = error(board.post("/api/eval/start", {"name": "e2", "data": data, "max_samples": -3}), 422)
    assert e["param"] == "max_samples"
    e = error(board.post("/api/jobs/stop", {"run": "runs/none"}), 404)
    assert e["param"] == "run"
    e = error(board.post("/chat/v1/chat/completions", {"messages": []}), 409)  # no chat model loaded
    assert e["param"] == "model"
    junk = board.workspace / "runs" / "junk"
    junk.mkdir()
    (junk / "board_job.json").write_text('{"cut sho', encoding="utf-8")  # a job file cut short
    assert board.http.get("/api/jobs").status_code == 200
    assert 400 <= board.http.get("/api/job", params={"id": "runs/junk"}).status_code < 500
    e = error(board.post("/api/train/estimate", {"config": {**base, "model": "data"}}), 422)  # no model there
    assert e["param"] == "model"


def test_api_key_guards_every_api_route(tmp_path, tiny_model_dir):
    b = Board(tmp_path, api_key="s3cret", model_dir=tiny_model_dir)
    try:
        assert b.http.get("/api/jobs").status_code == 200
        anonymous = {"Authorization": ""}
        for method, path in [("GET", "/api/jobs"), ("GET", "/api/info"), ("GET", "/api/files"),
                             ("POST", "/api/upload"), ("POST", "/api/train/start"), ("POST", "/chat/v1/models")]:
            r = b.http.request(method, path, headers=anonymous, json={} if method == "POST" else None)
            assert r.status_code == 401, (path, r.text)
        assert b.http.get("/", headers=anonymous).status_code == 200  # the page itself asks for the key
    finally:
        b.stop()


def test_a_crashing_run_fails_alone(board):
    """A run whose process dies (here: data it cannot read) is 'failed' with its error; the board answers on."""
    data = upload_sample(board, "broken.json", [{"foo": 1}])
    r = board.post("/api/train/start", {"config": {"model": "models/tiny", "data": [data], "output_dir": "runs/crash",
                                                  "max_steps": 2}})
    assert r.status_code == 200, r.text
    job = board.wait("runs/crash", lambda j: j["state"] in ("finished", "failed"), timeout=180)
    assert job["state"] == "failed" and job["returncode"] not in (0, None)
    assert "broken.json" in job["log"]  # the run's own one-line error, file named
    assert board.http.get("/health").status_code == 200
    resumed = board.post("/api/jobs/resume", {"run": "runs/crash"})
    assert resumed.status_code == 200 and resumed.json()["attempt"] == 2  # a failed run may be resumed
    board.wait("runs/crash", lambda j: j["state"] == "failed", timeout=180)


def test_finechat_board_command(tmp_path, capsys):
    """`finechat board` binds 127.0.0.1, makes its workspace, serves the page; the docs' flags exist."""
    import re

    import httpx
    from serve_helpers import start_cli_server

    from finechat.cli import main

    with pytest.raises(SystemExit):
        main(["board", "--help"])
    helptext = capsys.readouterr().out
    docs = (Path(__file__).parents[1] / "docs" / "board.md").read_text(encoding="utf-8")
    commands = re.findall(r"^finechat board[^\n]*", docs, flags=re.M)
    assert commands
    for flag in re.findall(r"(--[a-z-]+)", " ".join(commands)):
        assert flag in helptext, flag
    env = {**os.environ, "FINECHAT_HOME": str(tmp_path / "home")}
    process, url = start_cli_server(["board", "--port", "0"], r"open (http://127\.0\.0\.1:\d+)/", env)
    try:
        page = httpx.get(url + "/", timeout=10)
        assert page.status_code == 200 and "finechat board" in page.text
        assert "frame-ancestors 'self'" in page.headers["content-security-policy"]
        assert (tmp_path / "home" / "board" / "runs").is_dir()  # $FINECHAT_HOME/board when FINECHAT_HOME is set
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode in (0, -15)
