"""The two losses of Concept-TRAK (Park et al., 2025, arXiv:2507.06547), in pure torch.

Concept-TRAK scores training image i for a concept with TRAK's influence form, but replaces both
losses whose gradients it compares:

* **Training loss** (a diffusion-posterior-sampling reformulation of the denoising loss). For a
  training image x0 and a noised x_t, the model's x0-estimate x0_hat(x_t) defines the reward
  r(x_t) = -||x0_hat(x_t) - x0||^2. The target is the model's own noise prediction pushed along the
  reward gradient, ``stop_grad[eps_theta(x_t, c) + lambda_t * grad_{x_t} ||x0_hat - x0||^2]``, and the
  loss is its squared error to eps_theta(x_t, c). At the current weights the gradient of this loss is
  ``-2 lambda_t / d * J^T grad_x ||x0_hat - x0||^2`` (J = d eps_theta / d theta): the direction that
  would make the model reconstruct *this* image, rather than the generic denoising direction.
  (``eps`` in the target is the model's prediction, stop-gradiented, not the sampled noise: this is
  what makes the loss work on DDIM-inverted x_t too, where there is no sampled noise.)
* **Concept utility loss** (classifier-free-guidance style): with c the prompt and c- the same prompt
  without the concept phrase, the target is ``stop_grad[eps(c) + lambda_c (eps(c) - eps(c-))]`` and the
  loss is the squared error to eps_theta(x_t, c); its gradient is ``-2 lambda_c / d * J^T (eps(c) - eps(c-))``,
  the direction that strengthens the concept.

Losses live in epsilon space; v- and x0-prediction models are converted with the scheduler's
alpha-bar (``eps = sqrt(ab) v + sqrt(1 - ab) x_t`` for v-prediction). All losses are per sample
(mean over the non-batch dims), shape (B,). Imports nothing from montrage except its errors.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Sequence, Tuple, Union

import torch

from montrage.errors import ConfigError

Scalar = Union[float, torch.Tensor]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _per_sample(a: Scalar, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) tensor broadcastable against ``like`` (B, ...)."""
    a = torch.as_tensor(a, dtype=like.dtype, device=like.device)
    if a.dim() == 0:
        return a
    return a.reshape(-1, *([1] * (like.dim() - 1)))


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def eps_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: Scalar, prediction_type: str) -> torch.Tensor:
    """The noise estimate implied by a model output."""
    _check(prediction_type)
    ab = _per_sample(alpha_bar, x_t)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return ab.sqrt() * pred + (1 - ab).sqrt() * x_t
    return (x_t - ab.sqrt() * pred) / (1 - ab).sqrt()


def x0_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: Scalar, prediction_type: str) -> torch.Tensor:
    """The clean-sample estimate x0_hat implied by a model output (Tweedie / the scheduler's formula)."""
    _check(prediction_type)
    ab = _per_sample(alpha_bar, x_t)
    if prediction_type == "epsilon":
        return (x_t - (1 - ab).sqrt() * pred) / ab.sqrt()
    if prediction_type == "v_prediction":
        return ab.sqrt() * x_t - (1 - ab).sqrt() * pred
    return pred


def eps_regression_loss(pred: torch.Tensor, x_t: torch.Tensor, target: torch.Tensor, alpha_bar: Scalar,
                        prediction_type: str) -> torch.Tensor:
    """Per-sample mean squared error between the model's epsilon (converted from ``pred``) and ``target``."""
    eps = eps_from_prediction(pred.float(), x_t.float(), alpha_bar, prediction_type)
    return (eps - target.float()).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------- training loss (DPS)
def dps_guidance(model: Callable[[torch.Tensor], torch.Tensor], x_t: torch.Tensor, x0: torch.Tensor,
                 alpha_bar: Scalar, prediction_type: str, lam: Scalar = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(eps_theta(x_t), lam * grad_{x_t} ||x0_hat(x_t) - x0||^2), both detached.

    ``model`` maps x_t (B, ...) to the raw model output (conditioning and timesteps bound inside);
    samples must be independent in it (no batch statistics), so one backward gives every sample's
    input gradient. ``lam`` is a scalar or per-sample (B,).
    """
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        pred = model(x).float()
        x0_hat = x0_from_prediction(pred, x, alpha_bar, prediction_type)
        reward = (x0_hat - x0.float()).pow(2).flatten(1).sum(1)
        (g,) = torch.autograd.grad(reward.sum(), x)
        eps = eps_from_prediction(pred, x, alpha_bar, prediction_type)
    return eps.detach(), (_per_sample(lam, x) * g).detach()


def dps_target(model: Callable[[torch.Tensor], torch.Tensor], x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: Scalar,
               prediction_type: str, lam: Scalar = 1.0) -> torch.Tensor:
    """stop_grad[eps_theta(x_t) + lam * grad_{x_t} ||x0_hat(x_t) - x0||^2], shape of x_t (see :func:`dps_guidance`)."""
    eps, residual = dps_guidance(model, x_t, x0, alpha_bar, prediction_type, lam)
    return eps + residual


def dps_training_loss(pred: torch.Tensor, x_t: torch.Tensor, target: torch.Tensor, alpha_bar: Scalar,
                      prediction_type: str) -> torch.Tensor:
    """Concept-TRAK's training loss given the DPS target of :func:`dps_target`: (B,) per-sample MSE in eps space."""
    return eps_regression_loss(pred, x_t, target, alpha_bar, prediction_type)


@torch.no_grad()
def ddim_invert(model: Callable[[torch.Tensor, int], torch.Tensor], x0: torch.Tensor, alphas_cumprod: torch.Tensor,
                timesteps: Sequence[int], prediction_type: str, steps: int = 20) -> Dict[int, torch.Tensor]:
    """Deterministic DDIM inversion of x0 (B, ...) up to each of ``timesteps``: {t: x_t}.

    Walks a grid of about ``steps`` points from t=0 to max(timesteps) (the requested timesteps are
    on it). Each step evaluates the model at the current point and re-noises its x0-estimate with
    its eps-estimate: x_next = sqrt(ab_next) x0_hat + sqrt(1 - ab_next) eps. ``model(x, t)`` returns
    the raw model output at integer timestep t.
    """
    _check(prediction_type)
    if not timesteps:
        return {}
    want = sorted({int(t) for t in timesteps})
    top = want[-1]
    grid = sorted({0, *want, *[int(round(top * i / max(1, steps))) for i in range(steps + 1)]})
    out: Dict[int, torch.Tensor] = {}
    x = x0.float()
    if 0 in want:
        out[0] = x.clone()
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        ab_cur = alphas_cumprod[t_cur].to(x)
        ab_next = alphas_cumprod[t_next].to(x)
        pred = model(x, t_cur).float()
        eps = eps_from_prediction(pred, x, ab_cur, prediction_type)
        x0_hat = x0_from_prediction(pred, x, ab_cur, prediction_type)
        x = ab_next.sqrt() * x0_hat + (1 - ab_next).sqrt() * eps
        if t_next in want:
            out[t_next] = x.clone()
    return out


# ----------------------------------------------------------------------------- concept utility loss
def _phrase_pattern(phrase: str) -> str:
    words = phrase.split()
    if not words:
        raise ConfigError("the concept phrase is empty; give the phrase that names the concept, e.g. 'by artist-3'")
    # whole words only: "by artist-3" is not in "by artist-30"
    return r"(?<![\w-])" + r"\s+".join(re.escape(w) for w in words) + r"(?![\w-])"


def remove_concept(prompt: str, phrase: str) -> str:
    """The prompt without the concept phrase (case-insensitive, whole words), whitespace normalised."""
    out = re.sub(_phrase_pattern(phrase), " ", prompt, flags=re.IGNORECASE)
    out = " ".join(out.split())
    out = re.sub(r"\s+([,.;:])", r"\1", out)  # no space left before punctuation
    return out.strip(" ,;:")


def concept_prompts(prompt: str, phrase: str) -> Tuple[str, str]:
    """(c, c-): the prompt with and without the concept phrase.

    A prompt that does not contain the phrase (e.g. '' for an image of unknown prompt) gets it
    appended for c, and is itself c-, so the concept direction is defined for every query.
    """
    prompt = " ".join(prompt.split())
    if re.search(_phrase_pattern(phrase), prompt, flags=re.IGNORECASE) is None:
        return " ".join(f"{prompt} {phrase}".split()), prompt
    return prompt, remove_concept(prompt, phrase)


def concept_guidance(eps_c: torch.Tensor, eps_minus: torch.Tensor, lam: Scalar = 1.0) -> torch.Tensor:
    """lam * (eps(c) - eps(c-)), detached: how far the concept target lies from eps(c)."""
    eps_c = eps_c.detach().float()
    return (_per_sample(lam, eps_c) * (eps_c - eps_minus.detach().float())).detach()


def concept_target(eps_c: torch.Tensor, eps_minus: torch.Tensor, lam: Scalar = 1.0) -> torch.Tensor:
    """stop_grad[eps(c) + lam * (eps(c) - eps(c-))]: the concept-amplified (CFG-style) noise prediction."""
    return eps_c.detach().float() + concept_guidance(eps_c, eps_minus, lam)


def concept_utility_loss(pred: torch.Tensor, x_t: torch.Tensor, target: torch.Tensor, alpha_bar: Scalar,
                         prediction_type: str) -> torch.Tensor:
    """Concept-TRAK's utility loss given :func:`concept_target`: (B,) squared error to eps_theta(x_t, c)."""
    return eps_regression_loss(pred, x_t, target, alpha_bar, prediction_type)


def self_target_loss(pred: torch.Tensor, x_t: torch.Tensor, residual: torch.Tensor, alpha_bar: Scalar,
                     prediction_type: str) -> torch.Tensor:
    """Both losses when the target is ``stop_grad[eps_theta + residual]`` with eps_theta the model's own output.

    Computes mean((eps - stop_grad[eps] - residual)^2): the same value (mean residual^2) and the same
    gradient (-2/d J^T residual) as :func:`dps_training_loss` / :func:`concept_utility_loss` with
    that target at the current weights, but exactly, without subtracting two separately computed
    model outputs (whose rounding differences would otherwise dominate a tiny residual). (B,)
    """
    eps = eps_from_prediction(pred.float(), x_t.float(), alpha_bar, prediction_type)
    return (eps - eps.detach() - residual.float()).pow(2).flatten(1).mean(1)
