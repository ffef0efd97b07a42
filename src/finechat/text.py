"""Small text rules shared across layers (no torch, no transformers), so that each exists once.

``clean_chatglm_response`` is ChatGLM-6B's answer clean-up (the reference's ``process_response``): the
native model's ``chat`` (``finechat.models``) and the ``chatglm`` template (``finechat.data``) both apply
it; it sits down here because the data layer must not import ``finechat.models`` (which registers ChatGLM
with transformers) for a regex.
"""

from __future__ import annotations

import re

_CJK = "\u4e00-\u9fff"
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}


def clean_chatglm_response(text: str) -> str:
    """Strip, and make ASCII , ! : ; ? full-width where they touch a CJK character."""
    text = text.strip()
    for ascii_mark, full in _FULL_WIDTH.items():
        mark = re.escape(ascii_mark)
        text = re.sub(rf"([{_CJK}]){mark}", rf"\g<1>{full}", text)
        text = re.sub(rf"{mark}([{_CJK}])", rf"{full}\g<1>", text)
    return text
