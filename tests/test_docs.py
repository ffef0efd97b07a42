"""The README and the pages under docs/ cannot go stale: every ``finechat ...`` command they show is parsed
by the real command-line parser, the cheap ones run for real, and the README's command blocks, run in order,
never write into the same output folder twice."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from pathlib import Path

import pytest

from finechat import cli
from finechat.config import config_from_args, load_yaml
from finechat.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^([ \t]*)```([a-z]*)\n(.*?)^\1```", re.S | re.M)
SHELL = {"bash", "sh", "shell", "console"}
INLINE = re.compile(r"(?<!`)`(finechat [^`]+)`(?!`)")


def fenced_commands(text: str) -> list[list[str]]:
    """The ``finechat`` command lines of a page's shell blocks, as argv lists (``finechat`` itself dropped)."""
    commands = []
    for m in FENCE.finditer(text):
        if m.group(2) not in SHELL:
            continue
        body = re.sub(r"\\\n\s*", " ", m.group(3))  # join continued lines
        for line in body.splitlines():
            words = shlex.split(line, comments=True)
            # `printf ... | finechat chat`, `torchrun ... -m finechat train ...`, `/usr/bin/time finechat ...`
            for start, word in enumerate(words):
                if word == "finechat" and (start == 0 or words[start - 1] in ("|", "-m", "/usr/bin/time")):
                    argv = words[start + 1:]
                    commands.append([w for w in argv if w != "&"])
                    break
    return commands


def inline_commands(text: str) -> list[list[str]]:
    """``finechat ...`` mentioned in running text (synopses with ``[``, ``|`` or ``...`` are left out)."""
    prose = FENCE.sub("", text)
    return [shlex.split(m.group(1))[1:] for m in INLINE.finditer(prose)
            if not re.search(r" \[|\||\.\.\.", m.group(1))]


def all_commands(kind) -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for argv in kind(page.read_text(encoding="utf-8")):
            found.append((f"{page.relative_to(ROOT)}: finechat {shlex.join(argv)}", argv))
    return found


FENCED = all_commands(fenced_commands)
INLINED = all_commands(inline_commands)


def test_the_pages_show_commands():
    # a broken extractor would make every test below pass vacuously
    assert len(FENCED) > 60 and len(INLINED) > 20
    readme = fenced_commands(README.read_text(encoding="utf-8"))
    assert {argv[0] for argv in readme if argv} >= {"chat", "serve", "export", "data", "train", "eval"}


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser that reads the options of ``argv``: the command's, or its action's (``data preview``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in argv:
                if word in action.choices:
                    return _subparser(action.choices[word], argv[argv.index(word) + 1:])
    return parser


@pytest.mark.parametrize("where,argv", FENCED, ids=[w for w, _ in FENCED])
def test_every_command_in_a_code_block_parses(where, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes are named relative to the repository root
    try:
        cli.parse_args(argv)
        if argv[0] == "train" and "--help" not in argv:
            output_folder(argv)  # builds the TrainConfig: every key=value and recipe key must be a real setting
    except SystemExit as e:
        if e.code != 0:  # `--help` exits 0
            pytest.fail(f"{where}: the parser refuses it (exit {e.code})")


@pytest.mark.parametrize("where,argv", INLINED, ids=[w for w, _ in INLINED])
def test_every_command_in_the_text_names_a_real_command_and_flags(where, argv):
    assert argv and (argv[0] in cli._command_names() or argv[0].startswith("-")), f"{where}: no such command"
    parser = _subparser(cli.build_parser(argv[0]), argv)
    known = {s for a in parser._actions for s in a.option_strings}
    unknown = [w.split("=")[0] for w in argv if w.startswith("-") and w.split("=")[0] not in known]
    assert not unknown, f"{where}: unknown options {unknown}"


# Commands that need no model and run in seconds: they run for real, in a scratch folder that sees the samples.
CHEAP = [(w, a) for w, a in FENCED
         if a[:1] == ["--help"] or a[-1:] == ["--help"]
         or (a[:1] == ["data"] and a[1:2] and a[1] in ("convert", "licenses", "licences", "generate", "pairs", "from-kg"))]


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    for name in ("data", "recipes"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("where,argv", CHEAP, ids=[w for w, _ in CHEAP])
def test_cheap_commands_run(where, argv, scratch, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # --help
        code = e.code
    assert code == 0, f"{where}: exit {code}\n{capsys.readouterr().err}"
    assert capsys.readouterr().out.strip(), f"{where}: printed nothing"


def test_some_commands_run_for_real():
    assert any(a[:2] == ["data", "convert"] for _, a in CHEAP)
    assert any(a[:2] == ["data", "licenses"] for _, a in CHEAP)
    assert any(a == ["--help"] for _, a in CHEAP)


MODEL_DATA = [(w, a) for w, a in FENCED if a[:2] in (["data", "preview"], ["data", "stats"])
              and "--model" not in a]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FINECHAT_FAST_TESTS") == "1", reason="FINECHAT_FAST_TESTS=1")
@pytest.mark.parametrize("where,argv", MODEL_DATA, ids=[w for w, _ in MODEL_DATA])
def test_data_commands_with_the_default_tokenizer_run(where, argv, scratch, capsys):
    assert cli.main(argv) == 0, f"{where}: {capsys.readouterr().err}"


def output_folder(argv: list[str]) -> str | None:
    """The folder (or file) a command writes, read from its parsed arguments (None: it writes nothing)."""
    if "--help" in argv:
        return None
    _, args = cli.parse_args(argv)
    command = argv[0]
    if command == "train":
        from finechat.train.stages import is_stages_file
        from finechat.train.train_config import TrainConfig

        overrides = list(args.overrides or [])
        if overrides and "=" not in overrides[0]:
            args.config = overrides.pop(0)
        args.overrides = overrides
        if args.config and is_stages_file(args.config):
            return str(dict(o.split("=", 1) for o in overrides).get("output_dir") or load_yaml(args.config)["output_dir"])
        return config_from_args(TrainConfig, args).output_dir
    if command == "quickstart":
        from finechat.commands.quickstart import TASKS

        return args.output_dir or TASKS[args.task]["output_dir"]  # each task has its own default folder
    if command in ("export", "quantize"):
        out = Path(args.out)
        return str(out.parent if out.suffix == ".gguf" else out)
    if argv[:2] == ["data", "stats"]:
        return args.png or f"output/data-stats/{Path(args.input[0]).stem}_lengths.png"  # the histogram file
    if command == "eval" and not getattr(args, "predictions", None) and not getattr(args, "reward_model", None):
        adapter = getattr(args, "adapter", None)  # flags of config dataclasses are absent unless typed
        return getattr(args, "output_dir", None) or (f"{adapter}/eval" if adapter else "output/eval")
    if command == "medical" and argv[1:2] == ["run"]:
        return load_yaml(args.recipe)["output_dir"]
    return None


def test_readme_blocks_write_to_their_own_folders(monkeypatch):
    monkeypatch.chdir(ROOT)
    readme = fenced_commands(README.read_text(encoding="utf-8"))
    folders = {}
    for argv in [["quickstart"]] + readme:  # `make demo` runs `finechat quickstart` first
        folder = output_folder(argv)
        if folder is None:
            continue
        folder = os.path.normpath(folder)
        assert folder not in folders, f"finechat {shlex.join(argv)} writes into {folder}, as {folders[folder]} does"
        folders[folder] = f"finechat {shlex.join(argv)}"
        assert folder.startswith("output" + os.sep), f"{folder}: examples write under output/ (ignored by git)"
    assert len(folders) >= 6


def test_two_commands_into_one_folder_are_caught(monkeypatch):
    monkeypatch.chdir(ROOT)
    dpo = output_folder(["train", "stage=dpo", "data=[data/samples/preference_prompt.jsonl]"])
    rm = output_folder(["train", "stage=rm", "data=[data/samples/preference_alpaca.json]"])
    assert dpo == rm  # the README used to show these two, and the second refused to start
    assert output_folder(["train", "recipes/adgen-lora.yaml", "output_dir=output/x"]) == "output/x"
    assert output_folder(["train", "recipes/adgen-lora.yaml"]) == "output/adgen-lora"
    with pytest.raises(ConfigError, match="lora_rnk"):  # a stale key on a page fails its test
        output_folder(["train", "recipes/adgen-lora.yaml", "lora_rnk=8"])
    with pytest.raises(ConfigError, match="stage"):
        output_folder(["train", "stage=ppo"])


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for page in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / page).is_file(), page
    topics = ["chatglm", "data", "fine-tuning", "alignment", "evaluation", "export", "quantization", "serving",
              "tools", "medical", "architecture", "results/index"]
    for topic in topics:
        assert f"(docs/{topic}.md)" in text, topic


def test_example_output_folders_are_ignored_by_git():
    ignored = set((ROOT / ".gitignore").read_text(encoding="utf-8").split())
    assert {"output/", "site/"} <= ignored


def test_files_named_in_the_pages_exist():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for path in set(re.findall(r"(?<![\w/])((?:tests|benchmarks|recipes)/[\w./-]+\.(?:py|yaml))", text)):
            assert (ROOT / path).is_file(), f"{page.relative_to(ROOT)}: {path} does not exist"
        for module in set(re.findall(r"`(finechat(?:\.[a-z_0-9]+)+)", text)):
            parts = module.split(".")
            # the longest prefix that is a package or module; the rest may name a function or class
            found = any((ROOT / "src" / Path(*parts[:n])).with_suffix(".py").is_file()
                        or (ROOT / "src" / Path(*parts[:n]) / "__init__.py").is_file()
                        for n in range(len(parts), 1, -1))
            assert found or module == "finechat.load", f"{page.relative_to(ROOT)}: {module} does not exist"
