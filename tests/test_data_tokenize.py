"""Label masks, length limits, special tokens, cache, packing and padding of finechat.data.tokenize."""

import json
from pathlib import Path

import pytest
from tiny import make_tiny_llama, make_tokenizer

from finechat.data.conversation import Conversation, Turn
from finechat.data.formats import read_conversations
from finechat.data.templates import get_template
from finechat.data.token_cache import build_dataset
from finechat.data.tokenize import (
    IGNORE_INDEX,
    TokenizeSettings,
    data_collator,
    encode_conversation,
    pack_examples,
    tokenize_conversation,
)
from finechat.errors import ConfigError

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_text(tok, example):
    return tok.decode([t for t in example["labels"] if t != IGNORE_INDEX], skip_special_tokens=False)


def expect(tok, pieces):
    """input_ids and labels for hand-written (text, trained) pieces."""
    ids, labels = [], []
    for text, trained in pieces:
        e = enc(tok, text)
        ids += e
        labels += e if trained else [IGNORE_INDEX] * len(e)
    return {"input_ids": ids, "labels": labels}


CHAT = Conversation([Turn("user", "你好"), Turn("assistant", "Hello"), Turn("user", "Paris?"),
                     Turn("assistant", "Paris.")], system="Be brief.")


def test_chatml_multi_turn_trains_every_answer(tok):
    ex = tokenize_conversation(CHAT, tok, get_template("chatml"), TokenizeSettings())
    assert ex == expect(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello<|im_end|>", True),
        ("\n<|im_start|>user\nParis?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Paris.<|im_end|>", True),
    ])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ex["labels"].count(im_end) == 2  # the model learns to stop after every answer
    assert trained_text(tok, ex) == "Hello<|im_end|>Paris.<|im_end|>"


def test_last_turn_only_and_train_on_prompt(tok):
    t = get_template("chatml")
    last = tokenize_conversation(CHAT, tok, t, TokenizeSettings(last_turn_only=True))
    assert trained_text(tok, last) == "Paris.<|im_end|>"
    everything = tokenize_conversation(CHAT, tok, t, TokenizeSettings(train_on_prompt=True))
    assert everything["labels"] == everything["input_ids"]


def test_tokenizer_chat_template_matches_builtin_chatml(tok):
    # The tiny tokenizer's Jinja template is ChatML: same ids and trained spans, plus the final newline.
    jinja = tokenize_conversation(CHAT, tok, get_template("tokenizer", tok), TokenizeSettings())
    builtin = tokenize_conversation(CHAT, tok, get_template("chatml"), TokenizeSettings())
    nl = enc(tok, "\n")
    assert jinja["input_ids"] == builtin["input_ids"] + nl
    assert jinja["labels"] == builtin["labels"] + [IGNORE_INDEX] * len(nl)


def test_moss_tool_turns_masked(tok, tmp_path):
    from test_data_formats import MOSS_PLUGIN_RECORD

    f = tmp_path / "plugin.jsonl"
    f.write_text(json.dumps(MOSS_PLUGIN_RECORD, ensure_ascii=False) + "\n", encoding="utf-8")
    conv = read_conversations(f).conversations[0]
    ex = tokenize_conversation(conv, tok, get_template("moss"), TokenizeSettings(cutoff_len=4096))
    action = '<|Inner Thoughts|>: 这是一道乘法题，我需要使用计算器。<eot>\n<|Commands|>: Calculate("12*34")<eoc>'
    assert ex == expect(tok, [
        (conv.system + "<|Human|>: 12 乘以 34 等于多少？<eoh>\n", False),
        (action, True),  # MOSS writes the command step right after <eoh>, with no <eom>
        ('\n<|Results|>:\nCalculate("12*34") => 408\n<eor>\n<|MOSS|>:', False),
        ("12 乘以 34 等于 408。<eom>", True),
    ])
    assert "408\n<eor>" not in trained_text(tok, ex)


def test_sharegpt_function_call_trained_observation_not(tok):
    """The record's tools go into the system prompt and its call is trained as a <tool_call> block, as chat and
    serve show and parse them (chatml has no tools slot)."""
    from finechat.data.tool_prompt import FALLBACK_INSTRUCTIONS

    conv = read_conversations(SAMPLES / "sharegpt_tools.json").conversations[0]
    ex = tokenize_conversation(conv, tok, get_template("chatml"), TokenizeSettings())
    call = '<tool_call>{"name": "get_time", "arguments": {"city": "Beijing"}}</tool_call>'
    assert trained_text(tok, ex) == call + "<|im_end|>北京现在是下午 2 点 05 分。<|im_end|>"
    system = FALLBACK_INSTRUCTIONS + json.dumps(conv.tools, ensure_ascii=False)
    assert ex == expect(tok, [
        (f"<|im_start|>system\n{system}<|im_end|>\n"
         "<|im_start|>user\n北京现在几点？<|im_end|>\n<|im_start|>assistant\n", False),
        (call + "<|im_end|>", True),
        ('\n<|im_start|>tool\n{"time": "14:05"}<|im_end|>\n<|im_start|>assistant\n', False),
        ("北京现在是下午 2 点 05 分。<|im_end|>", True),
    ])


def chatglm_like_tokenizer():
    """A tokenizer that appends [gMASK]<sop> to its input, like ChatGLM-6B's."""
    from tokenizers.processors import TemplateProcessing

    t = make_tokenizer(chat_template=False)
    t.add_special_tokens({"additional_special_tokens": ["[gMASK]", "<sop>"]})
    g, s = t.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    t._tokenizer.post_processor = TemplateProcessing(
        single="$A [gMASK] <sop>", pair="$A [gMASK] <sop> $B", special_tokens=[("[gMASK]", g), ("<sop>", s)])
    return t, [g, s]


def bos_tokenizer():
    from tokenizers.processors import TemplateProcessing

    t = make_tokenizer(chat_template=False)
    t.add_special_tokens({"bos_token": "<s>"})
    t._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.bos_token_id)])
    return t


def test_generation_mark_goes_before_the_answer_one_example_per_turn():
    tok, mark = chatglm_like_tokenizer()
    conv = Conversation(CHAT.turns)
    results = encode_conversation(conv, tok, get_template("chatglm"), TokenizeSettings())
    assert [s for _, s in results] == ["ok", "ok"]
    first, second = (r[0] for r in results)
    p1 = enc(tok, "[Round 0]\n问：你好\n答：")
    a1 = enc(tok, "Hello<|endoftext|>")
    assert first == {"input_ids": p1 + mark + a1, "labels": [IGNORE_INDEX] * (len(p1) + 2) + a1}
    p2 = enc(tok, "[Round 0]\n问：你好\n答：Hello\n[Round 1]\n问：Paris?\n答：")
    a2 = enc(tok, "Paris.<|endoftext|>")
    # Earlier answers sit in the bidirectional context and are not trained again.
    assert second == {"input_ids": p2 + mark + a2, "labels": [IGNORE_INDEX] * (len(p2) + 2) + a2}
    only = encode_conversation(conv, tok, get_template("chatglm"), TokenizeSettings(last_turn_only=True))
    assert [r[0] for r in only] == [second]
    # The prompt, history included, is tokenized in one piece: the same ids as ChatModel.encode_prompt.
    prompt = get_template("chatglm").render(conv.messages()[:3], tok.eos_token)
    assert tok(prompt)["input_ids"] == p2 + mark


def test_bos_prepended_for_builtin_templates_only():
    tok = bos_tokenizer()
    conv = Conversation(CHAT.turns[:2])
    ex = tokenize_conversation(conv, tok, get_template("alpaca"), TokenizeSettings())
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"].count(tok.bos_token_id) == 1
    assert ex["labels"][0] == IGNORE_INDEX
    assert trained_text(tok, ex) == "Hello<|endoftext|>"


def test_length_limits_are_counted_or_skipped(tok):
    long_q = "The quick brown fox jumps over the lazy dog. " * 6
    long_a = "中国的首都是北京。法国的首都是巴黎。" * 4
    conv = Conversation([Turn("user", long_q), Turn("assistant", long_a)])
    t = get_template("chatml")
    full = tokenize_conversation(conv, tok, t, TokenizeSettings(cutoff_len=4096))
    n_src = full["labels"].index(next(x for x in full["labels"] if x != IGNORE_INDEX))
    src, tgt = full["input_ids"][:n_src], full["input_ids"][n_src:]
    (ex, status), = encode_conversation(conv, tok, t, TokenizeSettings(max_source_length=10, max_target_length=7))
    assert status == "truncated"
    # The prompt keeps its end (the answer header), the answer its start.
    assert ex["input_ids"] == src[-10:] + tgt[:7] and ex["labels"] == [IGNORE_INDEX] * 10 + tgt[:7]
    (ex, status), = encode_conversation(conv, tok, t, TokenizeSettings(cutoff_len=20))
    assert status == "truncated" and len(ex["input_ids"]) == 20 and ex["input_ids"][-10:] == tgt[:10]
    assert encode_conversation(conv, tok, t, TokenizeSettings(cutoff_len=20, skip_overlength=True)) == [
        (None, "overlength")]
    examples, stats = build_dataset([conv, CHAT], tok, t, TokenizeSettings(cutoff_len=20, skip_overlength=True),
                                    use_cache=False, progress=False)
    assert stats.skipped_overlength == 2 and stats.examples == 0 and stats.conversations == 2
    examples, stats = build_dataset([conv], tok, t, TokenizeSettings(cutoff_len=20), use_cache=False,
                                    progress=False)
    assert stats.truncated == 1 and "1 truncated" in stats.summary()
    with pytest.raises(ConfigError):
        TokenizeSettings(cutoff_len=0)


def test_cache_serves_second_run_and_keys_on_content(tok, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes((SAMPLES / "openai.jsonl").read_bytes())
    t = get_template("chatml")
    s = TokenizeSettings()
    first, st1 = build_dataset(str(data), tok, t, s, cache_dir=tmp_path / "c", progress=False)
    second, st2 = build_dataset(str(data), tok, t, s, cache_dir=tmp_path / "c", progress=False)
    assert not st1.from_cache and st2.from_cache and first == second
    assert st2.examples == st1.examples == 2 and st2.trained_tokens == st1.trained_tokens
    _, st3 = build_dataset(str(data), tok, t, TokenizeSettings(last_turn_only=True), cache_dir=tmp_path / "c",
                           progress=False)
    assert not st3.from_cache
    _, st4 = build_dataset(str(data), tok, get_template("alpaca"), s, cache_dir=tmp_path / "c", progress=False)
    assert not st4.from_cache
    data.write_bytes(data.read_bytes() + (SAMPLES / "openai.jsonl").read_bytes())
    more, st5 = build_dataset(str(data), tok, t, s, cache_dir=tmp_path / "c", progress=False)
    assert not st5.from_cache and len(more) == 4


def test_a_cache_hit_from_copied_files_names_the_paths_of_this_run(tok, tmp_path):
    # The cache is found by content: the same bad file copied elsewhere (and into a folder) is served from the
    # entry the first path wrote, but the report must name the paths this run was given.
    first = tmp_path / "a" / "bad.jsonl"
    first.parent.mkdir()
    first.write_bytes((SAMPLES / "bad" / "missing_field.jsonl").read_bytes())
    moved = tmp_path / "b" / "bad.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(first.read_bytes())
    runs = [build_dataset(str(p), tok, get_template("chatml"), on_bad_record="skip", cache_dir=tmp_path / "c",
                          progress=False)[1] for p in (first, moved)]
    assert not runs[0].from_cache and runs[1].from_cache
    assert [s["source"] for s in runs[1].sources] == [str(moved)]
    assert runs[1].bad_records == [[str(moved), 2, "output", "missing field"]]
    # A folder given as one mixed source: its files are renamed under the new folder.
    from finechat.data.mixing import MixSettings

    mixed = [build_dataset([str(p.parent)], tok, get_template("chatml"), mix=MixSettings(ratios=[1.0]),
                           on_bad_record="skip", cache_dir=tmp_path / "c", progress=False)[1] for p in (first, moved)]
    assert mixed[1].from_cache and [s["source"] for s in mixed[1].sources] == [str(moved.parent)]
    assert mixed[1].bad_records == [[str(moved), 2, "output", "missing field"]]


def test_missing_file_and_folder_input(tok, tmp_path):
    from finechat.errors import DataError

    with pytest.raises(DataError, match="missing.jsonl: no such data file"):
        build_dataset(str(tmp_path / "missing.jsonl"), tok, get_template("chatml"), use_cache=False, progress=False)
    (tmp_path / "d").mkdir()
    for name in ("openai.jsonl", "dolly.jsonl"):
        (tmp_path / "d" / name).write_bytes((SAMPLES / name).read_bytes())
    examples, stats = build_dataset(str(tmp_path / "d"), tok, get_template("chatml"), cache_dir=tmp_path / "c",
                                    progress=False)
    assert stats.conversations == 5 and len(examples) == 5


def test_skipped_bad_records_are_listed_in_the_stats_also_from_cache(tok, tmp_path):
    bad = SAMPLES / "bad" / "missing_field.jsonl"
    for _ in range(2):
        examples, stats = build_dataset(str(bad), tok, get_template("chatml"), on_bad_record="skip",
                                        cache_dir=tmp_path, progress=False)
        assert len(examples) == 1 and stats.skipped_records == 1
        assert stats.bad_records == [[str(bad), 2, "output", "missing field"]]
        assert "1 bad records skipped" in stats.summary()
    assert stats.from_cache


def test_exact_special_token_ids(tok):
    # The tiny tokenizer's special tokens have fixed ids: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2 ...
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<eom>"]) == [0, 1, 2, 5]
    conv = Conversation([Turn("user", "hi"), Turn("assistant", "ok")])
    ex = tokenize_conversation(conv, tok, get_template("chatml"))
    assert ex["input_ids"][0] == 1 and ex["input_ids"][-1] == 2
    assert ex["labels"][-1] == 2 and ex["labels"][:-1].count(2) == 0  # the prompt's <|im_end|> is not trained
    assert ex["input_ids"].count(1) == 2  # <|im_start|>user, <|im_start|>assistant
    moss = tokenize_conversation(conv, tok, get_template("moss"))
    assert moss["labels"][-1] == 5 and moss["labels"].count(4) == 0 and 4 in moss["input_ids"]  # <eom> / <eoh>
    alpaca = tokenize_conversation(conv, tok, get_template("alpaca"))
    assert alpaca["labels"][-1] == 0  # alpaca ends answers with EOS


@pytest.mark.parametrize("sample", ["adgen.json", "sharegpt_tools.json", "moss_plugin.jsonl", "sharegpt.json"])
def test_several_processes_give_the_same_rows(tok, sample):
    # workers get plain (role, text) tuples and the tools, not the Conversations: system texts, tool
    # definitions and tool turns must arrive as they were
    convs = read_conversations(SAMPLES / sample).conversations * 4
    t = get_template("chatml")
    one, s1 = build_dataset(convs, tok, t, num_proc=1, use_cache=False, progress=False)
    two, s2 = build_dataset(convs, tok, t, num_proc=2, use_cache=False, progress=False)
    assert one == two and s1.tokens == s2.tokens and s1.examples == len(one) > 0


def test_packing_keeps_attention_per_example(tok):
    import torch

    t = get_template("chatml")
    convs = read_conversations(SAMPLES / "openai.jsonl").conversations
    examples = [tokenize_conversation(c, tok, t) for c in convs]
    rows = pack_examples(examples, max_length=4096)
    assert len(rows) == 1 and rows[0]["seq_lengths"] == [len(e["input_ids"]) for e in examples]
    n0 = len(examples[0]["input_ids"])
    assert rows[0]["position_ids"] == list(range(n0)) + list(range(len(examples[1]["input_ids"])))
    assert rows[0]["labels"][n0] == IGNORE_INDEX  # no example learns the next one's first token
    model = make_tiny_llama(vocab_size=len(tok))
    batch = data_collator(tok)(rows)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        alone = model(input_ids=torch.tensor([examples[1]["input_ids"]])).logits[0]
    # [seq, vocab]: the second example's logits are the same packed or alone.
    torch.testing.assert_close(packed[n0:], alone, atol=1e-4, rtol=1e-4)


def test_packing_refuses_to_cut_an_example():
    from finechat.errors import DataError

    with pytest.raises(DataError, match="does not fit a packed row of 3"):
        pack_examples([{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}], max_length=3)


def test_collator_pads_labels_with_ignore_index(tok):
    collate = data_collator(tok, pad_to_multiple_of=8)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == [9] + [tok.pad_token_id] * 7
    assert batch["labels"][1].tolist() == [9] + [IGNORE_INDEX] * 7
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0, 0, 0, 0]


def test_real_chatglm_tokenizer_gets_mark_before_the_answer(tmp_path):
    pytest.importorskip("finechat.models.chatglm.tokenization_chatglm")
    from chatglm_tiny import make_ice_text

    from finechat.models.chatglm.tokenization_chatglm import ChatGLMTokenizer

    tok = ChatGLMTokenizer(str(make_ice_text(tmp_path)))
    t = get_template("chatglm")
    conv = Conversation(CHAT.turns)
    examples = [e for e, _ in encode_conversation(conv, tok, t, TokenizeSettings())]
    assert len(examples) == 2
    for ex, n in zip(examples, (2, 4)):
        # The ids before the answer are exactly what ChatModel.encode_prompt gives for that prompt.
        prompt_ids = tok(t.render(conv.messages()[: n - 1], tok.eos_token))["input_ids"]
        assert tok.convert_ids_to_tokens(prompt_ids[-2:]) == ["[gMASK]", "<sop>"]
        assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
        assert all(x == IGNORE_INDEX for x in ex["labels"][: len(prompt_ids)])
        assert ex["labels"][len(prompt_ids):] == ex["input_ids"][len(prompt_ids):]
        assert tok.convert_ids_to_tokens(ex["input_ids"][-1]) == "<eop>"
