"""Start the web chat page (the same server as ``finechat serve``) and print its address."""

from __future__ import annotations

import argparse

from finechat.commands import serve

RUNS_MODEL = True  # runs under models.device.cpu_threads (see finechat.cli)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    serve.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return serve.main(args, announce_page=True)
