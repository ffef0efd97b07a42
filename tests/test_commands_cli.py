import subprocess
import sys

import pytest

from finechat.cli import COMMANDS_DIR, main


def test_help_lists_every_subcommand_with_its_help_line():
    out = subprocess.run([sys.executable, "-m", "finechat", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("    ") and line.strip()
              and not line.startswith("     ")}
    expected = {p.stem.replace("_", "-") for p in COMMANDS_DIR.glob("*.py") if not p.stem.startswith("_")}
    assert {"chat", "serve", "train", "eval", "data"} <= expected
    assert listed == expected
    assert "Chat with a model in the terminal" in out.stdout  # chat's docstring is its help line


def test_unknown_command_is_a_clear_error(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_unknown_flag_is_an_error():
    with pytest.raises(SystemExit) as e:
        main(["chat", "--no-such-flag"])
    assert e.value.code == 2


def test_unknown_config_key_lists_valid_keys(capsys):
    assert main(["chat", "not_a_key=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'not_a_key'" in err and "max_new_tokens" in err


def test_missing_model_path_is_one_line(capsys, tmp_path):
    assert main(["chat", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("finechat chat: error: model path not found")
    assert "Traceback" not in "\n".join(err)


def test_folder_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    assert main(["chat", "--model", str(tmp_path)]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err


def test_piped_chat_answers_each_line(tiny_model_dir):
    out = subprocess.run(
        [sys.executable, "-m", "finechat", "chat", "--model", str(tiny_model_dir), "--greedy",
         "--max-new-tokens", "5"],
        input="hello\nclear\nwhat?\n", capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # two queries -> two answer lines ('clear' is a command, not a query)
    assert len(out.stdout.splitlines()) == 2


def test_model_commands_choose_threads_the_same_way_on_a_busy_cpu(monkeypatch, capsys):
    import importlib
    import os

    import torch

    from finechat.cli import main as cli_main
    from finechat.models import device

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    before = torch.get_num_threads()
    seen = {}
    extra = {"medical": ["eval"], "export": ["--out", "x"], "quantize": ["--bits", "8", "--out", "x"]}
    commands = ["chat", "serve", "web", "eval", "train", "quickstart", "medical", "export", "quantize"]
    for name in commands:
        module = importlib.import_module(f"finechat.commands.{name}")
        monkeypatch.setattr(module, "main", lambda args, name=name: seen.setdefault(name, torch.get_num_threads()) * 0)
        assert cli_main([name, *extra.get(name, [])]) == 0
    assert seen == {name: 1 for name in commands}
    assert torch.get_num_threads() == before  # the caller's count is restored
    # no model loaded: nothing said (bad input found before a model loads stays a one-line error)
    assert "The CPU is busy" not in capsys.readouterr().err

    def loads_two_models(args):  # each model load says the choice; the command says it once
        device.say_thread_choice()
        device.say_thread_choice()
        return 0

    monkeypatch.setattr(importlib.import_module("finechat.commands.chat"), "main", loads_two_models)
    assert cli_main(["chat"]) == 0 and cli_main(["chat"]) == 0
    err = capsys.readouterr().err
    assert err.count("The CPU is busy (load average 50.0 on 2 cores): using one thread") == 2  # once per command
    device.say_thread_choice()  # outside a command: nothing chosen, nothing said
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(importlib.import_module("finechat.commands.chat"), "main",
                        lambda args: seen.setdefault("chat", torch.get_num_threads()) * 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice wins
    seen.clear()
    assert cli_main(["chat"]) == 0 and seen == {"chat": before}
