"""ChatGLM-6B's answer clean-up (the reference's ``process_response``): ``model.chat`` and the ``chatglm`` template.

No torch here: ``finechat.data.templates`` imports it for the template.
"""

from __future__ import annotations

import re

_CJK = "\u4e00-\u9fff"
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}


def clean_response(text: str) -> str:
    """Strip, and make ASCII , ! : ; ? full-width where they touch a CJK character."""
    text = text.strip()
    for ascii_mark, full in _FULL_WIDTH.items():
        mark = re.escape(ascii_mark)
        text = re.sub(rf"([{_CJK}]){mark}", rf"\g<1>{full}", text)
        text = re.sub(rf"{mark}([{_CJK}])", rf"{full}\g<1>", text)
    return text
