"""The house rule (docs/architecture.md), read from the code with grimp: no cycles, no big modules."""

from __future__ import annotations

import re
from pathlib import Path

import grimp
import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "finechat"
MAX_LINES = 600


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("finechat", include_external_packages=False)


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_module_import_cycles(graph):
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    class Graph:
        modules = {"a", "b", "c"}

        @staticmethod
        def find_modules_directly_imported_by(name):
            return {"a": {"b"}, "b": {"a"}, "c": {"a"}}[name]

    assert _cycles(Graph()) == [["a", "b"]]


def test_no_two_top_level_packages_import_each_other(graph):
    top = sorted(m for m in graph.modules if m.count(".") == 1)
    pairs = []
    for i, a in enumerate(top):
        for b in top[i + 1:]:
            if graph.direct_import_exists(
                    importer=b, imported=a, as_packages=True) and graph.direct_import_exists(
                    importer=a, imported=b, as_packages=True):
                pairs.append((a, b))
    assert pairs == []


def test_library_code_never_imports_the_package_root(graph):
    """``finechat.load`` is for users; inside the package, importing the root closes a cycle."""
    importers = {m for m in graph.find_modules_that_directly_import("finechat") if m not in ("finechat.cli",)}
    assert sorted(importers) == []


def test_no_module_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


STAGE_TEST = re.compile(r"stage (==|!=|in|not in) ")  # `cfg.stage == "rm"`, `stage in (...)`, ...


def test_the_stage_is_asked_of_its_record_not_tested_by_name():
    found = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if STAGE_TEST.search(line)]
    assert len(found) <= 5, found  # finechat.train.stage_table holds what differs between stages


def test_the_stage_pattern_finds_a_string_test():
    assert STAGE_TEST.search('    if cfg.stage == "grpo":') and STAGE_TEST.search("if stage not in PAIRS:")
    assert not STAGE_TEST.search("stage = get_stage(cfg.stage)")
