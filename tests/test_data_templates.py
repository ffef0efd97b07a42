import pytest

from finechat.data.templates import TEMPLATES, TokenizerTemplate, get_template, history_to_messages
from finechat.errors import ConfigError, DataError


def conv(*pairs, query=None, system=None):
    return history_to_messages(query, list(pairs), system)


def test_chatglm_matches_chatglm6b_prompt():
    msgs = conv(("你好", "你好！"), ("天气", "晴"), query="再见")
    prompt = TEMPLATES["chatglm"].render(msgs, eos_token="<eop>")
    assert prompt == "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：天气\n答：晴\n[Round 2]\n问：再见\n答："


def test_chatglm_training_segments_end_with_eos_only_on_last_answer():
    msgs = conv(("a", "b"), ("c", "d"))
    segs = TEMPLATES["chatglm"].segments(msgs, eos_token="<eop>")
    assert segs == [("[Round 0]\n问：a\n答：", False), ("b", True), ("\n", False),
                    ("[Round 1]\n问：c\n答：", False), ("d<eop>", True)]


def test_alpaca_and_moss_and_chatml():
    msgs = conv(query="Hi")
    assert TEMPLATES["alpaca"].render(msgs).endswith("### Instruction:\nHi\n\n### Response:\n")
    moss = TEMPLATES["moss"].render(conv(("q", "r"), query="q2"), add_generation_prompt=True)
    assert "<|Human|>: q<eoh>\n<|MOSS|>:r<eom>\n<|Human|>: q2<eoh>\n<|MOSS|>:" in moss
    chatml = TEMPLATES["chatml"].render(conv(query="x", system="s"))
    assert chatml == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_stop_strings_include_end_markers():
    assert "<eom>" in TEMPLATES["moss"].stops()
    assert "### Instruction:" in TEMPLATES["alpaca"].stops("</s>")
    assert "</s>" in TEMPLATES["alpaca"].stops("</s>")


def test_tokenizer_template_segments_concatenate_to_full_render(tiny_bot):
    tt = TokenizerTemplate(tiny_bot.tokenizer)
    msgs = conv(("hello", "hi there"), ("how?", "fine"), system="be nice")
    segs = tt.segments(msgs)
    assert "".join(t for t, _ in segs) == tt.render(msgs, add_generation_prompt=False)
    assert [t for t, lab in segs if lab] == ["hi there<|im_end|>", "fine<|im_end|>"]


def test_unknown_template_lists_choices():
    with pytest.raises(ConfigError, match="chatglm"):
        get_template("nope")


def test_bad_messages():
    with pytest.raises(DataError, match="unknown role"):
        TEMPLATES["chatml"].render([{"role": "robot", "content": "x"}])
    with pytest.raises(DataError, match="history"):
        history_to_messages("q", [("only one",)])
