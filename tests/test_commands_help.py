"""Every subcommand that ``finechat --help`` lists is a command that answers ``--help``, and ``finechat train
--help`` answers without importing torch and names the training stages."""

from __future__ import annotations

import dataclasses
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


def test_every_listed_command_answers_help():
    names = listed_commands()
    assert names == list(cli._command_names()) and "train" in names and "chat" in names
    # one process per command, side by side: each really starts `finechat NAME --help` from scratch
    procs = {name: subprocess.Popen([sys.executable, "-m", "finechat", name, "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name in names}
    failed = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0 or f"usage: finechat {name}" not in out:
            failed[name] = (proc.returncode, err.strip().splitlines()[-1:] if err.strip() else "")
    assert not failed, failed


def test_a_helper_module_is_not_a_command():
    assert "options" not in listed_commands()
    result = finechat("options", "--help")
    assert result.returncode == 2 and "unknown command 'options'" in result.stderr


HEAVY = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
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
