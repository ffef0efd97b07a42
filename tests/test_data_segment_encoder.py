"""The piece-caching encoder (finechat.data.segment_encoder) gives exactly the Rust tokenizer's ids."""

import pytest
from tiny import make_tokenizer
from tokenizers import AddedToken

from finechat.data.segment_encoder import SegmentEncoder

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
TEXTS = [
    SYSTEM + "<|im_start|>user\n类型#上衣*颜色#白色<|im_end|>\n<|im_start|>assistant\n",
    "这件外套采用简约的设计。<|im_end|>",
    "\n",
    SYSTEM + "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
    "Hi!<|im_end|>",
    "\n",
    "",
    "<|im_end|><|im_end|>",  # nothing but added tokens
    "<|im_start|",  # almost an added token: plain text
    " <|im_start|> spaced <|im_end|> ",
    "a<|endoftext|>b<|im_start|>",
    "  leading and trailing spaces  ",
]


def direct(tok, texts):
    return [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def test_ids_equal_the_tokenizers_own_over_several_batches():
    tok = make_tokenizer()
    enc = SegmentEncoder(tok.backend_tokenizer)
    assert enc.enabled
    for _ in range(3):  # the second and third batches are served from the kept pieces
        assert enc.encode(TEXTS) == direct(tok, TEXTS)
    assert enc.enabled
    # the repeated pieces were kept, the ones seen once were not
    assert "\n" in enc.cache and "system\nYou are a helpful assistant." in enc.cache
    assert "这件外套采用简约的设计。" not in enc.cache
    shuffled = TEXTS[::-1] + ["new text " * 30]
    assert enc.encode(shuffled) == direct(tok, shuffled)


@pytest.mark.parametrize("flag", ["lstrip", "rstrip", "single_word"])
def test_added_tokens_that_change_the_text_around_them_turn_it_off(flag):
    tok = make_tokenizer()
    tok.backend_tokenizer.add_special_tokens([AddedToken("<tool>", **{flag: True})])
    enc = SegmentEncoder(tok.backend_tokenizer)
    texts = ["call  <tool>  now", "<tool>x", "x <tool>"]
    assert not enc.enabled
    assert enc.encode(texts) == direct(tok, texts)


def test_a_first_batch_that_differs_turns_it_off():
    tok = make_tokenizer()
    enc = SegmentEncoder(tok.backend_tokenizer)
    enc.ids = {content: 7 for content in enc.ids}  # as if the added tokens were matched wrongly
    assert enc.encode(TEXTS) == direct(tok, TEXTS)
    assert not enc.enabled and enc.cache == {}
    assert enc.encode(TEXTS) == direct(tok, TEXTS)
