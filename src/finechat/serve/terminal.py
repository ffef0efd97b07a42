"""The terminal chat (``finechat chat``), ChatGLM-6B's cli_demo for any model.

Interactive (stdin is a terminal): answers stream as they are generated; ``clear`` resets the history,
``stop`` or ``exit`` quits, Ctrl-C stops the current answer and keeps the session, Ctrl-D quits.
Scripted (stdin is a pipe or file): one query per line, one answer per line on stdout, exit at end of input.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

CLEAR_WORDS = {"clear"}
EXIT_WORDS = {"stop", "exit", "quit"}


def run_terminal_chat(bot: Any, generation: dict, system: str | None = None, stdin: TextIO | None = None,
                      stdout: TextIO | None = None, interactive: bool | None = None,
                      notice: str | None = None) -> int:
    """Run the chat loop over ``bot.stream_chat``; returns an exit code."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if interactive is None:
        interactive = stdin.isatty()
    history: list = []
    if interactive:
        print("finechat: type a message; 'clear' resets the history, 'exit' quits; Ctrl-C stops an answer.",
              file=stdout)
        if notice:
            print(notice, file=stdout)
    while True:
        try:
            if interactive:
                stdout.write("\nYou: ")
                stdout.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            stdout.write("\n")
            continue
        if line == "":  # end of input (Ctrl-D)
            if interactive:
                stdout.write("\n")
            return 0
        query = line.strip()
        if not query:
            continue
        if query.lower() in EXIT_WORDS:
            return 0
        if query.lower() in CLEAR_WORDS:
            history = []
            if interactive:
                stdout.write("\033[2J\033[H(history cleared)\n")
            continue
        if interactive:
            stdout.write("\nAssistant: ")
            stdout.flush()
        shown = ""
        response = ""
        stream = bot.stream_chat(query, history, system=system, **generation)
        try:
            for response, new_history in stream:
                if response.startswith(shown):
                    stdout.write(response[len(shown):])
                else:  # the template's clean-up rewrote earlier text: reprint the line
                    stdout.write("\r" + response)
                stdout.flush()
                shown = response
            history = history + [(query, response)]
        except KeyboardInterrupt:
            stream.close()
            stdout.write(" [stopped]")
            history = history + [(query, shown)]
        if notice and not interactive:
            stdout.write(f"\n{notice}")
        stdout.write("\n")
        stdout.flush()
