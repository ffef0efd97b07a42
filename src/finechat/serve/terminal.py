"""The terminal chat (``finechat chat``), ChatGLM-6B's cli_demo for any model.

Interactive (stdin is a terminal): answers stream as they are generated; ``clear`` resets the history,
``stop`` or ``exit`` quits, Ctrl-C stops the current answer and keeps the session, Ctrl-D quits.
Scripted (stdin is a pipe or file): one query per line, one answer per line on stdout, exit at end of input.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

from finechat.generate.contract import ChatEngine
from finechat.tools.agent import Agent

CLEAR_WORDS = {"clear"}
EXIT_WORDS = {"stop", "exit", "quit"}


def run_terminal_chat(bot: ChatEngine, generation: dict, system: str | None = None, stdin: TextIO | None = None,
                      stdout: TextIO | None = None, interactive: bool | None = None,
                      notice: str | None = None, agent: Agent | None = None) -> int:
    """Run the chat loop over ``bot.stream_chat`` (or a tool ``agent``'s events); returns an exit code."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if interactive is None:
        interactive = stdin.isatty()
    history: list = []
    if interactive and threading.current_thread() is threading.main_thread():
        # A parent that ignores SIGINT (nohup, some launchers and test runners) passes that on; the chat's
        # Ctrl-C must stop the current answer, so take the default handler back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
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
        stream = bot.stream_chat(query, history, system=system, **generation) if agent is None else \
            _with_tools(agent, query, history, system, generation, stdout)
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


def _with_tools(agent: Agent, query: str, history: list, system: str | None, generation: dict,
                stdout: TextIO) -> Iterator[tuple[str, list]]:
    """``stream_chat``'s (response, history) pairs from a tool agent, printing each call and result as it runs."""
    response = ""
    thinking = False
    for event in agent.stream_events(query, history, system=system, **generation):
        if event.kind == "thought":
            stdout.write(("" if thinking else "\n[thinking] ") + event.text)
            thinking = True
        elif event.kind == "tool_call":
            stdout.write(f"\n[tool] {event.text}\n")
        elif event.kind == "tool_result":
            stdout.write("=> " + event.text.replace("\n", "\n   ") + "\n")
        elif event.kind == "text":
            if thinking:
                stdout.write("\n")
                thinking = False
            response += event.text
        else:
            continue
        stdout.flush()
        yield response, history + [(query, response)]
