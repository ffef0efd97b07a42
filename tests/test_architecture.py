"""The house rule (docs/architecture.md), read from the code with grimp: no cycles, no big modules."""

from __future__ import annotations

import ast
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


# -- one name, one room ------------------------------------------------------------------------------------
def _library_modules() -> list[Path]:
    """Library modules: every module but the package markers and ``commands/`` (named after subcommands)."""
    return sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" and p.name != "__main__.py"
                  and "commands" not in p.relative_to(SRC).parts[:-1])


def _one_edit_apart(a: str, b: str) -> bool:
    """Equal, or one letter inserted, removed or changed (Levenshtein distance <= 1)."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) <= 1
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def _name_clashes(names: list[str]) -> list[tuple[str, str]]:
    """Pairs of module names that a reader could mistake for one another."""
    clashes = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if _one_edit_apart(a, b) or a.replace("_", "") == b.replace("_", ""):
                clashes.append((a, b))
    return clashes


def test_no_two_library_modules_share_a_name_or_differ_by_one_letter():
    modules = _library_modules()
    stems = [p.stem for p in modules]
    where = {stem: [str(p.relative_to(SRC)) for p in modules if p.stem == stem] for stem in stems}
    assert {stem: paths for stem, paths in where.items() if len(paths) > 1} == {}
    assert _name_clashes(sorted(set(stems))) == []


def test_name_clash_finder_finds_near_twins():
    assert _name_clashes(["fast_decoder", "fast_decoders", "load", "loading", "quantize", "quantization"]) == [
        ("fast_decoder", "fast_decoders")]
    assert _name_clashes(["reward", "rewards", "gguf_export", "ggufexport", "export"]) == [
        ("reward", "rewards"), ("gguf_export", "ggufexport")]


# -- the engine contract ---------------------------------------------------------------------------------
def _source_lines() -> list[tuple[str, int, str]]:
    return [(str(p.relative_to(SRC)), n, line) for p in sorted(SRC.rglob("*.py"))
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)]


def test_no_private_engine_lock_outside_the_engine():
    """The engine's lock is public (``engine.lock``): nothing reaches into an object's ``_lock``."""
    assert [(f, n) for f, n, line in _source_lines() if "._lock" in line] == []


def _imported_names(module: str) -> list[tuple[str, str]]:
    """(importing file, name) for every ``from <module> import name`` in the package."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == module:
                found += [(str(path.relative_to(SRC)), alias.name) for alias in node.names]
    return found


def test_log_lives_in_console_not_in_model_loading():
    for module in ("finechat.models.resolve", "finechat.models.load"):
        assert [(f, name) for f, name in _imported_names(module) if name == "log"] == []
    assert ("generate/llamacpp.py", "log") in _imported_names("finechat.console")  # the finder reads imports


# -- every output through finechat.files -----------------------------------------------------------------
WRITES = re.compile(r"\.write_text\(|\.write_bytes\(|\bopen\(.*[\"'][wax]b?\+?[\"']|\.open\([\"'][wax]|"
                    r"mode=[\"'][wax]|\bos\.(replace|rename)\(")

# (module, text of the line): why it does not write an output (keep this short; each entry needs a reason)
NOT_OUTPUTS = {
    ("models/resolve.py", 'with open(path, "w") as fh:'): "a lock file held with flock; its content is never read",
    ("models/int4_kernel.py", "source.write_text(SOURCE)"): "the C source handed to the compiler, in a temporary "
                                                             "folder that is deleted",
    ("models/int4_kernel.py", "os.replace(built, target)"): "the compiler writes the kernel by name; it is renamed "
                                                             "into the kernel cache atomically",
    ("train/trainer_setup.py", 'with open(out / LOG_FILE, "a", encoding="utf-8") as fh:'): "the training log grows one "
        "line per logged step (an append: a crash keeps every line before it)",
    ("data/token_cache.py", 'return open(path, "ab")'): "appends tokens to an array file inside a "
        "finechat.files.staged_folder, published atomically when the cache entry is complete",
    ("train/checkpoints.py", "os.replace(p, doomed)"): "moves an old checkpoint out of the way before deleting it",
    ("commands/_bench_report.py", 'Path("/proc/self/clear_refs").write_text("5")'): "a kernel control file (resets "
        "the peak-memory counter), not an output",
    ("serve/board/chat_server.py", 'log = open(self.ws.root / CHAT_LOG, "w", encoding="utf-8")'): "the chat server "
        "child's stdout/stderr, a live log the board shows, not a result",
    ("serve/board/runner.py", 'with open(folder / LOG_FILE, "a", encoding="utf-8") as log:'): "a board job's live "
        "console log, appended as the child prints (a crash keeps every line before it)",
}


def _bare_writes(lines: list[tuple[str, int, str]]) -> list[str]:
    return [f"{f}:{n}: {line.strip()}" for f, n, line in lines
            if f != "files.py" and WRITES.search(line.split("#", 1)[0]) and (f, line.strip().split("  #")[0])
            not in NOT_OUTPUTS]


def test_every_output_is_written_through_finechat_files():
    """Outputs go through finechat.files (a temporary name renamed into place): a crash never leaves half a file."""
    assert _bare_writes(_source_lines()) == []
    # each exception is still there (a stale entry would hide nothing and only confuse)
    present = {(f, line.strip().split("  #")[0]) for f, _, line in _source_lines()}
    assert set(NOT_OUTPUTS) - present == set()


def test_bare_write_finder_finds_them():
    lines = [("x.py", 1, '    (out / "a.md").write_text(text)'), ("x.py", 2, '    with open(p, "w") as fh:'),
             ("x.py", 3, '    with open(p, encoding="utf-8") as fh:'), ("x.py", 4, "    os.replace(tmp, path)"),
             ("files.py", 5, "    os.replace(tmp, path)")]
    assert [b.split(":")[1] for b in _bare_writes(lines)] == ["1", "2", "4"]


STAGE_TEST = re.compile(r"stage (==|!=|in|not in) ")  # `cfg.stage == "rm"`, `stage in (...)`, ...


def test_the_stage_is_asked_of_its_record_not_tested_by_name():
    found = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if STAGE_TEST.search(line)]
    assert len(found) <= 5, found  # finechat.train.stage_table holds what differs between stages


def test_the_stage_pattern_finds_a_string_test():
    assert STAGE_TEST.search('    if cfg.stage == "grpo":') and STAGE_TEST.search("if stage not in PAIRS:")
    assert not STAGE_TEST.search("stage = get_stage(cfg.stage)")
