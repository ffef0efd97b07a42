"""Solve finds roots with no closed form; Search stays inside --docs, skips and counts what it cannot read,
refuses a folder too big to index, and a query past its time limit stops instead of running on in its thread."""

import os
import threading
import time

import pytest

from finechat.errors import DataError
from finechat.tools.search import LocalSearch
from finechat.tools.solver import solve
from finechat.tools.toolbox import build_registry


@pytest.mark.parametrize("equation, real_root", [
    ("x^5 - x + 1 = 0", "x ≈ -1.16730397826142"),
    ("x^7 + x^3 + 1 = 0", "x ≈ -0.863146489991871"),
    ("x^5 - x + 1 = 0, y = 2x", "x ≈ -1.16730397826142, y ≈ -2.33460795652284"),
])
def test_solve_gives_roots_without_a_closed_form_numerically(equation, real_root):
    answer = solve(equation)
    assert answer.startswith(real_root + ";"), answer  # the real root first, then the complex ones
    assert answer.count(";") == int(equation[2]) - 1  # every root of the polynomial, none dropped


def test_solve_still_says_no_solution_when_there_is_none():
    assert solve("x^2 + 1 = 0, x^2 - 1 = 0") == "no solution"
    assert solve("x^2 - 4 = 0") == "x = -2; x = 2"


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "paris.md").write_text("Paris is the capital of France.\n", encoding="utf-8")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("the launch code is swordfish\n", encoding="utf-8")
    (folder / "hostname.txt").symlink_to(outside / "secret.txt")
    (folder / "elsewhere").symlink_to(outside, target_is_directory=True)
    (folder / "inside.md").symlink_to(folder / "paris.md")
    (folder / "loop.md").symlink_to(folder / "loop.md")
    (folder / "gone.txt").symlink_to(tmp_path / "missing.txt")
    return folder


def test_search_stays_inside_its_folder_and_counts_what_it_skips(docs):
    search = LocalSearch(docs)
    assert search.files == 2  # paris.md and the link to it inside the folder
    assert not search.search("swordfish launch code")
    text = "\n".join(search.skipped)
    assert "hostname.txt (a link to" in text and "outside --docs" in text
    assert "elsewhere/ (link to a folder, not followed)" in text
    assert "loop.md" in text and "gone.txt" in text
    assert f"skipped {len(search.skipped)}" in search.summary and len(search.skipped) == 4


def test_search_skips_and_counts_an_unreadable_folder(docs, monkeypatch):
    """As with --docs / (root cannot be denied by chmod, so the denial is simulated at os.scandir)."""
    (docs / "private").mkdir()
    (docs / "private" / "notes.md").write_text("private notes\n", encoding="utf-8")
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("private"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    search = LocalSearch(docs)
    assert "private/ (Permission denied)" in search.skipped
    assert search.search("Paris capital")


def test_search_size_limits(docs):
    (docs / "big.txt").write_text("word " * 400, encoding="utf-8")
    search = LocalSearch(docs, max_file_bytes=1000)
    assert any(s.startswith("big.txt (0.0 MB, over the") for s in search.skipped)
    with pytest.raises(DataError, match=r"over the .* MB limit .* point --docs at a smaller folder"):
        LocalSearch(docs, max_total_bytes=1500)


def test_a_timed_out_search_stops_its_thread(docs, monkeypatch):
    import finechat.tools.search as search_module

    for n in range(300):
        (docs / f"page{n:03}.md").write_text(f"Page {n} about Paris and France.\n", encoding="utf-8")
    registry = build_registry("search", docs=str(docs))
    tool = registry.get("Search")
    tool.timeout = 0.2
    bm25 = tool.fn.backend.bm25
    real_batch = bm25.get_batch_scores

    workers = set()

    def slow_scores(words):  # a huge index: scoring takes 30 s
        workers.add(threading.current_thread())
        time.sleep(30)
        return bm25.__class__.get_scores(bm25, words)

    def slow_batch(words, ids):
        workers.add(threading.current_thread())
        time.sleep(0.05)
        return real_batch(words, ids)

    monkeypatch.setattr(bm25, "get_scores", slow_scores)
    monkeypatch.setattr(bm25, "get_batch_scores", slow_batch)
    monkeypatch.setattr(search_module, "SCORE_CHUNK", 1)  # 300 chunks of 0.05 s: 15 s unless stopped
    result = registry.call("Search", ["Paris"])
    assert not result.ok and "did not finish within 0.2 s" in result.content
    for worker in workers:
        worker.join(10)
    assert workers and not any(w.is_alive() for w in workers)
