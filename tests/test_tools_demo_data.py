"""The tools demo's data: deterministic by seed, every result is what the real tool returns, held-out facts are
never trained, and both layouts read back through finechat's readers into exactly the prompts the tool loop shows
(a scripted model that writes the trained call and answer is scored correct)."""

import json

import pytest
from scripted import ScriptedChat
from tiny import make_tokenizer

from finechat.data.formats import read_conversations
from finechat.data.templates import get_template
from finechat.data.tokenize import IGNORE_INDEX, TokenizeSettings, tokenize_conversation
from finechat.tools.accuracy import holds_exactly, score_example
from finechat.tools.agent import Agent
from finechat.tools.demo_data import (
    FACTS,
    HELD_OUT_FACTS,
    ToolRegistry,
    demo_registry,
    generate_tool_examples,
    tool_records,
)


@pytest.fixture(scope="module")
def registry():
    return demo_registry()


@pytest.fixture(scope="module")
def examples(registry):
    return generate_tool_examples(40, seed=7, registry=registry)


def test_same_seed_same_examples_and_every_kind(registry, examples):
    again = generate_tool_examples(40, seed=7, registry=registry)
    assert [e.to_dict() for e in again] == [e.to_dict() for e in examples]
    other = generate_tool_examples(40, seed=8, registry=registry)
    assert [e.question for e in other] != [e.question for e in examples]
    assert {e.kind for e in examples} == {"arithmetic", "equation", "lookup", "chat"}
    held_out = generate_tool_examples(12, seed=7, split="heldout", registry=registry)
    assert [e.kind for e in held_out].count("arithmetic") == 4 and {e.kind for e in held_out} == {
        "arithmetic", "equation", "lookup"}
    assert len({e.question for e in held_out}) == len(held_out)  # no question asked twice


def test_held_out_facts_are_never_trained(registry):
    held = {q for i in HELD_OUT_FACTS for q in FACTS[i][0]}
    trained = generate_tool_examples(300, seed=1, registry=registry)
    assert not held & {e.question for e in trained if e.kind == "lookup"}
    asked = {e.question for e in generate_tool_examples(30, seed=1, split="heldout", registry=registry)
             if e.kind == "lookup"}
    assert asked and asked <= held


def test_every_result_is_what_the_tool_returns(examples):
    tools = demo_registry()  # a fresh registry, calls run as chat runs them (Solve in its own process)
    for e in examples:
        if e.tool is None:
            assert e.kind == "chat" and not e.result
            continue
        assert e.tool in e.tools
        assert tools.call(e.tool, e.arguments).content == e.result, e.question
        if e.tool != "Search":
            assert e.expected == e.result
        assert holds_exactly(e.result, e.expected) and holds_exactly(e.answer, e.expected), e


ENDS = ("<|im_end|>", "<eom>", "<eoc>")  # end markers of trained spans; the scripted model's stop strings


def spans(tokenizer, example):
    """(text before each trained span, the span) of a tokenized example."""
    ids, labels, out, i = example["input_ids"], example["labels"], [], 0
    while i < len(ids):
        if labels[i] == IGNORE_INDEX:
            i += 1
            continue
        j = i
        while j < len(ids) and labels[j] != IGNORE_INDEX:
            j += 1
        out.append((tokenizer.decode(ids[:i]), tokenizer.decode(ids[i:j])))
        i = j
    return out


@pytest.mark.parametrize("layout,template", [("openai", "tokenizer"), ("moss", "moss")])
def test_layouts_train_what_the_tool_loop_shows(tmp_path, registry, examples, layout, template):
    tokenizer = make_tokenizer()
    chosen = [next(e for e in examples if e.kind == kind and not e.history) for kind in ("arithmetic", "equation",
                                                                                          "lookup")]
    path = tmp_path / f"{layout}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in tool_records(chosen, layout, registry)),
                    encoding="utf-8")
    read = read_conversations(path)
    assert read.format == layout and len(read.conversations) == 3 and not read.skipped
    for example, conversation in zip(chosen, read.conversations):
        tokenized = tokenize_conversation(conversation, tokenizer, get_template(template, tokenizer),
                                          TokenizeSettings(cutoff_len=4096))
        (call_prompt, call), (answer_prompt, answer) = spans(tokenizer, tokenized)
        assert example.result in answer_prompt and example.result not in call  # results are shown, not trained
        assert answer.startswith(example.answer)
        # The tool loop, offered the same tools, shows exactly the trained prompts; a model that writes what was
        # trained is scored correct.
        def script(prompt, call=call, answer=answer, call_prompt=call_prompt, answer_prompt=answer_prompt):
            assert prompt in (call_prompt, answer_prompt)
            text = call if prompt == call_prompt else answer
            for end in ENDS:
                text = text.removesuffix(end)
            return text + ("<eoc>" if template == "moss" and prompt == call_prompt else "")

        bot = ScriptedChat(tokenizer, script, template=template, eos=template != "moss", prompts_as="text")
        offered = ToolRegistry(registry.get(name) for name in example.tools)
        record = score_example(Agent(bot, offered), example, greedy=True, max_new_tokens=400)
        assert bot.prompts == [call_prompt, answer_prompt]
        assert record["correct"], record
        assert [c["name"] for c in record["calls"]] == [example.tool] and record["calls"][0]["result"] == example.result


@pytest.mark.parametrize("layout", ["openai", "moss"])
def test_an_earlier_exchange_comes_first(tmp_path, registry, examples, layout):
    later = [e for e in examples if e.history]
    assert later and len(later) < len(examples)  # some training questions follow an earlier exchange
    path = tmp_path / f"{layout}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tool_records(later, layout, registry)), encoding="utf-8")
    for example, conversation in zip(later, read_conversations(path).conversations):
        (question, answer), = example.history
        assert [t.content for t in conversation.turns[:3]] == [question, answer, example.question]
        assert conversation.turns[-1].content == example.answer
