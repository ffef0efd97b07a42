"""Rendering a chat template once per shape (finechat.data.template_shapes) equals rendering it in full.

Only templates that paste message texts qualify (read from the template's syntax tree); the rest render as
before. Templates are compiled by transformers, as apply_chat_template compiles them.
"""

import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from finechat.data.template_shapes import shape_renderer

PASTING = {
    "chatml with a default system prompt (SmolLM2's)": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "attributes, type tests, the system text apart, a key the messages lack": (
        "{% if messages[0].role == 'system' %}<<SYS>>{{ messages[0].content }}<</SYS>>{% endif %}"
        "{% for m in messages %}{% if m.role != 'system' and m.content is string and not m.tool_calls %}"
        "[{{ loop.index }}/{{ messages|length }}]{{ m.role ~ ': ' ~ m.content }}\n{% endif %}{% endfor %}"),
}

NOT_PASTING = {
    "trims": "{% for m in messages %}{{ m['content'] | trim }}{% endfor %}",
    "searches": "{% for m in messages %}{% if '<think>' in m['content'] %}T{% endif %}{{ m['content'] }}{% endfor %}",
    "compares": "{% for m in messages %}{% if m['content'] == '' %}E{% endif %}{{ m['content'] }}{% endfor %}",
    "tests truth": "{% for m in messages %}{% if m.content %}{{ m.content }}{% endif %}{% endfor %}",
    "stores": "{% for m in messages %}{% set c = m['content'] %}{{ c }}{% endfor %}",
    "splits": "{% for m in messages %}{{ m.content.split('x')[0] }}{% endfor %}",
    "calls a method of a message": "{% for m in messages %}{{ m.get('content') }}{% endfor %}",
    "filters the list": "{{ messages | tojson }}",
    "looks at the previous message": "{% for m in messages %}{{ loop.previtem }}{{ m.content }}{% endfor %}",
    "captures in a block": "{% for m in messages %}{% set b %}{{ m.content }}{% endset %}{{ b|upper }}{% endfor %}",
    "indexes by a variable": "{% for m in messages %}{{ messages[loop.index0].content }}{% endfor %}",
}

TEXTS = ["Hello", "", "  padded  ", "你好！\n\n有什么可以帮你？", "{{ not jinja }}", "a\ue000b\ue001c", "x" * 500]


def conversations():
    out = []
    for i, text in enumerate(TEXTS):
        other = TEXTS[(i + 3) % len(TEXTS)]
        out.append([{"role": "user", "content": text}, {"role": "assistant", "content": other}])
        out.append([{"role": "system", "content": other}, {"role": "user", "content": text},
                    {"role": "assistant", "content": text}, {"role": "user", "content": other},
                    {"role": "assistant", "content": other}])
    return out


def full_renderer(source, calls=None):
    compiled = _compile_jinja_template(source)

    def render(messages):
        if calls is not None:
            calls.append(len(messages))
        return compiled.render(messages=messages, add_generation_prompt=False)

    return compiled, render


@pytest.mark.parametrize("name", list(PASTING))
def test_pasting_templates_render_once_per_shape_and_equal_the_full_render(name):
    calls = []
    compiled, render = full_renderer(PASTING[name], calls)
    fast = shape_renderer(compiled.environment, PASTING[name], render)
    assert fast is not None
    convs = conversations()
    got = [fast(c) for c in convs]
    rendered = len(calls)
    assert got == [render(c) for c in convs]
    # two shapes (user-assistant; system + two rounds): a placeholder render and a checking render each
    assert rendered == 4


@pytest.mark.parametrize("name", list(NOT_PASTING))
def test_templates_that_read_the_texts_are_rendered_in_full(name):
    compiled, render = full_renderer(NOT_PASTING[name])
    assert shape_renderer(compiled.environment, NOT_PASTING[name], render) is None


def test_a_shape_whose_pasted_render_differs_renders_in_full():
    # syntactically pasting, but the render function given strips every text: the first check catches it
    source = PASTING["chatml with a default system prompt (SmolLM2's)"]
    compiled, _ = full_renderer(source)

    def stripping(messages):
        return compiled.render(messages=[{**m, "content": m["content"].strip()} for m in messages],
                               add_generation_prompt=False)

    fast = shape_renderer(compiled.environment, source, stripping)
    convs = [[{"role": "user", "content": " a "}, {"role": "assistant", "content": "b "}],
             [{"role": "user", "content": "c"}, {"role": "assistant", "content": " d"}]]
    assert [fast(c) for c in convs] == [stripping(c) for c in convs]


def test_texts_holding_a_placeholder_character_render_in_full():
    source = PASTING["chatml with a default system prompt (SmolLM2's)"]
    compiled, render = full_renderer(source)
    fast = shape_renderer(compiled.environment, source, render)
    odd = [{"role": "user", "content": "\U000f0001"}, {"role": "assistant", "content": "\U000f0000 x"}]
    plain = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert fast(odd) == render(odd)
    assert fast(plain) == render(plain)
