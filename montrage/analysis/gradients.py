"""Per-sample gradients of the LoRA parameters, randomly projected: the features of TracIn / D-TRAK.

Only the LoRA adapter tensors (parameters named with ``lora_``) are differentiated; the base UNet is
frozen. Gradients are taken one *item* at a time, where an item is one (image, timestep) pair with
its noised input ``x_t``, timestep ``t``, prompt states ``hidden`` and whatever the output function
needs (e.g. the training target). Items are batched: one plain forward and backward whose per-row
gradients are split off at the LoRA layers (:mod:`montrage.analysis.hooked_grads`); for adapters that cannot
be split so, ``torch.func`` (``vmap(grad(...))`` over a ``functional_call`` that swaps in the LoRA tensors);
if that fails for a model, a per-item autograd loop. All three give the same numbers.

Determinism: the noise of item ``(image, timestep index k)`` is a pure function of
``(noise_seed, item_seed, k)`` (the formula of :meth:`FeatureExtractor.noise_for`), so the same image
gets the same noise at every checkpoint. The random projection is generated block-wise from seeded
``torch.Generator`` s keyed by parameter name and row block, so it is the same on every call for the
same seed and never exists as one (n_params x proj_dim) tensor.
"""
from __future__ import annotations

import logging
import math
import warnings
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from montrage.data.imagefolder import TrainingSet, load_imagefolder
from montrage.analysis.hooked_grads import UnsupportedLayer, hooked_grads
from montrage.errors import ConfigError, ScorerError
from montrage.losses.diffusion import noised, training_target
from montrage.models.components import Conditioning, DiffusionComponents, as_conditioning, eval_mode
from montrage.models.sampling import seeded_noise, uint8_to_pixels

log = logging.getLogger(__name__)

Items = Dict[str, torch.Tensor]  # 'x_t' (M, C, H, W), 't' (M,), 'hidden' (M, L, E), plus extras; M rows
OutputFn = Callable[[torch.Tensor, Items], torch.Tensor]  # (pred (1, C, H, W), one item with batch dim 1) -> scalar
AuxFn = Callable[[torch.Tensor, Items], Dict[str, torch.Tensor]]  # (pred, one item) -> tensors kept from the forward
ItemBuilder = Callable[[DiffusionComponents, np.ndarray, Sequence[str], Sequence[int]], Items]

DEFAULT_PROJ_DIM = 1024
_BLOCK_ELEMS = 1 << 22  # rows per projection block = _BLOCK_ELEMS // proj_dim (bounds the items x rows temporary)
_VMAP_FAILED = "_montrage_vmap_failed"  # set on a UNet for which torch.func failed once
_HOOKS_FAILED = "_montrage_hooks_failed"  # set on a UNet whose adapter the batched hooks cannot split
METHODS = ("auto", "hooks", "vmap", "loop")


# ----------------------------------------------------------------------------- LoRA parameters
def lora_parameters(unet: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The LoRA adapter tensors of ``unet`` by parameter name (detached views), in a fixed order."""
    params = {n: p.detach() for n, p in unet.named_parameters() if "lora_" in n}
    if not params:
        raise ScorerError("the UNet has no LoRA parameters (names with 'lora_'); gradient methods attribute "
                          "through the LoRA adapter only")
    return dict(sorted(params.items()))


# ----------------------------------------------------------------------------- per-sample gradients
def per_sample_grads(unet: torch.nn.Module, items: Items, output_fn: OutputFn, batch_size: int = 32,
                     method: str = "auto", components: Optional[DiffusionComponents] = None,
                     n_outputs: int = 1) -> Dict[str, torch.Tensor]:
    """d output_fn / d LoRA params for each item: name -> (M, *param shape), float32.

    ``method``: 'hooks' (one plain batched forward and backward, each row's gradient split off at the LoRA layers:
    :mod:`montrage.analysis.hooked_grads`), 'vmap' (torch.func), 'loop' (one autograd call per item) or 'auto'
    (hooks, falling back to vmap for adapters hooks cannot split, and to the loop once if vmap fails for this
    model). The UNet is run in eval mode. With
    ``components`` the UNet is called through ``components.predict`` (SDXL inputs, autocast).
    ``n_outputs`` > 1: ``output_fn`` returns that many scalars (shape (K,)) from ONE forward pass, and each
    gets its gradient (``jacrev``: one forward, K backward passes): name -> (M, K, *param shape).
    """
    return per_sample_grads_aux(unet, items, output_fn, batch_size, method, components, n_outputs)[0]


def per_sample_grads_aux(unet: torch.nn.Module, items: Items, output_fn: OutputFn, batch_size: int = 32,
                         method: str = "auto", components: Optional[DiffusionComponents] = None, n_outputs: int = 1,
                         aux_fn: Optional[AuxFn] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """:func:`per_sample_grads`, plus ``aux_fn(pred, item)``'s tensors from the same forward pass of each item
    (detached; name -> (M, *shape)); ``{}`` without ``aux_fn``. ``aux_fn`` must act row by row: it sees one item
    (inside ``torch.func`` transforms, or in the loop) or a batch of items (hooks); no random ops, no in-place
    writes to outside tensors."""
    if method not in METHODS:
        raise ConfigError(f"per_sample_grads method must be one of {', '.join(METHODS)}, got {method!r}")
    if int(n_outputs) < 1:
        raise ConfigError(f"per_sample_grads n_outputs must be >= 1, got {n_outputs!r}")
    params = lora_parameters(unet)
    M = int(items["x_t"].shape[0])
    with eval_mode(unet):
        chunks: List[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]] = []
        for start in range(0, M, max(1, batch_size)):
            part = {k: v[start:start + batch_size] for k, v in items.items()}
            if method == "hooks" or (method == "auto" and not getattr(unet, _HOOKS_FAILED, False)):
                try:
                    chunks.append(_grads_hooks(unet, params, part, output_fn, components, n_outputs, aux_fn))
                    continue
                except Exception as exc:  # an adapter layout hooks cannot split (e.g. DoRA): torch.func is exact too
                    if method == "hooks":
                        raise
                    setattr(unet, _HOOKS_FAILED, True)
                    level = logging.INFO if isinstance(exc, UnsupportedLayer) else logging.WARNING
                    log.log(level, "per-sample gradients: batched hooks unavailable (%s: %s); using torch.func",
                            type(exc).__name__, exc)
            use_vmap = method == "vmap" or (method == "auto" and not getattr(unet, _VMAP_FAILED, False))
            if use_vmap:
                try:
                    chunks.append(_grads_vmap(unet, params, part, output_fn, components, n_outputs=n_outputs,
                                              aux_fn=aux_fn))
                    continue
                except Exception as exc:  # torch.func cannot trace some modules; the loop is exact too
                    if method == "vmap":
                        raise
                    setattr(unet, _VMAP_FAILED, True)
                    log.warning("per-sample gradients: torch.func vmap failed (%s: %s); using a per-item loop",
                                type(exc).__name__, exc)
            chunks.append(_grads_loop(unet, params, part, output_fn, components, n_outputs=n_outputs, aux_fn=aux_fn))
    if not chunks:
        lead = (0,) if n_outputs == 1 else (0, int(n_outputs))
        return {n: torch.zeros((*lead, *p.shape)) for n, p in params.items()}, {}
    return _joined(chunks, params)


def _forward(unet, item: Items, components: Optional[DiffusionComponents] = None) -> torch.Tensor:
    """The UNet's prediction through ``components.predict`` (SDXL inputs, autocast) when given."""
    if components is None:
        return unet(item["x_t"], item["t"], encoder_hidden_states=as_conditioning(item["hidden"]).hidden).sample
    return components.predict(item["x_t"], item["t"], item["hidden"], unet=unet)


def _row(items: Items, i: int) -> Items:
    return {k: v[i:i + 1] for k, v in items.items()}


def _grads_hooks(unet, params: Dict[str, torch.Tensor], items: Items, output_fn: OutputFn,
                 components: Optional[DiffusionComponents] = None, n_outputs: int = 1,
                 aux_fn: Optional[AuxFn] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """One batched forward, one backward per output, each row's gradient split off at the LoRA layers (same
    numbers as :func:`_grads_vmap`): (gradients, ``aux_fn``'s tensors of the batch or {})."""
    M = int(items["x_t"].shape[0])

    def values(pred: torch.Tensor) -> torch.Tensor:  # (M, K): output_fn reads one item, as under vmap
        return torch.stack([output_fn(pred[i:i + 1], _row(items, i)).reshape(-1) for i in range(M)])

    grads, kept = hooked_grads(unet, list(params), lambda: _forward(unet, items, components), values, n_outputs,
                               None if aux_fn is None else (lambda pred: aux_fn(pred, items)))
    return ({n: g[:, 0] for n, g in grads.items()} if n_outputs == 1 else grads), kept


def _grads_vmap(unet, params: Dict[str, torch.Tensor], items: Items, output_fn: OutputFn,
                components: Optional[DiffusionComponents] = None, per_item_params: bool = False,
                n_outputs: int = 1, aux_fn: Optional[AuxFn] = None
                ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(gradients, ``aux_fn``'s tensors per item or {}). ``per_item_params``: ``params`` hold one set of LoRA
    tensors per item (leading axis M), e.g. the checkpoints of a trajectory, so that gradients at several
    checkpoints take one batched call. ``n_outputs`` > 1: ``jacrev`` over the (K,) outputs, sharing the forward."""
    from torch.func import functional_call, grad, jacrev, vmap

    # torch.func maps over tensors only: a Conditioning travels as its two tensors
    flat = {k: v for k, v in items.items() if not isinstance(v, Conditioning)}
    conds = [k for k, v in items.items() if isinstance(v, Conditioning)]
    for k in conds:
        flat[k] = items[k].hidden
        if items[k].pooled is not None:
            flat[k + "/pooled"] = items[k].pooled

    def loss(p: Dict[str, torch.Tensor], item: Items) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in item.items() if not k.endswith("/pooled")}
        for k in conds:
            pooled = item.get(k + "/pooled")
            one[k] = Conditioning(one[k], None if pooled is None else pooled.unsqueeze(0))
        call = lambda *a, **kw: functional_call(unet, p, a, kw)  # noqa: E731
        pred = _forward(call, one, components)
        value = output_fn(pred, one)
        return value if aux_fn is None else (value, {k: v.squeeze(0) for k, v in aux_fn(pred, one).items()})

    with warnings.catch_warnings():  # "no batching rule for aten::_scaled_dot_product...": a slower fallback only
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        differentiate = grad if n_outputs == 1 else jacrev
        out = vmap(differentiate(loss, has_aux=aux_fn is not None),
                   in_dims=(0 if per_item_params else None, 0))(params, flat)
    grads, aux = (out, {}) if aux_fn is None else out
    return {n: g.detach().float() for n, g in grads.items()}, {k: v.detach().float() for k, v in aux.items()}


def _grads_loop(unet, params: Dict[str, torch.Tensor], items: Items, output_fn: OutputFn,
                components: Optional[DiffusionComponents] = None, n_outputs: int = 1, aux_fn: Optional[AuxFn] = None
                ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """The per-item autograd loop (same numbers as :func:`_grads_vmap`): (gradients, ``aux_fn``'s tensors or {})."""
    named = dict(unet.named_parameters())
    tensors = [named[n] for n in params]
    flags = [t.requires_grad for t in tensors]
    out: Dict[str, List[torch.Tensor]] = {n: [] for n in params}
    kept: Dict[str, List[torch.Tensor]] = {}
    try:
        for t in tensors:
            t.requires_grad_(True)
        M = int(items["x_t"].shape[0])
        for i in range(M):
            one = {k: v[i:i + 1] for k, v in items.items()}
            with torch.enable_grad():
                pred = _forward(unet, one, components)
                value = output_fn(pred, one).reshape(-1)
                for k, v in (aux_fn(pred, one) if aux_fn is not None else {}).items():
                    kept.setdefault(k, []).append(v.detach().float().squeeze(0))
                per_output = [torch.autograd.grad(value[j], tensors, allow_unused=True, retain_graph=j + 1 < n_outputs)
                              for j in range(n_outputs)]  # one forward pass, one backward pass per output
            for i_p, (n, t) in enumerate(zip(params, tensors)):
                gs = [(torch.zeros_like(t) if g[i_p] is None else g[i_p]).detach().float() for g in per_output]
                out[n].append(gs[0] if n_outputs == 1 else torch.stack(gs))
    finally:
        for t, f in zip(tensors, flags):
            t.requires_grad_(f)
    return {n: torch.stack(v) for n, v in out.items()}, {k: torch.stack(v) for k, v in kept.items()}


# ----------------------------------------------------------------------------- random projection
class Projector:
    """A fixed random projection R (n_params x proj_dim): a CountSketch, one entry +-1 per row.

    Row p of R has a single non-zero, a random sign s(p) in column h(p) (uniform over proj_dim), so
    E[<Rx, Ry>] = <x, y> with a variance no larger than a dense Gaussian projection's (Johnson-
    Lindenstrauss; Clarkson & Woodruff 2013), while generating R costs n_params integers instead of
    n_params x proj_dim normals: a query pays for its own gradients, not for rebuilding R (a dense
    1024-wide R of the embedded model took ~3 s per process). R is never built as a matrix: the rows of
    each LoRA parameter are generated in blocks, ON the gradients' device (no host-to-device copy), from
    a ``torch.Generator`` of that device seeded by (seed, parameter name, block index), and ``project``
    scatter-adds ``s * g`` into the buckets. The same seed, parameter names and device *type* give the
    same R on every call and in every process; CPU and CUDA generators differ, so stored gradient
    features record the device type of their projection (``projection_device``) and are reused only
    with the same one. Blocks are kept on their device up to ``cache_mb``.
    """

    KIND = "countsketch"

    def __init__(self, shapes: Dict[str, Sequence[int]], proj_dim: int = DEFAULT_PROJ_DIM, seed: int = 0,
                 cache_mb: float = 256.0) -> None:
        if int(proj_dim) <= 0:
            raise ConfigError(f"proj_dim must be > 0, got {proj_dim!r}")
        self.shapes = {n: tuple(int(d) for d in s) for n, s in sorted(shapes.items())}
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)
        self.rows_per_block = max(1, _BLOCK_ELEMS // self.proj_dim)
        self._cache: Dict[Tuple[str, int, str], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_left = int(cache_mb * 2 ** 20)

    @classmethod
    def for_unet(cls, unet: torch.nn.Module, proj_dim: int = DEFAULT_PROJ_DIM, seed: int = 0,
                 cache_mb: float = 256.0) -> "Projector":
        return cls({n: p.shape for n, p in lora_parameters(unet).items()}, proj_dim, seed, cache_mb)

    @property
    def n_params(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes.values()))

    def _block_seed(self, name: str, block: int) -> int:
        return (self.seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + block) % (2 ** 63 - 1)

    def block(self, name: str, block: int, device: torch.device | str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
        """(buckets int64, signs float32) of rows [block * rows_per_block, ...) of parameter ``name``, generated
        on ``device``."""
        device = torch.device(device)
        key = (name, block, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        size = math.prod(self.shapes[name])
        rows = min(self.rows_per_block, size - block * self.rows_per_block)
        gen = torch.Generator(device=device).manual_seed(self._block_seed(name, block))
        buckets = torch.randint(0, self.proj_dim, (rows,), generator=gen, device=device)
        signs = torch.randint(0, 2, (rows,), generator=gen, device=device).float().mul_(2.0).sub_(1.0)
        nbytes = rows * 12
        if nbytes <= self._cache_left:
            self._cache[key] = (buckets, signs)
            self._cache_left -= nbytes
        return buckets, signs

    def project(self, grads: Dict[str, torch.Tensor]) -> torch.Tensor:
        """name -> (M, *shape) gradients to (M, proj_dim) float32 (on the gradients' device)."""
        missing = [n for n in self.shapes if n not in grads]
        if missing:
            raise ScorerError(f"gradients lack LoRA parameter(s) {missing[:3]}; the projection was built for "
                              "another adapter layout")
        first = grads[next(iter(self.shapes))]
        M, device = int(first.shape[0]), first.device
        out = torch.zeros(M, self.proj_dim, dtype=torch.float32, device=device)
        for name, shape in self.shapes.items():
            g = grads[name].reshape(M, -1).float()
            if g.shape[1] != math.prod(shape):
                raise ScorerError(f"LoRA parameter {name} has {g.shape[1]} entries, the projection expects "
                                  f"{math.prod(shape)}")
            for b, r0 in enumerate(range(0, g.shape[1], self.rows_per_block)):
                buckets, signs = self.block(name, b, device)
                out.index_add_(1, buckets, g[:, r0:r0 + buckets.shape[0]] * signs)
        return out


# ----------------------------------------------------------------------------- noise and items
def item_noise(item_seeds: Sequence[int], n_timesteps: int, shape: Sequence[int], noise_seed: int) -> torch.Tensor:
    """(N, T, *shape) fixed Gaussian noise, one draw per (item, timestep index): same formula as capture."""
    seeds = [int(noise_seed) * 1_000_003 + int(s) * 131 + k for s in item_seeds for k in range(n_timesteps)]
    if not seeds:
        return torch.zeros((len(item_seeds), n_timesteps, *shape))
    return seeded_noise(seeds, shape).view(len(item_seeds), n_timesteps, *shape)


def encode_prompts(components: DiffusionComponents, prompts: Sequence[str]) -> torch.Tensor:
    """(N, L, E) prompt states; '' gives the null prompt. Each distinct prompt is encoded once."""
    unique = sorted(set(prompts))
    states = components.encode_prompts(unique)
    index = {p: i for i, p in enumerate(unique)}
    return states[[index[p] for p in prompts]]


def noised_items(components: DiffusionComponents, images: np.ndarray, prompts: Sequence[str],
                 item_seeds: Sequence[int], timesteps: Sequence[int], noise_seed: int) -> Items:
    """Rows (image i, timestep k) in image-major order: x_t, t, hidden, x0 (latents), noise, ab (alpha-bar)."""
    device = components.device
    T = len(timesteps)
    with torch.no_grad():
        x0 = components.to_latents(uint8_to_pixels(images).to(device)).float()
    n = x0.shape[0]
    noise = item_noise(item_seeds, T, x0.shape[1:], noise_seed).to(device).flatten(0, 1)
    lat = x0.repeat_interleave(T, 0)
    t = torch.tensor([int(s) for s in timesteps], dtype=torch.long, device=device).repeat(n)
    sched = components.noise_scheduler
    hidden = encode_prompts(components, list(prompts)).repeat_interleave(T, 0)
    ab = sched.alphas_cumprod.to(device)[t].float()
    return {"x_t": noised(sched, lat, noise, t), "t": t, "hidden": hidden, "x0": lat, "noise": noise, "ab": ab}


def _denoise_items(components: DiffusionComponents, images: np.ndarray, prompts: Sequence[str],
                   item_seeds: Sequence[int], timesteps: Sequence[int], noise_seed: int) -> Items:
    it = noised_items(components, images, prompts, item_seeds, timesteps, noise_seed)
    target = training_target(components.noise_scheduler, it["x0"], it["noise"], it["t"])
    return {"x_t": it["x_t"], "t": it["t"], "hidden": it["hidden"], "target": target}


def _sqnorm_items(components: DiffusionComponents, images: np.ndarray, prompts: Sequence[str],
                  item_seeds: Sequence[int], timesteps: Sequence[int], noise_seed: int) -> Items:
    it = noised_items(components, images, prompts, item_seeds, timesteps, noise_seed)
    return {"x_t": it["x_t"], "t": it["t"], "hidden": it["hidden"]}


def denoise_output(pred: torch.Tensor, item: Items) -> torch.Tensor:
    """The training objective: mean squared error to the training target (epsilon / v / sample)."""
    return (pred.float() - item["target"].float()).pow(2).mean()


def sqnorm_output(pred: torch.Tensor, item: Items) -> torch.Tensor:
    """D-TRAK's best output function: squared L2 norm of the UNet output, mean over dims."""
    return pred.float().pow(2).mean()


OUTPUTS: Dict[str, Tuple[Callable[..., Items], OutputFn]] = {
    "denoise": (_denoise_items, denoise_output),
    "sqnorm": (_sqnorm_items, sqnorm_output),
}


def _shared_items_fn(outputs: Sequence[str]) -> Callable[..., Items]:
    """The item builder serving every built-in output at once: the denoising items (x_t, t, hidden and the
    training target) hold everything the squared-norm output reads, over the same noised inputs."""
    return _denoise_items if "denoise" in outputs else _sqnorm_items


# ----------------------------------------------------------------------------- the main entry
def projected_gradients(components: DiffusionComponents, images: np.ndarray, prompts: Sequence[str],
                        item_seeds: Sequence[int], output: str = "denoise", timesteps: Sequence[int] = (100, 400, 700),
                        noise_seed: int = 0, projector: Optional[Projector] = None,
                        proj_dim: int = DEFAULT_PROJ_DIM, proj_seed: int = 0, batch_size: int = 32,
                        method: str = "auto", items_fn: Optional[Callable[..., Items]] = None,
                        output_fn: Optional[OutputFn] = None, memory_mb: float = 256.0,
                        progress: bool = False) -> np.ndarray:
    """(N, T, proj_dim) float32 projected per-sample, per-timestep gradients of the LoRA parameters.

    images uint8 (N, H, W, 3); prompts ('' = null prompt) and item_seeds (fix the noise) per image.
    ``output`` names a built-in output function ('denoise' or 'sqnorm'); or give ``items_fn``
    (components, images, prompts, item_seeds, timesteps, noise_seed) -> image-major items and
    ``output_fn`` for a custom loss (e.g. Concept-TRAK's). Raw gradients are held for at most
    ``memory_mb`` worth of items at a time before they are projected.
    """
    if output_fn is None:
        if output not in OUTPUTS:
            raise ScorerError(f"unknown gradient output function {output!r}; available: {sorted(OUTPUTS)}")
        items_fn, output_fn = OUTPUTS[output]
    elif items_fn is None:
        raise ConfigError("projected_gradients: a custom output_fn needs its items_fn")
    return _projected(components, images, prompts, item_seeds, items_fn, output_fn, 1, timesteps, noise_seed,
                      projector, proj_dim, proj_seed, batch_size, method, memory_mb, progress, output)[0][0]


def projected_gradients_shared(components: DiffusionComponents, images: np.ndarray, prompts: Sequence[str],
                               item_seeds: Sequence[int], outputs: Sequence[str] = ("sqnorm", "denoise"),
                               timesteps: Sequence[int] = (100, 400, 700), noise_seed: int = 0,
                               projector: Optional[Projector] = None, proj_dim: int = DEFAULT_PROJ_DIM,
                               proj_seed: int = 0, batch_size: int = 32, method: str = "auto",
                               memory_mb: float = 256.0, progress: bool = False, aux_fn: Optional[AuxFn] = None
                               ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """:func:`projected_gradients` of several built-in outputs over the same noised inputs, from ONE forward pass
    per item (one backward pass per output): (output name -> (N, T, proj_dim), kept). The same numbers as one call
    per output; a query that needs D-TRAK's and TracIn's gradients at one checkpoint pays one UNet forward, not two.
    ``kept``: ``aux_fn``'s tensors of those forwards, name -> (N, T, ...) (see :func:`per_sample_grads_aux`; {}
    without it), e.g. the representations a feature extractor's hooks saw."""
    outputs = list(dict.fromkeys(outputs))
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
        raise ScorerError(f"unknown gradient output function(s) {unknown or outputs}; available: {sorted(OUTPUTS)}")
    fns = [OUTPUTS[o][1] for o in outputs]

    def stacked(pred: torch.Tensor, item: Items) -> torch.Tensor:
        return torch.stack([f(pred, item) for f in fns]) if len(fns) > 1 else fns[0](pred, item)  # one: a scalar

    parts, aux = _projected(components, images, prompts, item_seeds, _shared_items_fn(outputs), stacked,
                            len(outputs), timesteps, noise_seed, projector, proj_dim, proj_seed, batch_size, method,
                            memory_mb, progress, "+".join(outputs), aux_fn)
    return dict(zip(outputs, parts)), aux


def _projected(components: DiffusionComponents, images: np.ndarray, prompts: Sequence[str], item_seeds: Sequence[int],
               items_fn: Callable[..., Items], output_fn: OutputFn, n_outputs: int, timesteps: Sequence[int],
               noise_seed: int, projector: Optional[Projector], proj_dim: int, proj_seed: int, batch_size: int,
               method: str, memory_mb: float, progress: bool, label: str,
               aux_fn: Optional[AuxFn] = None) -> Tuple[List[np.ndarray], Dict[str, np.ndarray]]:
    """The projected gradients of ``n_outputs`` outputs of one forward pass: one (N, T, D) array per output; and
    ``aux_fn``'s tensors of each item's forward, name -> (N, T, ...) ({} without it)."""
    N, T, K = len(images), len(timesteps), int(n_outputs)
    if len(prompts) != N or len(item_seeds) != N:
        raise ScorerError(f"projected_gradients: {N} images but {len(prompts)} prompts and {len(item_seeds)} seeds")
    if T == 0:
        raise ScorerError("projected_gradients needs at least one timestep")
    unet = components.unet
    projector = projector or Projector.for_unet(unet, proj_dim, proj_seed)
    per_item_bytes = 4 * projector.n_params * K
    images_per_pass = max(1, int(memory_mb * 2 ** 20) // max(1, per_item_bytes * T))
    out = [np.zeros((N, T, projector.proj_dim), np.float32) for _ in range(K)]
    kept: Dict[str, List[np.ndarray]] = {}
    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[]):
        for start in tqdm(range(0, N, images_per_pass), disable=not progress, desc=f"gradients ({label})"):
            sl = slice(start, min(N, start + images_per_pass))
            items = items_fn(components, images[sl], list(prompts[sl]), list(item_seeds[sl]), timesteps, noise_seed)
            grads, aux = per_sample_grads_aux(unet, items, output_fn, batch_size=batch_size, method=method,
                                              components=components, n_outputs=K, aux_fn=aux_fn)
            if K > 1:  # (M, K, *shape) -> (M * K, *shape): item-major, output-minor rows
                grads = {n: g.flatten(0, 1) for n, g in grads.items()}
            proj = projector.project(grads).view(sl.stop - sl.start, T, K, -1).cpu().numpy()
            for j in range(K):
                out[j][sl] = proj[:, :, j]
            for k, v in aux.items():
                kept.setdefault(k, []).append(v.view(sl.stop - sl.start, T, *v.shape[1:]).cpu().numpy())
    return out, {k: np.concatenate(v) for k, v in kept.items()}


def projected_gradients_at(components: DiffusionComponents, weight_sets: Sequence[Dict[str, torch.Tensor]],
                           images: np.ndarray, prompts: Sequence[str], item_seeds: Sequence[int],
                           output: str = "denoise", timesteps: Sequence[int] = (100, 400, 700), noise_seed: int = 0,
                           projector: Optional[Projector] = None, proj_dim: int = DEFAULT_PROJ_DIM, proj_seed: int = 0,
                           batch_size: int = 32, memory_mb: float = 256.0) -> List[np.ndarray]:
    """:func:`projected_gradients` of the same images under several LoRA weight sets (e.g. checkpoints), in
    batched calls: item (set s, image i, timestep t) carries set s's tensors (``torch.func`` over per-item
    parameters). A query's gradients along a trajectory then cost about as much as a few images at one
    checkpoint, not one small call per checkpoint (2-2.5x faster for one query at four checkpoints on CPU).
    ``weight_sets``: LoRA tensors by parameter name (as :func:`lora_parameters` names them). Same numbers as one
    call per set up to float rounding; models that torch.func cannot trace get one call per set (the
    per-item loop, the UNet's own LoRA tensors restored afterwards). Returns one (N, T, D) array per set."""
    return projected_gradients_at_aux(components, weight_sets, images, prompts, item_seeds, output, timesteps,
                                      noise_seed, projector, proj_dim, proj_seed, batch_size, memory_mb)[0]


def projected_gradients_at_aux(components: DiffusionComponents, weight_sets: Sequence[Dict[str, torch.Tensor]],
                               images: np.ndarray, prompts: Sequence[str], item_seeds: Sequence[int],
                               output: str = "denoise", timesteps: Sequence[int] = (100, 400, 700),
                               noise_seed: int = 0, projector: Optional[Projector] = None,
                               proj_dim: int = DEFAULT_PROJ_DIM, proj_seed: int = 0, batch_size: int = 32,
                               memory_mb: float = 256.0, aux_fn: Optional[AuxFn] = None
                               ) -> Tuple[List[np.ndarray], List[Dict[str, np.ndarray]]]:
    """:func:`projected_gradients_at`, plus per set ``aux_fn``'s tensors of the same forwards, name -> (N, T, ...)
    (see :func:`per_sample_grads_aux`; {} per set without it): e.g. a query's representations at each
    checkpoint, seen while its gradients there were taken."""
    if output not in OUTPUTS:
        raise ScorerError(f"unknown gradient output function {output!r}; available: {sorted(OUTPUTS)}")
    items_fn, output_fn = OUTPUTS[output]
    unet = components.unet
    params = lora_parameters(unet)
    for w in weight_sets:
        if set(w) != set(params):
            raise ScorerError(f"a LoRA weight set has {len(w)} tensors, the adapter {len(params)}")
    projector = projector or Projector.for_unet(unet, proj_dim, proj_seed)
    N, T, S = len(images), len(timesteps), len(weight_sets)
    out = [np.zeros((N, T, projector.proj_dim), np.float32) for _ in range(S)]
    if S == 0 or N == 0:
        return out, [{} for _ in range(S)]
    kept: List[Dict[str, List[np.ndarray]]] = [{} for _ in range(S)]
    device = next(iter(params.values())).device
    stacked = {n: torch.stack([torch.as_tensor(w[n]).to(device=device, dtype=p.dtype) for w in weight_sets])
               for n, p in params.items()}
    per_item_bytes = 8 * projector.n_params  # its gradient and its own parameter set
    images_per_pass = max(1, int(memory_mb * 2 ** 20) // max(1, per_item_bytes * T * S))
    with torch.random.fork_rng(devices=[]), eval_mode(unet):
        for start in range(0, N, images_per_pass):
            sl = slice(start, min(N, start + images_per_pass))
            items = items_fn(components, images[sl], list(prompts[sl]), list(item_seeds[sl]), timesteps, noise_seed)
            m = int(items["x_t"].shape[0])
            rep = {k: _repeat_rows(v, S) for k, v in items.items()}  # set-major: set s holds rows s*m .. s*m+m-1
            per_item = {n: v.repeat_interleave(m, 0) for n, v in stacked.items()}
            grads, aux = _grads_per_set(unet, params, per_item, rep, output_fn, components, batch_size, stacked, m,
                                        aux_fn)
            proj = projector.project(grads).view(S, sl.stop - sl.start, T, -1).cpu().numpy()
            for s_ in range(S):
                out[s_][sl] = proj[s_]
                for k, v in aux.items():
                    kept[s_].setdefault(k, []).append(v[s_ * m:(s_ + 1) * m].reshape(
                        sl.stop - sl.start, T, *v.shape[1:]).cpu().numpy())
    return out, [{k: np.concatenate(v) for k, v in part.items()} for part in kept]


def _repeat_rows(v, times: int):
    if isinstance(v, Conditioning):
        return Conditioning(_repeat_rows(v.hidden, times), None if v.pooled is None else _repeat_rows(v.pooled, times))
    return v.repeat(times, *([1] * (v.dim() - 1)))


def _grads_per_set(unet, params, per_item, items: Items, output_fn: OutputFn, components, batch_size: int,
                   stacked, m: int, aux_fn: Optional[AuxFn] = None
                   ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Per-item gradients, each item under its own parameter set, and ``aux_fn``'s tensors of the same forwards
    ({} without it): batched torch.func, else one loop per set."""
    M = int(items["x_t"].shape[0])
    if not getattr(unet, _VMAP_FAILED, False):
        try:
            chunks = []
            for start in range(0, M, max(1, batch_size)):
                part = {k: v[start:start + batch_size] for k, v in items.items()}
                p = {n: v[start:start + batch_size] for n, v in per_item.items()}
                chunks.append(_grads_vmap(unet, p, part, output_fn, components, per_item_params=True, aux_fn=aux_fn))
            return _joined(chunks, params)
        except Exception as exc:  # torch.func cannot trace some modules; the loop is exact too
            setattr(unet, _VMAP_FAILED, True)
            log.warning("per-sample gradients: torch.func vmap failed (%s: %s); using a per-item loop",
                        type(exc).__name__, exc)
    named = dict(unet.named_parameters())
    keep = {n: named[n].detach().clone() for n in params}
    parts = []
    try:
        for s_ in range(len(next(iter(stacked.values())))):
            with torch.no_grad():
                for n in params:
                    named[n].copy_(stacked[n][s_])
            one = {k: v[s_ * m:(s_ + 1) * m] for k, v in items.items()}
            parts.append(_grads_loop(unet, params, one, output_fn, components, aux_fn=aux_fn))
    finally:
        with torch.no_grad():
            for n in params:
                named[n].copy_(keep[n])
    return _joined(parts, params)


def _joined(chunks: Sequence[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]], params
            ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Row chunks of (gradients, aux tensors) concatenated."""
    return ({n: torch.cat([c[0][n] for c in chunks]) for n in params},
            {k: torch.cat([c[1][k] for c in chunks]) for k in chunks[0][1]})


# ----------------------------------------------------------------------------- scoring helpers
def normalize_rows(g: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Unit-normalise along the last axis (per sample, per timestep for (N, T, D)); zero rows stay zero."""
    g = np.asarray(g, dtype=np.float64)
    norm = np.linalg.norm(g, axis=-1, keepdims=True)
    return (g / np.maximum(norm, eps)).astype(np.float32)


def trak_scores(train: np.ndarray, queries: np.ndarray, lam_rel: float = 0.1) -> np.ndarray:
    """(Q, N) scores g_q^T (G^T G + lam I)^{-1} g_i with lam = lam_rel * mean(diag(G^T G)).

    ``train`` G is (N, D), ``queries`` (Q, D). Solved (never inverted) in float64, in whichever of
    the two equivalent forms is smaller: D x D directly, or N x N via the push-through identity
    (G^T G + lam I)^{-1} G^T = G^T (G G^T + lam I)^{-1}.
    """
    if not lam_rel > 0:
        raise ScorerError(f"the TRAK damping (lambda) must be > 0, got {lam_rel!r}")
    G = np.asarray(train, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    N, D = G.shape
    if q.shape[1] != D:
        raise ScorerError(f"train features have {D} dims, query features {q.shape[1]}")
    mean_diag = float((G * G).sum() / max(D, 1))
    if N == 0 or mean_diag == 0.0:
        return np.zeros((q.shape[0], N), np.float32)
    lam = lam_rel * mean_diag
    if N < D:
        K = G @ G.T + lam * np.eye(N)
        scores = np.linalg.solve(K, G @ q.T).T  # K symmetric: (q G^T K^{-1})^T = K^{-1} G q^T
    else:
        K = G.T @ G + lam * np.eye(D)
        scores = np.linalg.solve(K, q.T).T @ G.T
    return scores.astype(np.float32)


def training_images(store) -> TrainingSet:
    """The run's training images, read from the run itself (``train/images``).

    A run recorded with ``store_images=False`` keeps only source paths + per-image hashes: the images are
    re-read from those paths and checked (TrainingImagesChangedError names the first file that differs).
    """
    meta = store.train_meta
    names = list(meta.get("file_names", []))
    n = len(names)
    if store.images_stored:
        images = store.train_images()
    else:
        images = _images_from_source(store, names)
    return TrainingSet(images=np.asarray(images), captions=list(meta.get("captions", [""] * n)),
                       concepts=list(meta.get("concepts", [""] * n)), file_names=names,
                       extra=list(meta.get("extra", [{}] * n)), root=str(getattr(store, "run_dir", "")))


def _images_from_source(store, names: List[str]) -> np.ndarray:
    """Images of a paths-only run from their recorded folder, verified against the recorded hashes."""
    from pathlib import Path

    from montrage.errors import DataError, TrainingImagesChangedError

    root = store.train_meta.get("source_root")
    resolution = int(store.run_config.get("resolution") or 0)
    fix = ("restore the original files there, or record the run again with the images stored in it "
           "(the default, store_images=True)")
    if not root or not Path(root).is_dir():
        raise TrainingImagesChangedError(f"this run keeps only the paths of its training images (store_images=False) "
                                         f"and their folder {root} is gone; {fix}")
    try:
        ts = load_imagefolder(root, resolution)
    except DataError as exc:
        raise TrainingImagesChangedError(f"the training images of this run cannot be re-read from {root}: {exc}; "
                                         f"{fix}") from None
    where = {name: i for i, name in enumerate(ts.file_names)}
    lost = [name for name in names if name not in where]
    if lost:
        raise TrainingImagesChangedError(f"training image {Path(root) / lost[0]} is no longer listed in "
                                         f"{root}/metadata.jsonl ({len(lost)} missing); {fix}")
    images = ts.images[[where[name] for name in names]]
    store.verify_train_images(images)
    return images
