"""The tool registry, the built-in Solve / Search / Text2Image tools and how calls fail safely."""

import json
import time

import pytest

from finechat.errors import ConfigError, DataError
from finechat.tools.calculator import CalculationError
from finechat.tools.search import LocalSearch
from finechat.tools.solver import solve
from finechat.tools.toolbox import Tool, ToolRegistry, build_registry


@pytest.mark.parametrize("equation, expected", [
    ("x^2 - 4 = 0", "x = -2; x = 2"),
    ("x + y = 3, x - y = 1", "x = 2, y = 1"),
    ("2x + 1", "x = -1/2"),
    ("3(x - 1) = 6", "x = 3"),
    ("a*x = b", "x = b/a"),
    ("x^2 = 2", "x = -sqrt(2) (≈ -1.41421356237); x = sqrt(2) (≈ 1.41421356237)"),
    ("x = x + 1", "false (no unknowns)"),
])
def test_solve(equation, expected):
    assert solve(equation) == expected


@pytest.mark.parametrize("equation", ["__import__('os')", "x.__class__ = 1", "x**100000 = 1", "x = = 1",
                                      "lambda: 0", "2**x = 8" + ", x=1" * 10])
def test_solve_refuses(equation):
    with pytest.raises(CalculationError):
        solve(equation)


@pytest.fixture
def docs(tmp_path):
    (tmp_path / "paris.md").write_text("# Paris\n\nParis is the capital of France. The Eiffel Tower is there.\n\n"
                                       "# Food\n\nCroissants are eaten for breakfast.\n", encoding="utf-8")
    (tmp_path / "china.txt").write_text("北京是中国的首都，有故宫和长城。\n\n上海是中国最大的城市。\n", encoding="utf-8")
    (tmp_path / "more.jsonl").write_text(
        json.dumps({"title": "Tokyo", "text": "Tokyo is the capital of Japan.", "url": "https://example.org/tokyo"})
        + "\nnot json\n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    return tmp_path


def test_local_search_numbered_snippets_with_sources(docs):
    search = LocalSearch(docs)
    assert len(search.skipped) == 2  # the bad JSON line and the PNG are counted and named, not dropped silently
    assert "more.jsonl:2" in search.summary and "image.png" in search.summary
    registry = build_registry("search", docs=str(docs))
    out = registry.call("Search", ["capital of France"]).content
    assert out.startswith("<|1|>: Paris: Paris is the capital of France.")
    assert "(source: paris.md:1)" in out
    assert "<|2|>: Tokyo: Tokyo is the capital of Japan. (source: https://example.org/tokyo)" in out
    chinese = registry.call("Search", ["中国的首都在哪里"]).content
    assert chinese.startswith("<|1|>: 北京是中国的首都") and "china.txt:1" in chinese
    assert registry.call("Search", ["zzzz"]).content == "no results for 'zzzz'"


def test_search_needs_docs(tmp_path):
    with pytest.raises(ConfigError, match="--docs"):
        build_registry("search")
    with pytest.raises(DataError, match="not a folder"):
        build_registry("search", docs=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no .txt"):
        build_registry("search", docs=str(tmp_path))


def test_search_backend_is_pluggable():
    from finechat.tools.search import Hit

    class Backend:
        def search(self, query, k):
            return [Hit(f"about {query}", "https://search.invalid/1")]

    registry = build_registry("search", search_backend=Backend())
    assert registry.call("Search", ["cats"]).content == "<|1|>: about cats (source: https://search.invalid/1)"


def test_text2image_not_configured_is_a_result():
    result = build_registry("text2image").call("Text2Image", ["a cat on the moon"])
    assert result.ok and "not configured" in result.content


def test_unknown_tool_names():
    with pytest.raises(ConfigError, match="unknown tool.*calculator"):
        build_registry("calculater")


def test_user_tool_errors_and_timeouts_come_back_as_results():
    registry = ToolRegistry()

    @registry.register
    def weather(city: str, days: int = 1) -> dict:
        """Weather forecast for a city."""
        if city == "Atlantis":
            raise KeyError("no such city")
        return {"city": city, "days": days, "sky": "sunny"}

    registry.register(lambda seconds: time.sleep(seconds), name="Sleep", timeout=0.3,
                      parameters={"type": "object", "properties": {"seconds": {"type": "number"}}})
    tool = registry.get("weather")
    assert tool.description == "Weather forecast for a city."
    assert tool.parameters["required"] == ["city"]
    assert registry.openai_schemas()[0]["function"]["parameters"]["properties"]["days"] == {"type": "integer"}
    assert json.loads(registry.call("weather", '{"city": "Paris", "days": 2}').content)["days"] == 2
    assert json.loads(registry.call("weather", ["Rome"]).content)["city"] == "Rome"
    failed = registry.call("weather", {"city": "Atlantis"})
    assert not failed.ok and failed.content == "error: KeyError: 'no such city'"
    assert "missing argument(s): city" in registry.call("weather", {}).content
    assert "must be integer" in registry.call("weather", {"city": "x", "days": "two"}).content
    assert "unknown argument(s) color" in registry.call("weather", {"city": "x", "color": 1}).content
    assert "unknown tool 'Nope'" in registry.call("Nope", {}).content
    started = time.perf_counter()
    slow = registry.call("Sleep", {"seconds": 5})
    assert not slow.ok and "did not finish within 0.3 s" in slow.content
    assert time.perf_counter() - started < 2
    huge = registry.call("weather", {"city": "x" * 10_000})
    assert not huge.ok and "too long" in huge.content


def test_moss_capability_lines():
    registry = build_registry("calculator,solver")
    registry.add(Tool("Weather", "forecast", {"type": "object", "properties": {"city": {"type": "string"}}},
                      lambda city: "sunny"))
    lines = registry.moss_capabilities().splitlines()
    assert lines[:4] == ["- Inner thoughts: enabled.", "- Calculator: enabled. API: Calculate(expression)",
                         "- Equation solver: enabled. API: Solve(equation)", "- Weather: enabled. API: Weather(city)"]
    assert "- Web search: disabled." in lines and "- Text-to-image: disabled." in lines


def test_isolated_tool_is_killed_at_its_time_limit():
    import multiprocessing

    registry = ToolRegistry()

    @registry.register(timeout=0.5, isolate=True)
    def spin(n: int) -> str:
        """Busy forever."""
        while True:
            n += 1

    registry.register(lambda x: 1 / x, name="Invert", isolate=True,
                      parameters={"type": "object", "properties": {"x": {"type": "number"}}})
    started = time.perf_counter()
    result = registry.call("spin", {"n": 1})
    assert not result.ok and "did not finish within 0.5 s" in result.content
    assert time.perf_counter() - started < 3
    assert not [p for p in multiprocessing.active_children() if p.name == "tool-spin"]  # killed, not left running
    assert registry.call("Invert", {"x": 4}).content == "0.25"
    assert registry.call("Invert", {"x": 0}).content == "error: ZeroDivisionError: division by zero"
    assert build_registry("solver").call("Solve", ["x^2 = 9"]).content == "x = -3; x = 3"  # Solve is isolated


def test_user_functions_by_name(tmp_path):
    (tmp_path / "my_tools.py").write_text(
        'def weather(city: str) -> str:\n    """Weather in a city."""\n    return f"sunny in {city}"\n', encoding="utf-8")
    registry = build_registry(f"calculator,{tmp_path / 'my_tools.py'}:weather")
    assert registry.names == ["Calculate", "weather"]
    assert registry.get("weather").description == "Weather in a city."
    assert registry.call("weather", ["Paris"]).content == "sunny in Paris"
    with pytest.raises(ConfigError, match="no function 'rain'"):
        build_registry(f"{tmp_path / 'my_tools.py'}:rain")
    with pytest.raises(ConfigError, match="no file"):
        build_registry(f"{tmp_path / 'missing.py'}:weather")
