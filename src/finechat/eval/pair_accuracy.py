"""Held-out preference accuracy of a policy: does its log-ratio against a reference prefer the chosen answer?

For a pair (x, chosen, rejected) the implicit reward margin of DPO (Rafailov et al. 2023, eq. 7, without
beta) is ``[log pi(c|x) - log ref(c|x)] - [log pi(r|x) - log ref(r|x)]``; the accuracy is the share of pairs
with a positive margin, a tie counting one half (so a policy equal to its reference scores exactly 0.5:
chance). Log-probabilities are summed over the answer tokens as SFT trains them (the prompt never counts).
The reference is the same model with its adapter disabled, or another model given explicitly.
"""

from __future__ import annotations

import contextlib
from typing import Any

from finechat.data.pairs import PreferencePair, split_answer
from finechat.data.tokenize import special_token_layout


def answer_logps(model: Any, rows: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[float]:
    """Sum of log p(answer tokens | prompt) for each (prompt ids, answer ids)."""
    import torch

    device = next(model.parameters()).device
    out: list[float] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        seqs = [p + a for p, a in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # [batch, seq, vocab]
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # [batch, seq-1]
        for i, (p, a) in enumerate(chunk):
            out.append(float(logp[i, len(p) - 1: len(p) - 1 + len(a)].sum()))
    if was_training:
        model.train()
    return out


def disabled_adapter(model: Any):
    """A context in which ``model`` runs without its adapter (its base), or as it is when it has none."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def pair_logps(model: Any, tokenizer: Any, template: Any, pairs: list[PreferencePair], batch_size: int = 8
               ) -> tuple[list[float], list[float]]:
    """(chosen, rejected) answer log-probabilities of ``model`` for each pair, one forward pass over both sides."""
    layout = special_token_layout(tokenizer, template)
    rows = [split_answer(p.prompt, p.chosen, tokenizer, template, layout) for p in pairs]
    rows += [split_answer(p.prompt, p.rejected, tokenizer, template, layout) for p in pairs]
    logps = answer_logps(model, rows, batch_size)
    return logps[: len(pairs)], logps[len(pairs):]


def preference_scores(policy: tuple[list[float], list[float]], reference: tuple[list[float], list[float]]
                      ) -> dict[str, float]:
    """Accuracy and mean log-ratio margin from (chosen, rejected) log-probabilities of a policy and its reference."""
    (policy_c, policy_r), (ref_c, ref_r) = policy, reference
    margins = [(pc - rc) - (pr - rr) for pc, rc, pr, rr in zip(policy_c, ref_c, policy_r, ref_r)]
    wins = sum(1.0 if m > 1e-6 else 0.5 if abs(m) <= 1e-6 else 0.0 for m in margins)
    raw = sum(1.0 if c > r else 0.0 for c, r in zip(policy_c, policy_r))
    n = max(len(margins), 1)
    return {"pairs": len(margins), "preference accuracy": wins / n, "log-ratio margin": sum(margins) / n,
            "logp accuracy": raw / n}


def preference_accuracy(model: Any, tokenizer: Any, template: Any, pairs: list[PreferencePair],
                        reference: Any = None, batch_size: int = 8) -> dict[str, float]:
    """Accuracy and mean log-ratio margin of ``model`` against ``reference`` (default: ``model`` with its adapter
    off; a model without an adapter and no reference is its own reference and scores 0.5)."""
    policy = pair_logps(model, tokenizer, template, pairs, batch_size)
    if reference is not None:
        ref = pair_logps(reference, tokenizer, template, pairs, batch_size)
    else:
        with disabled_adapter(model):
            ref = pair_logps(model, tokenizer, template, pairs, batch_size)
    return preference_scores(policy, ref)
