"""Packing over the memory-mapped cache (PackedRows) gives exactly pack_examples' rows, built lazily."""

import random

import pytest
from tiny import make_tokenizer

from finechat.data.conversation import Conversation, Turn
from finechat.data.templates import get_template
from finechat.data.token_cache import PackedRows, TokenRows, build_dataset, longest_row, pack_rows
from finechat.data.tokenize import TokenizeSettings, pack_examples
from finechat.errors import DataError


def _convs(n):
    rng = random.Random(0)
    words = ["Paris", "北京", "the sea", "sky", "fox", "你好", "capital", "poem"]
    return [Conversation([Turn("user", " ".join(rng.choices(words, k=rng.randint(1, 30)))),
                          Turn("assistant", " ".join(rng.choices(words, k=rng.randint(1, 60))))])
            for _ in range(n)]


def test_packed_cache_rows_equal_pack_examples(tmp_path):
    tok, convs = make_tokenizer(), _convs(120)
    template = get_template("tokenizer", tok)
    plain, _ = build_dataset(convs, tok, template, TokenizeSettings(cutoff_len=256), use_cache=False, progress=False)
    expected = pack_examples(plain, 256)
    packed, _ = build_dataset(convs, tok, template, TokenizeSettings(cutoff_len=256, packing=True),
                              cache_dir=tmp_path, progress=False)
    assert isinstance(packed, PackedRows) and isinstance(packed.rows, TokenRows)
    assert 1 < len(packed) < len(plain) and list(packed) == expected
    assert packed[-1] == expected[-1] and packed[1:3] == expected[1:3]
    assert longest_row(packed) == max(len(r["input_ids"]) for r in expected)
    # what is held: where each packed row starts, not the rows
    assert len(packed._starts) == len(packed) + 1
    # a shuffled view (the training split) packs in its own order, as pack_examples of its rows
    cached, _ = build_dataset(convs, tok, template, TokenizeSettings(cutoff_len=256), cache_dir=tmp_path,
                              progress=False)
    order = list(range(len(cached)))
    random.Random(1).shuffle(order)
    view = cached.select(order[:90])
    assert list(pack_rows(view, 300)) == pack_examples(list(view), 300)
    with pytest.raises(DataError, match="does not fit a packed row of 10"):
        pack_rows(cached, 10)
