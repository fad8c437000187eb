"""The attribution loss: fit a pair score in [0, 1] to a soft ground truth in [0, 1].

Two terms: a squared error on the calibrated score (so scores read as MONTRAGE-style soft ground
truth, e.g. proportions) and a listwise ranking term per query (softmax cross-entropy between the
target distribution and the raw combined similarity), because attribution is consumed as a ranking.
:func:`concept_ranking_loss` adds the between-concept view: attribution is also read per concept (the
mean of a concept's top training-image scores), so the query's own concept should win that ranking.
"""
from __future__ import annotations

import torch


def shifted_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(1 + cos) / 2 between rows of a (Q, F) and rows of b (N, F): (Q, N) in [0, 1]."""
    a = a / (a.norm(dim=-1, keepdim=True) + eps)
    b = b / (b.norm(dim=-1, keepdim=True) + eps)
    return (1.0 + a @ b.transpose(-1, -2)) / 2.0


def listwise_ranking_loss(raw: torch.Tensor, target: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Mean over queries of CE(softmax(target / T), softmax(raw / T)); rows of ``target`` need not sum to 1.
    (..., Q, N) -> (...): leading dimensions are independent problems (e.g. held-out folds fitted together)."""
    p = torch.softmax(target / temperature, dim=-1)
    logq = torch.log_softmax(raw / temperature, dim=-1)
    return -(p * logq).sum(-1).mean(-1)


def attribution_loss(raw: torch.Tensor, calibrated: torch.Tensor, target: torch.Tensor,
                     rank_weight: float = 1.0, temperature: float = 0.05) -> torch.Tensor:
    """MSE(calibrated, target) + rank_weight * listwise ranking loss on ``raw``; all (..., Q, N) -> (...)."""
    mse = (calibrated - target).pow(2).mean((-2, -1))
    return mse + rank_weight * listwise_ranking_loss(raw, target, temperature)


def concept_scores_soft(raw: torch.Tensor, members: torch.Tensor, top: int = 3) -> torch.Tensor:
    """(..., Q, C) concept scores of (..., Q, N) raw scores: the mean of each concept's ``top`` best raw scores
    (members: (C, N) bool)."""
    cols = []
    for c in range(members.shape[0]):
        sub = raw[..., members[c]]
        cols.append(sub.topk(min(top, sub.shape[-1]), dim=-1).values.mean(-1))
    return torch.stack(cols, -1)


def concept_ranking_loss(raw: torch.Tensor, members: torch.Tensor, target: torch.Tensor, top: int = 3,
                         temperature: float = 1.0) -> torch.Tensor:
    """Mean over queries with a concept (``target`` >= 0, an index into members' rows) of the cross-entropy
    of the softmax over concept scores (:func:`concept_scores_soft`) against the query's own concept; 0 without
    such a query. (..., Q, N) raw and (..., Q) target -> (...)."""
    if members.shape[0] < 2:
        return raw.sum((-2, -1)) * 0.0
    ok = (target >= 0).to(raw.dtype)
    logp = torch.log_softmax(concept_scores_soft(raw, members, top) / temperature, dim=-1)
    own = logp.gather(-1, target.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    return -(own * ok).sum(-1) / ok.sum(-1).clamp(min=1.0)


def counterfactual_loss(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """1 - mean over queries of the Pearson correlation, across retrained subsets m, between the predicted effect
    -(sum of the query's scores over subset m) and the query's denoising loss under the model retrained on m: the
    differentiable form of D-TRAK's LDS (a Spearman). ``scores`` (Q, N), ``masks`` (M, N) in {0, 1}, ``losses``
    (M, Q); needs M >= 2."""
    pred = -(masks.to(scores.dtype) @ scores.T)  # (M, Q)
    p = pred - pred.mean(0, keepdim=True)
    y = losses.to(scores.dtype) - losses.to(scores.dtype).mean(0, keepdim=True)
    corr = (p * y).sum(0) / (p.norm(dim=0) * y.norm(dim=0) + 1e-12)
    return 1.0 - corr.mean()
