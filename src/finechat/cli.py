"""The ``finechat`` command: one subcommand per module in ``finechat.commands``.

Each module ``finechat/commands/<name>.py`` is one subcommand: its docstring's first line is the help text,
``add_arguments(parser)`` declares its flags and ``main(args) -> int`` runs it. Modules are imported only when
their subcommand runs, so ``finechat --help`` stays fast and a heavy optional dependency never breaks the
others.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import pkgutil
import sys
from pathlib import Path

from finechat.errors import FinechatError

COMMANDS_DIR = Path(__file__).parent / "commands"


def _command_names() -> dict[str, str]:
    """Map subcommand name -> first docstring line, read without importing the modules."""
    names = {}
    for info in sorted(pkgutil.iter_modules([str(COMMANDS_DIR)]), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        source = (COMMANDS_DIR / f"{info.name}.py").read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(source)) or ""
        names[info.name.replace("_", "-")] = doc.strip().splitlines()[0] if doc.strip() else ""
    return names


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finechat",
        description="Fine-tune and deploy ChatGPT-like open LLMs.",
        epilog="Run 'finechat COMMAND --help' for a command's options.",
    )
    from finechat import __version__

    parser.add_argument("--version", action="version", version=f"finechat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in _command_names().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(f"finechat.commands.{name.replace('-', '_')}")
            module.add_arguments(p)
            p.set_defaults(_main=module.main)
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parse a command line as ``finechat`` does (argparse errors exit with code 2); nothing is run."""
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting positional key=value overrides at the first flag; accept them after flags too
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
        "=" in e and not e.startswith("-") for e in extra
    ):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return parser, args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = _command_names()
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in names:
        print(
            f"finechat: error: unknown command {command!r}; choose from: {', '.join(names)}",
            file=sys.stderr,
        )
        return 2
    parser, args = parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        code = args._main(args)
    except FinechatError as e:
        print(f"finechat {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
