"""The attribution loss: fit a pair score in [0, 1] to a soft ground truth in [0, 1].

Two terms: a squared error on the calibrated score (so scores read as MONTRAGE-style soft ground
truth, e.g. proportions) and a listwise ranking term per query (softmax cross-entropy between the
target distribution and the raw combined similarity), because attribution is consumed as a ranking.
"""
from __future__ import annotations

import torch


def shifted_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(1 + cos) / 2 between rows of a (Q, F) and rows of b (N, F): (Q, N) in [0, 1]."""
    a = a / (a.norm(dim=-1, keepdim=True) + eps)
    b = b / (b.norm(dim=-1, keepdim=True) + eps)
    return (1.0 + a @ b.transpose(-1, -2)) / 2.0


def listwise_ranking_loss(raw: torch.Tensor, target: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Mean over queries of CE(softmax(target / T), softmax(raw / T)); rows of ``target`` need not sum to 1."""
    p = torch.softmax(target / temperature, dim=-1)
    logq = torch.log_softmax(raw / temperature, dim=-1)
    return -(p * logq).sum(-1).mean()


def attribution_loss(raw: torch.Tensor, calibrated: torch.Tensor, target: torch.Tensor,
                     rank_weight: float = 1.0, temperature: float = 0.05) -> torch.Tensor:
    """MSE(calibrated, target) + rank_weight * listwise ranking loss on ``raw``; all (Q, N)."""
    mse = (calibrated - target).pow(2).mean()
    return mse + rank_weight * listwise_ranking_loss(raw, target, temperature)
