"""MOSS plugin conversations and ShareGPT function_call/observation turns as training examples:
commands and answers are trained, tool results are masked (exact labels on a tiny tokenizer)."""

import json

import pytest
from tiny import make_tokenizer

from finechat.data.formats import read_conversations
from finechat.data.templates import get_template
from finechat.data.tokenize import IGNORE_INDEX, TokenizeSettings, tokenize_conversation

META = "You are an AI assistant whose name is MOSS.\nCapabilities and tools that MOSS can possess.\n" \
       "- Inner thoughts: enabled.\n- Web search: enabled. API: Search(query)\n"
MOSS_RECORD = {
    "conversation_id": 7, "meta_instruction": META, "num_turns": 2, "category": "tool",
    "chat": {
        "turn_1": {
            "Human": "<|Human|>: What is the finechat mascot?<eoh>\n",
            "Inner Thoughts": "<|Inner Thoughts|>: I should search.<eot>\n",
            "Commands": '<|Commands|>: Search("finechat mascot")<eoc>\n',
            "Tool Responses": '<|Results|>:\nSearch("finechat mascot") =>\n<|1|>: a red panda named Momo\n<eor>\n',
            "MOSS": "<|MOSS|>: The mascot is Momo, a red panda.<eom>\n",
        },
        "turn_2": {
            "Human": "<|Human|>: Thanks!<eoh>\n",
            "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
            "Commands": "<|Commands|>: None<eoc>\n",
            "Tool Responses": "<|Results|>: None<eor>\n",
            "MOSS": "<|MOSS|>: You are welcome.<eom>\n",
        },
    },
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def expected_example(tokenizer, pieces):
    """input_ids / labels from (text, trained) pieces, each encoded on its own (as the data pipeline does)."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return {"input_ids": ids, "labels": labels}


def test_moss_plugin_sample_labels(tmp_path, tokenizer):
    path = tmp_path / "moss_plugin.jsonl"
    path.write_text(json.dumps(MOSS_RECORD, ensure_ascii=False) + "\n", encoding="utf-8")
    result = read_conversations(path)
    conversations = getattr(result, "conversations", result)
    assert len(conversations) == 1
    example = tokenize_conversation(conversations[0], tokenizer, get_template("moss"), TokenizeSettings())
    expected = expected_example(tokenizer, [
        (META + "<|Human|>: What is the finechat mascot?<eoh>\n", False),
        ('<|Inner Thoughts|>: I should search.<eot>\n<|Commands|>: Search("finechat mascot")<eoc>', True),
        ('\n<|Results|>:\nSearch("finechat mascot") =>\n<|1|>: a red panda named Momo\n<eor>\n<|MOSS|>:', False),
        ("The mascot is Momo, a red panda.<eom>", True),
        ("\n<|Human|>: Thanks!<eoh>\n<|MOSS|>:", False),
        ("You are welcome.<eom>", True),
    ])
    assert example == expected
    trained = tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX])
    assert 'Search("finechat mascot")<eoc>' in trained and "red panda named Momo" not in trained


def test_the_runtime_prompt_matches_the_training_layout(tokenizer):
    """What the tool runtime feeds the model after a command is what training put before the answer."""
    from finechat.generate.engine import ChatModel
    from finechat.tools.agent import Agent
    from finechat.tools.toolbox import build_registry

    class Echo(ChatModel):
        prompts = []

        def generate_ids(self, input_ids, settings, cancelled=None):
            prompt = self.tokenizer.decode(input_ids)
            self.prompts.append(prompt)
            text = " The mascot is Momo.<eom>" if prompt.endswith("<|MOSS|>:") else \
                '<|Inner Thoughts|>: I should search.<eot>\n<|Commands|>: Search("finechat mascot")<eoc>'
            for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
                yield [t]

    bot = Echo(None, tokenizer, "moss")
    registry = build_registry("text2image")
    registry.register(lambda query: "<|1|>: a red panda named Momo", name="Search", capability="Web search",
                      parameters={"type": "object", "properties": {"query": {"type": "string"}}})
    list(Agent(bot, registry).stream_events("What is the finechat mascot?", system=META))
    from finechat.data.formats import parse_moss

    trained_layout = get_template("moss").render(parse_moss(MOSS_RECORD).messages()[:4], "")
    # Same text from the question to the answer header (the system part differs: the runtime lists its tools).
    assert bot.prompts[-1].split("<|Human|>", 1)[1] == trained_layout.split("<|Human|>", 1)[1]


def test_sharegpt_function_call_and_observation(tmp_path, tokenizer):
    record = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"sky": "sunny"}'},
        {"from": "gpt", "value": "It is sunny in Paris."},
    ]}
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    result = read_conversations(path)
    conversation = getattr(result, "conversations", result)[0]
    example = tokenize_conversation(conversation, tokenizer, get_template("chatml"), TokenizeSettings())
    template = get_template("chatml")
    pieces = template.segments(conversation.messages(), tokenizer.eos_token)
    assert [(t, trained) for t, trained in pieces if trained] == [
        ('{"name": "weather", "arguments": {"city": "Paris"}}<|im_end|>', True),
        ("It is sunny in Paris.<|im_end|>", True)]
    assert any('{"sky": "sunny"}' in t and not trained for t, trained in pieces)
    merged = []
    for text, trained in pieces:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    assert example == expected_example(tokenizer, merged)


def test_the_moss_plugin_sample_file(tokenizer):
    """data/samples/moss_plugin.jsonl: every command is trained, no tool result is."""
    from pathlib import Path

    path = Path(__file__).parent.parent / "data" / "samples" / "moss_plugin.jsonl"
    result = read_conversations(path)
    conversations = getattr(result, "conversations", result)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(conversations) == len(records) == 3
    for conversation, record in zip(conversations, records):
        example = tokenize_conversation(conversation, tokenizer, get_template("moss"), TokenizeSettings())
        trained = tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX])
        masked = tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab == IGNORE_INDEX])
        for turn in record["chat"].values():
            command = turn["Commands"].removeprefix("<|Commands|>: ").removesuffix("<eoc>\n")
            answer = turn["MOSS"].removeprefix("<|MOSS|>: ").removesuffix("<eom>\n")
            results = turn["Tool Responses"]
            if command != "None":
                assert f"<|Commands|>: {command}<eoc>" in trained
                assert results.removesuffix("<eor>\n") in masked and "=>" not in trained
            assert f"{answer}<eom>" in trained
