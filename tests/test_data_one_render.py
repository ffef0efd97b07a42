"""One render per conversation (TokenizerTemplate's marked render) gives exactly the prefix renders' rows.

Each check tokenizes the same conversations twice: the way finechat does now (one render, once the template
passes its probe) and the old way (``_one_render = False``: two renders per answer plus one), and asserts equal
input_ids and labels, for several templates, settings and conversation shapes.
"""

import copy

import pytest
from tiny import make_tokenizer

from finechat.data.conversation import Conversation, Turn
from finechat.data.templates import TokenizerTemplate
from finechat.data.tokenize import TokenizeSettings, encode_conversation
from finechat.errors import FinechatError

CONVERSATIONS = [
    Conversation([Turn("user", "What is the capital of France?"), Turn("assistant", "Paris.")]),
    Conversation([Turn("user", "你好"), Turn("assistant", "你好！有什么可以帮你？")], system="你是一个助手。"),
    Conversation([Turn("user", "Hello"), Turn("assistant", "Hi\n"), Turn("user", " two "),
                  Turn("assistant", " spaced answer "), Turn("user", "类型#上衣*颜色#白色"),
                  Turn("assistant", "这件外套采用简约的设计，白色的颜色搭配精致的刺绣图案。\n\n")], system="Be brief."),
    Conversation([Turn("user", "empty answer"), Turn("assistant", ""), Turn("user", "again"),
                  Turn("assistant", "ok")]),
    Conversation([Turn("user", "The quick brown fox " * 40), Turn("assistant", "jumps over the lazy dog. " * 40)]),
    Conversation([Turn("user", "marks \ue000 in text"), Turn("assistant", "kept \ue001 too")]),
    Conversation([Turn("user", "ends with a question"), Turn("assistant", "answer"), Turn("user", "and?")]),
]

SETTINGS = [
    TokenizeSettings(),
    TokenizeSettings(cutoff_len=24),
    TokenizeSettings(max_source_length=10, max_target_length=8),
    TokenizeSettings(train_on_prompt=True),
    TokenizeSettings(last_turn_only=True, cutoff_len=40),
    TokenizeSettings(skip_overlength=True, cutoff_len=30),
]

TEMPLATES = {
    "chatml": None,  # tiny.CHATML_TEMPLATE
    "eos on the last answer only": (  # not growing prefixes: multi-turn conversations are refused
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' and loop.last %}<|endoftext|>{% else %}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "no end marker": (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"),
    "trims content": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "default system prompt": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}


def encode_or_error(conv, tok, template, settings):
    try:
        return encode_conversation(conv, tok, template, settings)
    except FinechatError as e:  # a template that does not grow by prefixes: the same error both ways
        return repr(e)


def rows(tok, template, settings, one_render):
    template._one_render = None if one_render else False
    out = [encode_or_error(c, tok, template, settings) for c in copy.deepcopy(CONVERSATIONS)]
    return out, template._one_render


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_one_render_rows_equal_prefix_render_rows(name):
    tok = make_tokenizer()
    if TEMPLATES[name] is not None:
        tok.chat_template = TEMPLATES[name]
    template = TokenizerTemplate(tok)
    for settings in SETTINGS:
        new, used = rows(tok, template, settings, one_render=True)
        old, _ = rows(tok, template, settings, one_render=False)
        assert new == old, (name, settings)
    # the templates that render answers as they are take the one-render path; trimming answers does not
    assert used is (name not in ("trims content", "eos on the last answer only"))
    assert any(isinstance(r, str) for r in new) is (name == "eos on the last answer only")


def test_one_render_segments_are_the_prefix_segments():
    tok = make_tokenizer()
    template = TokenizerTemplate(tok)
    for conv in CONVERSATIONS:
        messages = conv.messages()
        assert template.segments(messages) == template._segments_by_prefixes(messages, False, None)
    assert template._one_render is True
    assert template._turn_end == "<|im_end|>\n"
    # the compiled template (checked equal to apply_chat_template), rendered once per shape (it only pastes texts)
    assert template._render.__name__ == "fast"


@pytest.mark.slow
def test_one_render_on_the_default_models_template():
    """The real default model's chat template (SmolLM2): same rows both ways on generated ADGEN records."""
    import random

    from transformers import AutoTokenizer

    from finechat.data.synthetic import adgen_record
    from finechat.models.resolve import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    template = TokenizerTemplate(tok)
    rng = random.Random(0)
    convs = copy.deepcopy(CONVERSATIONS) + [
        Conversation([Turn("user", r["content"]), Turn("assistant", r["summary"])]) for r in
        (adgen_record(rng) for _ in range(50))]
    for settings in (TokenizeSettings(), TokenizeSettings(cutoff_len=64), TokenizeSettings(last_turn_only=True)):
        template._one_render = None
        new = [encode_conversation(c, tok, template, settings) for c in convs]
        assert template._one_render is True
        template._one_render = False
        old = [encode_conversation(c, tok, template, settings) for c in convs]
        assert new == old
