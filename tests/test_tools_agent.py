"""The tool runtime with a scripted model double: MOSS commands really run and their results reach the answer."""

import json
import re
import threading

import pytest
from tiny import make_tokenizer
from tools_helpers import ScriptedModel, moss_script

from finechat.generate.engine import ChatModel
from finechat.serve.terminal import run_terminal_chat
from finechat.tools.agent import Agent, parse_commands
from finechat.tools.toolbox import build_registry


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def run(agent, query, **gen):
    events = list(agent.stream_events(query, **gen))
    assert events[-1].kind == "done"
    return events


def test_moss_runtime_runs_calculate(tokenizer):
    bot = ScriptedModel(tokenizer, moss_script('Calculate("(2+3)*7/5 + 0.1 + 0.2")'))
    events = run(Agent(bot, build_registry("calculator,solver")), "What is (2+3)*7/5 + 0.1 + 0.2?")
    kinds = [e.kind for e in events]
    call = next(e for e in events if e.kind == "tool_call")
    result = next(e for e in events if e.kind == "tool_result")
    assert call.name == "Calculate" and call.arguments == ["(2+3)*7/5 + 0.1 + 0.2"]
    assert result.ok and result.text == "7.3"
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("text")
    assert "thought" not in kinds  # hidden unless show_thoughts
    answer = events[-1].text
    assert answer == "The tool says: 7.3"
    assert "".join(e.text for e in events if e.kind == "text") == answer
    # The prompt the model saw: MOSS meta instruction with capability lines, then the exact Results block.
    first, second = bot.prompts
    assert "- Calculator: enabled. API: Calculate(expression)\n" in first
    assert "- Equation solver: enabled. API: Solve(equation)\n" in first
    assert first.endswith("<|Human|>: What is (2+3)*7/5 + 0.1 + 0.2?<eoh>\n")
    assert second.endswith('<|Commands|>: Calculate("(2+3)*7/5 + 0.1 + 0.2")<eoc>\n'
                           '<|Results|>:\nCalculate("(2+3)*7/5 + 0.1 + 0.2") =>\n7.3\n<eor>\n<|MOSS|>:')


def test_moss_runtime_runs_solve_and_shows_thoughts(tokenizer):
    bot = ScriptedModel(tokenizer, moss_script('Solve("x^2 - 5x + 6 = 0")'))
    events = run(Agent(bot, build_registry("solver"), show_thoughts=True), "Solve x^2-5x+6=0")
    assert "".join(e.text for e in events if e.kind == "thought") == "I need a tool for this."
    assert events[-1].text == "The tool says: x = 2; x = 3"


def test_moss_runtime_runs_search(tokenizer, tmp_path):
    (tmp_path / "notes.md").write_text("The finechat project mascot is a red panda named Momo.\n\n"
                                       "Unrelated text about weather.\n", encoding="utf-8")
    bot = ScriptedModel(tokenizer, moss_script('Search("finechat mascot")'))
    events = run(Agent(bot, build_registry("search", docs=str(tmp_path))), "What is finechat's mascot?")
    assert "- Web search: enabled. API: Search(query)" in bot.prompts[0]
    assert events[-1].text.startswith("The tool says: <|1|>: The finechat project mascot is a red panda named Momo.")
    assert "(source: notes.md:1)" in events[-1].text


def test_several_commands_and_none(tokenizer):
    bot = ScriptedModel(tokenizer, moss_script('Calculate("2**10"), Solve("2*x = 6")'))
    events = run(Agent(bot, build_registry("calculator,solver")), "two things")
    assert [e.text for e in events if e.kind == "tool_result"] == ["1024", "x = 3"]
    assert 'Calculate("2**10") =>\n1024\nSolve("2*x = 6") =>\nx = 3\n<eor>' in bot.prompts[-1]

    def no_tool(prompt):
        return " Hello!<eom>" if prompt.endswith("<|MOSS|>:") else \
            "<|Inner Thoughts|>: None<eot>\n<|Commands|>: None<eoc>"
    bot = ScriptedModel(tokenizer, no_tool)
    events = run(Agent(bot, build_registry("calculator"), show_thoughts=True), "hi")
    assert not [e for e in events if e.kind == "thought"]  # "None" thoughts are not shown
    assert not [e for e in events if e.kind.startswith("tool")]
    assert events[-1].text == "Hello!"
    assert bot.prompts[-1].endswith("<|Commands|>: None<eoc>\n<|Results|>: None<eor>\n<|MOSS|>:")


def test_tool_errors_go_back_to_the_model(tokenizer):
    bot = ScriptedModel(tokenizer, moss_script('Calculate("__import__(\'os\').system(\'echo hi\')")'))
    events = run(Agent(bot, build_registry("calculator")), "hack")
    result = next(e for e in events if e.kind == "tool_result")
    assert not result.ok and result.text.startswith("error: function \"__import__('os').system\" is not allowed")
    assert events[-1].text.startswith("The tool says: error: function")

    bot = ScriptedModel(tokenizer, moss_script('Draw("a cat")'))
    events = run(Agent(bot, build_registry("calculator")), "draw")
    assert "error: unknown tool 'Draw'; available: Calculate" in events[-1].text


def test_over_long_and_slow_calls(tokenizer):
    bot = ScriptedModel(tokenizer, moss_script('Calculate("' + "1+" * 3000 + '1")'))
    events = run(Agent(bot, build_registry("calculator")), "long", max_new_tokens=100_000)
    result = next(e for e in events if e.kind == "tool_result")
    assert not result.ok and "too long" in result.text

    registry = build_registry("calculator")
    gate = threading.Event()
    registry.register(lambda seconds: gate.wait(float(seconds)) and "woke", name="Wait", timeout=0.2,
                      parameters={"type": "object", "properties": {"seconds": {"type": "string"}}})
    bot = ScriptedModel(tokenizer, moss_script('Wait("30")'))
    events = run(Agent(bot, registry), "wait")
    gate.set()
    assert "error: Wait did not finish within 0.2 s" in events[-1].text


def test_rounds_are_bounded(tokenizer):
    def loop(prompt):  # a model that never stops calling tools
        return '<|Commands|>: Calculate("1+1")<eoc>' if not prompt.endswith("<|MOSS|>:") else \
            ' <|Commands|>: Calculate("1+1")<eoc>'
    bot = ScriptedModel(tokenizer, loop)
    events = run(Agent(bot, build_registry("calculator"), max_rounds=2), "loop")
    results = [e for e in events if e.kind == "tool_result"]
    assert [r.ok for r in results] == [True, True, False]
    assert "at most 2 rounds" in results[-1].text
    assert len(bot.prompts) == 4 and events[-1].rounds == 3


def test_model_that_ignores_the_protocol(tokenizer):
    bot = ScriptedModel(tokenizer, lambda prompt: "Just an answer.<eom>")
    events = run(Agent(bot, build_registry("calculator")), "hi")
    assert events[-1].text == "Just an answer." and len(bot.prompts) == 1


def test_parse_commands_never_evaluates():
    calls = parse_commands('Search("a \\"quoted\\" (query)"), Calculate(1+2*(3)), Solve(equation="x=1")')
    assert [(c.name, c.arguments) for c in calls] == [
        ("Search", ['a "quoted" (query)']), ("Calculate", "1+2*(3)"), ("Solve", {"equation": "x=1"})]
    assert parse_commands("None") == []
    assert parse_commands('Calculate(__import__("os"))')[0].arguments == '__import__("os")'
    deep = parse_commands("Calculate(" + "(" * 10_000 + ")" * 10_000 + ")")
    assert deep[0].name == "Calculate"


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>{{ c['function'] | tojson }}</tool_call>"
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_native_tool_calls(tokenizer):
    tok = make_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE

    def script(prompt):
        if "<|im_start|>tool\n" in prompt:
            result = prompt.rsplit("<|im_start|>tool\n", 1)[1].split("<|im_end|>")[0]
            return f"It is {result}.<|im_end|>"
        return '<tool_call>{"name": "Calculate", "arguments": {"expression": "12*12"}}</tool_call><|im_end|>'

    bot = ScriptedModel(tok, script, template="tokenizer")
    agent = Agent(bot, build_registry("calculator"))
    assert agent.protocol == "native"
    events = run(agent, "12 squared?")
    assert events[-1].text == "It is 144."
    assert '"name": "Calculate"' in bot.prompts[0] and "Tools: [" in bot.prompts[0]
    tool_turn = [m for m in events[-1].messages if m["role"] == "tool"]
    assert tool_turn[0]["content"] == "144" and tool_turn[0]["name"] == "Calculate"
    assert "<tool_call>" not in "".join(e.text for e in events if e.kind == "text")


def test_terminal_shows_calls_and_results(tokenizer):
    import io

    bot = ScriptedModel(tokenizer, moss_script('Calculate("6*7")'))
    out = io.StringIO()
    agent = Agent(bot, build_registry("calculator"))
    assert run_terminal_chat(bot, {}, stdin=io.StringIO("what is 6*7?\n"), stdout=out, interactive=False,
                             agent=agent) == 0
    text = out.getvalue()
    assert re.search(r'Calculate\("6\*7"\)', text) and "=> 42" in text
    assert text.rstrip().endswith("The tool says: 42")


def test_done_event_messages_for_the_api(tokenizer):
    bot = ScriptedModel(tokenizer, moss_script('Calculate("1+1")'))
    done = run(Agent(bot, build_registry("calculator")), "1+1")[-1]
    assert done.messages[-1] == {"role": "assistant", "content": "The tool says: 2"}
    json.dumps(done.messages)


def test_multi_turn_moss_prompt_uses_the_template_layout(tokenizer):
    bot = ScriptedModel(tokenizer, moss_script('Calculate("2+2")'))
    agent = Agent(bot, build_registry("calculator"))
    answer, history = agent.chat("2+2?")
    assert answer == "The tool says: 4" and history == [("2+2?", "The tool says: 4")]
    agent.chat("and again?", history)
    assert "<|Human|>: 2+2?<eoh>\n<|MOSS|>:The tool says: 4<eom>\n<|Human|>: and again?<eoh>\n<|Inner" in bot.prompts[-1]


@pytest.mark.parametrize("call", [
    '{"name": "Calculate", "parameters": {"expression": "12*12"}}',  # Llama 3.1
    '<|python_tag|>{"name": "Calculate", "parameters": {"expression": "12*12"}}',
    '[TOOL_CALLS] [{"name": "Calculate", "arguments": {"expression": "12*12"}}]',  # Mistral
])
def test_other_native_call_formats(call):
    tok = make_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE

    def script(prompt):
        if "<|im_start|>tool\n" in prompt:
            return "It is " + prompt.rsplit("<|im_start|>tool\n", 1)[1].split("<|im_end|>")[0] + ".<|im_end|>"
        return call + "<|im_end|>"

    events = run(Agent(ScriptedModel(tok, script, template="tokenizer"), build_registry("calculator")), "12*12?")
    assert [e.text for e in events if e.kind == "tool_result"] == ["144"]
    assert "".join(e.text for e in events if e.kind == "text") == events[-1].text == "It is 144."


def test_json_that_is_not_a_call_is_the_answer():
    tok = make_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    bot = ScriptedModel(tok, lambda prompt: '{"name": "Bob", "age": 3}<|im_end|>', template="tokenizer")
    events = run(Agent(bot, build_registry("calculator")), "json please")
    assert "".join(e.text for e in events if e.kind == "text") == events[-1].text == '{"name": "Bob", "age": 3}'


def test_a_double_that_overrides_stream_text(tokenizer):
    """A model double at the text level (no tokens, no stop handling) works too: it sees the tool turn."""

    class TextDouble(ChatModel):
        def stream_text(self, messages, tools=None, **kwargs):
            if messages[-1]["role"] == "tool":
                yield f"The result is {messages[-1]['content'].split('=>')[-1].strip()}.<eom>"
            else:
                yield '<|Inner Thoughts|>: calculator<eot>\n<|Commands|>: Calculate("2**16")<eoc>\n<|Results|>: made up'

    events = run(Agent(TextDouble(None, tokenizer, "moss"), build_registry("calculator")), "2**16?")
    assert [e.text for e in events if e.kind == "tool_result"] == ["65536"]
    assert events[-1].text == "The result is 65536."


def test_engine_hooks_apply_once_per_answer_over_tool_rounds(tokenizer):
    """The medical hook on the engine: records in the first prompt, sources and notice once after all rounds."""
    from pathlib import Path

    from finechat.medical.retrieval import NOTICE, DiseaseTable, attach_medical

    table = DiseaseTable.load(Path(__file__).resolve().parent.parent / "data/samples/medical/diseases.csv")
    bot = attach_medical(ScriptedModel(tokenizer, moss_script('Calculate("2+3")')), table, k=1)
    agent = Agent(bot, build_registry("calculator"))
    events = run(agent, "我尿频、尿急、尿痛, 2+3?")
    shown = "".join(e.text for e in events if e.kind == "text")
    assert [e.text for e in events if e.kind == "tool_result"] == ["5"]
    assert shown == events[-1].text and shown.startswith("The tool says: 5")
    assert shown.count(NOTICE) == 1 and shown.endswith(NOTICE) and shown.count("[1] 尿路感染 (diseases.csv row") == 1
    assert "尿路感染" in bot.prompts[0] and len(bot.prompts) == 2
    assert events[-1].messages[0]["content"] == "我尿频、尿急、尿痛, 2+3?"  # the caller's messages, plain
    assert events[-1].messages[-1]["content"] == "The tool says: 5"
    answer, history = agent.chat("我尿频、尿急、尿痛, 2+3?", [])
    assert answer == shown and history == [("我尿频、尿急、尿痛, 2+3?", "The tool says: 5")]


def test_the_servers_first_prompt_is_the_agents_with_hooks(tokenizer):
    """The server queues the agent's first round before it starts: same prompt ids, hooks applied once."""
    from pathlib import Path

    from scripted import ScriptedChat

    from finechat.medical.retrieval import DiseaseTable, attach_medical
    from finechat.serve.tools_api import first_prompt_ids

    table = DiseaseTable.load(Path(__file__).resolve().parent.parent / "data/samples/medical/diseases.csv")
    messages = [{"role": "user", "content": "我尿频、尿急、尿痛"}]
    for template in ("moss", "chatml"):
        bot = attach_medical(ScriptedChat(tokenizer, "好的。", template=template, prompts_as="ids"), table, k=1)
        agent = Agent(bot, build_registry("calculator"))
        assert agent.protocol == ("moss" if template == "moss" else "native")
        run(agent, messages[0]["content"])
        assert first_prompt_ids(agent, messages) == bot.prompts[0]
        assert "尿路感染" in tokenizer.decode(bot.prompts[0]) and tokenizer.decode(bot.prompts[0]).count("[1]") == 1
