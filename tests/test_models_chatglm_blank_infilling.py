"""GLM blank infilling: hand-worked layouts for the three modes, and the model's mask for Part A / Part B."""

from __future__ import annotations

import random

import torch

from finechat.data.blank_infilling import (
    BlankInfillingBuilder,
    BlankInfillingCollator,
    BlankInfillingSettings,
    SpecialIds,
    build_example,
    sample_token_spans,
)
from finechat.models.chatglm.configuration_chatglm import ChatGLMConfig
from finechat.models.chatglm.modeling_chatglm import glm_attention_inputs

M, SM, G, S, E = 1, 2, 3, 4, 5
IDS = SpecialIds(mask=M, smask=SM, gmask=G, sop=S, eop=E)


class KeepOrder(random.Random):
    """A seeded Random whose shuffle keeps the order, so that layouts can be worked out by hand."""

    def shuffle(self, x):  # noqa: D401
        return None


def test_token_mode_layout_by_hand():
    tokens = list(range(10, 20))
    ex = build_example(tokens, [(2, 4), (6, 7)], M, IDS, KeepOrder(0))
    assert ex["input_ids"] == [10, 11, M, 14, 15, M, 17, 18, 19, S, 12, 13, S, 16, E]
    assert ex["position_ids"] == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 2, 2, 2, 5, 5, 5],
                                  [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 1, 2, 3]]
    # labels[t + 1] is what position t predicts: <sop> -> 12, 12 -> 13, 13 -> <eop>, <sop> -> 16, 16 -> <eop>
    assert ex["labels"] == [-100] * 10 + [12, 13, E, 16, E]
    assert ex["part_a_length"] == 9


def test_sentence_and_document_layouts_by_hand():
    tokens = [10, 11, 12, 20, 21, 30, 31, 32]  # sentences [0, 3), [3, 5), [5, 8)
    sentence = build_example(tokens, [(3, 5)], SM, IDS, KeepOrder(0))
    assert sentence["input_ids"] == [10, 11, 12, SM, 30, 31, 32, S, 20, 21, E]
    assert sentence["position_ids"] == [[0, 1, 2, 3, 4, 5, 6, 3, 3, 3, 3], [0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]]
    assert sentence["labels"] == [-100] * 8 + [20, 21, E]
    document = build_example(tokens, [(3, 8)], G, IDS, KeepOrder(0))
    assert document["input_ids"] == [10, 11, 12, G, S, 20, 21, 30, 31, 32, E]
    assert document["position_ids"] == [[0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3], [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]]
    assert document["labels"] == [-100] * 5 + [20, 21, 30, 31, 32, E]


def test_model_mask_part_a_bidirectional_part_b_causal():
    ex = build_example(list(range(10, 20)), [(2, 4), (6, 7)], M, IDS, KeepOrder(0))
    cfg = ChatGLMConfig(vocab_size=32, hidden_size=16, num_layers=1, num_attention_heads=2, bos_token_id=S,
                        eos_token_id=E, mask_token_id=M, gmask_token_id=G, pad_token_id=0)
    ids = torch.tensor([ex["input_ids"] + [0, 0]])  # right padding from the collator
    pad = torch.tensor([[1] * len(ex["input_ids"]) + [0, 0]])
    mask, _ = glm_attention_inputs(ids, pad, cfg)
    visible = ~mask[0, 0]
    a = ex["part_a_length"]
    assert visible[:a, :a].all() and not visible[:a, a:].any()  # Part A: both ways, never Part B
    for q in range(a, len(ex["input_ids"])):  # Part B: all of Part A and itself causally
        assert visible[q, :a].all() and visible[q, a:q + 1].all() and not visible[q, q + 1:].any()
    assert not visible[:, -2:].any() and not visible[-2:].any()  # pads see nothing, are seen by nothing


def test_token_spans_poisson_fifteen_percent_non_overlapping():
    settings = BlankInfillingSettings()
    rng = random.Random(0)
    ratios, lengths = [], []
    for _ in range(300):
        spans = sample_token_spans(200, rng, settings)
        ratios.append(sum(e - s for s, e in spans) / 200)
        lengths += [e - s for s, e in spans]
        for (s1, e1), (s2, _) in zip(spans, spans[1:]):
            assert e1 < s2  # at least one visible token between two spans
    assert abs(sum(ratios) / len(ratios) - 0.15) < 0.01
    assert 2.0 < sum(lengths) / len(lengths) < 4.0  # Poisson(3) truncated, last span cut to the ratio


class FakeTokenizer:
    """Whitespace tokens -> ids (a scripted stand-in so that spans can be checked by hand)."""

    all_special_ids = [M, SM, G, S, E]
    mask_token_id, smask_token_id, gmask_token_id, bos_token_id, eos_token_id = M, SM, G, S, E
    unk_token_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]}

    def convert_tokens_to_ids(self, token):
        return {"[MASK]": M, "[sMASK]": SM, "[gMASK]": G, "<sop>": S, "<eop>": E}.get(token, 0)

    def convert_ids_to_tokens(self, ids):
        inverse = {v: k for k, v in self.vocab.items()} | {M: "[MASK]", SM: "[sMASK]", G: "[gMASK]", S: "<sop>",
                                                              E: "<eop>"}
        return [inverse.get(i, "?") for i in ids]


def test_sentence_mode_masks_whole_sentences_with_smask():
    tok = FakeTokenizer()
    builder = BlankInfillingBuilder(tok, BlankInfillingSettings(seed=3))
    text = "a b c d 。 e f g 。 h i j k l 。 m n o 。"
    tokens, bounds = builder.tokenize(text)
    assert bounds == [(0, 5), (5, 9), (9, 15), (15, 19)]
    ex, mode = builder.example(tokens, bounds, "sentence")
    assert mode == "sentence"
    a = ex["part_a_length"]
    part_a = ex["input_ids"][:a]
    assert SM in part_a and M not in part_a
    masked = sum(1 for t in ex["labels"] if t not in (-100, E))
    assert masked >= 0.15 * len(tokens)
    # each Part B span is exactly one sentence
    spans, cur = [], []
    for t in ex["input_ids"][a:-1]:
        if t == S:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(t)
    spans.append(cur)
    sentences = [tokens[s:e] for s, e in bounds]
    assert all(span in sentences for span in spans)


def test_document_mode_one_gmask_span_at_the_end():
    tok = FakeTokenizer()
    builder = BlankInfillingBuilder(tok, BlankInfillingSettings(seed=5))
    tokens, bounds = builder.tokenize("p q r s t u v w x y")
    ex, _ = builder.example(tokens, bounds, "document")
    a = ex["part_a_length"]
    assert ex["input_ids"][a - 1] == G and ex["input_ids"][:a].count(G) == 1
    span = ex["input_ids"][a + 1:-1]
    assert ex["input_ids"][a] == S and ex["input_ids"][:a - 1] + span == tokens
    assert 0.5 * len(tokens) <= len(span) <= len(tokens)
    pos, block = ex["position_ids"]
    assert pos[a:] == [a - 1] * (len(ex["input_ids"]) - a) and block[a:] == list(range(1, len(span) + 3))


def test_collator_pads_positions_and_preview_shows_layout():
    from finechat.data.blank_infilling import preview_example

    exs = [build_example(list(range(10, 20)), [(2, 4)], M, IDS, KeepOrder(0)),
           build_example(list(range(10, 14)), [(1, 2)], M, IDS, KeepOrder(0))]
    batch = BlankInfillingCollator(pad_token_id=0)(exs)
    assert batch["position_ids"].shape == (2, 2, len(exs[0]["input_ids"]))
    assert batch["attention_mask"][1].sum().item() == len(exs[1]["input_ids"])
    text = preview_example("a b c d e f g h i j k l m n o p q r s t", FakeTokenizer(), mode="token")
    assert "Part A" in text and "Part B span" in text and "position" in text
