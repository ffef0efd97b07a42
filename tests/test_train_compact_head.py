"""DPO's compact LM head: TRL's numbers and gradients from answer positions only, TRL's head kept where it scales."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("trl")


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def _batch():
    ids = torch.randint(5, 500, (4, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :12] = -100  # the prompt
    labels[2, 17:] = -100  # padding after a shorter answer
    return ids, labels


def _run(model, ids, labels):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    (out.log_probs.sum(1) * torch.tensor([1.0, -2.0, 3.0, 0.5])).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out, grads


def test_compact_head_gives_trls_numbers_from_answer_positions_only(tiny_model_dir, monkeypatch):
    import trl.kernels

    from finechat.train import compact_head

    ids, labels = _batch()
    trl_out, trl_grads = _run(_model(tiny_model_dir), ids, labels)

    real = trl.kernels.ChunkedLogProbFunction
    rows: list[int] = []
    spy = types.SimpleNamespace(apply=lambda hidden, *rest: rows.append(len(hidden)) or real.apply(hidden, *rest))
    monkeypatch.setattr(trl.kernels, "ChunkedLogProbFunction", spy)
    monkeypatch.setattr(compact_head, "MIN_VOCAB_TILE", 64)  # several vocabulary tiles on the tiny vocabulary
    monkeypatch.setattr(compact_head, "TILE_VALUES", 1)
    model = _model(tiny_model_dir)
    assert compact_head.compact_log_prob_head(model)
    out, grads = _run(model, ids, labels)

    answer_positions = int((labels[:, 1:] != -100).sum())
    assert rows == [answer_positions] and answer_positions < ids.shape[0] * (ids.shape[1] - 1)
    for field in ("log_probs", "entropy", "mean_logits", "loss"):
        assert torch.allclose(getattr(out, field), getattr(trl_out, field), atol=1e-5), field
    assert torch.equal(out.is_top1, trl_out.is_top1) and torch.equal(out.label_mask, trl_out.label_mask)
    assert torch.allclose(grads, trl_grads, atol=1e-4, rtol=1e-4)
    # without fused_lm_head the model is the plain causal LM (generation is unchanged)
    assert model(input_ids=ids).logits.shape == (4, 20, model.config.vocab_size)


def test_vocabulary_tiles_narrow_with_the_rows():
    from finechat.train.compact_head import vocab_tile

    assert vocab_tile(8) == 32768 and vocab_tile(95) == 8192 and vocab_tile(4096) == 4096


def test_heads_trl_scales_keep_trls_own(tiny_model_dir):
    from finechat.train.compact_head import compact_log_prob_head

    model = _model(tiny_model_dir)
    model.config.final_logit_softcapping = 30.0
    trl_forward = model.forward
    assert not compact_log_prob_head(model) and model.forward is trl_forward
