"""Every subcommand that ``finechat --help`` lists is a command that answers ``--help``, and ``finechat train
--help`` answers without importing torch and names the training stages."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from typing import Literal

from finechat import cli
from finechat.commands.train import field_choices
from finechat.train.train_config import TrainConfig


def finechat(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finechat", *argv], capture_output=True, text=True, timeout=timeout)


def listed_commands() -> list[str]:
    """The subcommands as `finechat --help` prints them (the lines under COMMAND, indented by four spaces)."""
    out = finechat("--help").stdout
    block = out.split("  COMMAND\n", 1)[1].split("\noptions:")[0]
    return re.findall(r"^    (\S+)", block, re.M)


HEAVY = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
# One process imports the heavy third-party libraries once and then forks a child per command, all side by side:
# each child runs `finechat NAME --help` with none of finechat's modules imported yet, as a fresh `finechat NAME
# --help` would, without paying the libraries' import (seconds, the same for every command) once per command.
FORKED_HELP = """
import importlib, json, os, sys, tempfile
for module in {heavy!r}:
    importlib.import_module(module)
assert not [m for m in sys.modules if m.split(".")[0] == "finechat"], "finechat imported before the fork"
folder = tempfile.mkdtemp()
children = {{}}
for name in {names!r}:
    paths = (os.path.join(folder, name + ".out"), os.path.join(folder, name + ".err"))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path in zip((1, 2), paths):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            from finechat.cli import main
            code = main([name, "--help"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)
    children[name] = (pid, paths)
results = {{}}
for name, (pid, paths) in children.items():
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    results[name] = [code, *(open(path, encoding="utf-8", errors="replace").read() for path in paths)]
print("RESULTS", json.dumps(results))
"""


def test_every_listed_command_answers_help():
    names = listed_commands()
    assert names == list(cli._command_names()) and "train" in names and "chat" in names
    run = subprocess.run([sys.executable, "-c", FORKED_HELP.format(heavy=HEAVY, names=names)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.rpartition("RESULTS ")[2])
    assert sorted(results) == sorted(names)
    failed = {}
    for name, (code, out, err) in results.items():
        if code != 0 or f"usage: finechat {name}" not in out:
            failed[name] = (code, err.strip().splitlines()[-1:] if err.strip() else "")
    assert not failed, failed


def test_a_helper_module_is_not_a_command():
    assert "options" not in listed_commands()
    result = finechat("options", "--help")
    assert result.returncode == 2 and "unknown command 'options'" in result.stderr


PROBE = (
    "import sys\nfrom finechat.cli import main\n"
    "try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
    f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
)


def heavy_modules_after_help(command: str) -> tuple[str, str]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(command=command)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    help_text, _, last = result.stdout.rstrip().rpartition("\n")
    assert last.startswith("HEAVY ")
    return help_text, last.removeprefix("HEAVY ")


def test_train_help_imports_nothing_heavy_and_names_the_stages():
    help_text, heavy = heavy_modules_after_help("train")
    assert heavy == "[]", f"finechat train --help imported {heavy}"
    stages = field_choices(TrainConfig, "stage")
    assert set(stages) >= {"pretrain", "sft", "rm", "dpo", "kto", "orpo", "simpo", "grpo"}
    description = help_text.split("positional arguments")[0]
    for stage in stages:
        assert re.search(rf"\b{stage}\b", description), f"{stage} is not named in the help's description"


def test_the_import_probe_sees_torch_where_a_command_needs_it():
    # the probe above can fail: `chat` builds its parser from modules that need torch
    _, heavy = heavy_modules_after_help("chat")
    assert "torch" in heavy


@dataclasses.dataclass
class _Method:
    stage: Literal["a", "b"] = "a"


@dataclasses.dataclass
class _Grouped:
    method: _Method = dataclasses.field(default_factory=_Method)
    name: str = "x"


def test_field_choices_reads_nested_groups():
    # TrainConfig may be composed of groups: the stage field is found inside them
    assert field_choices(_Grouped, "stage") == ("a", "b")
    assert field_choices(_Grouped, "name") == ()
