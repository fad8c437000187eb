"""Per-sample LoRA gradients, the block-wise projection, and the TracIn / D-TRAK scorers on a tiny model."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from montrage.analysis.base import _REGISTRY, QuerySet, ScoringContext
from montrage.analysis.gradient_scorers import (DTrakScorer, TracInScorer, dtrak_combine, learning_rate,
                                               tracin_checkpoints, tracin_combine)
from montrage.analysis.gradients import (OUTPUTS, Projector, item_noise, lora_parameters, normalize_rows,
                                         per_sample_grads, projected_gradients, projected_gradients_shared,
                                         trak_scores, training_images)
from montrage.config import EmbeddedModelConfig, LoraSettings
from montrage.errors import ScorerError
from montrage.losses.diffusion import per_sample_mse, training_target
from montrage.models.components import DiffusionComponents, PromptEncoder
from montrage.models.embedded import build_schedulers, build_text, build_unet
from montrage.models.lora import add_lora, load_lora_state, lora_state
from montrage.models.sampling import uint8_to_pixels

TIMESTEPS = (100, 400, 700)
SCORERS = {"dtrak": DTrakScorer, "tracin": TracInScorer}


# ----------------------------------------------------------------------------- shared helpers (also used by
# tests/analysis/test_concept_trak.py)
def tiny_components(seed: int = 0) -> DiffusionComponents:
    """A tiny random UNet + word encoder with a rank-2 LoRA whose B matrices are non-zero."""
    cfg = EmbeddedModelConfig(resolution=8, block_out_channels=(8, 16), norm_num_groups=4, attention_heads=2,
                              cross_attention_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(cfg)
        tok, text = build_text(cfg)
    unet.requires_grad_(False)
    text.requires_grad_(False)
    ddpm, ddim = build_schedulers()
    comps = DiffusionComponents(unet=unet, prompt_encoder=PromptEncoder(tok, text, hf_tokenizer=False),
                                noise_scheduler=ddpm, sample_scheduler=ddim, resolution=8, base="embedded")
    add_lora(unet, LoraSettings(rank=2), seed=seed)
    randomize_lora(unet, seed + 1)
    unet.eval()
    return comps


def randomize_lora(unet, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def random_images(n: int, seed: int, res: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8)


class FakeStore:
    """The part of RunStore the gradient scorers read."""

    images_stored = True

    def __init__(self, images: np.ndarray, captions, weights, steps, lr=1e-3, warmup=0):
        self._weights = weights
        self._images = images
        self.steps = np.asarray(steps)
        self.learning_rates = np.full(len(steps), np.nan)  # no optimizer recorded: the train.lr schedule
        self.run_config = {"resolution": 8, "train": {"lr": lr, "warmup_steps": warmup},
                           "capture": {"timesteps": list(TIMESTEPS), "seed": 1234}}
        self.train_meta = {"file_names": [f"{i:03d}.png" for i in range(len(images))], "captions": list(captions)}

    def train_images(self):
        return self._images

    @property
    def n_checkpoints(self) -> int:
        return len(self._weights)

    def lora_weights(self, k):
        return self._weights[k]


class FakeModel:
    def __init__(self, comps):
        self.comps = comps

    def set_weights(self, weights, tag=None):
        load_lora_state(self.comps.unet, {k: torch.as_tensor(v) for k, v in weights.items()})
        return self.comps


def write_folder(root: Path, images: np.ndarray, captions) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (im, cap) in enumerate(zip(images, captions)):
            Image.fromarray(im).save(root / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": cap}) + "\n")
    return root


def make_context(tmp: Path, comps, images, captions, queries: QuerySet, n_ckpt: int = 3, options=None):
    """A context over a fake run: checkpoint 0 = untrained LoRA (B = 0), later ones random LoRAs."""
    weights = []
    for k in range(n_ckpt):
        randomize_lora(comps.unet, 100 + k)
        if k == 0:
            with torch.no_grad():
                for n, p in comps.unet.named_parameters():
                    if "lora_B" in n:
                        p.zero_()
        weights.append({n: v.numpy() for n, v in lora_state(comps.unet).items()})
    store = FakeStore(images, captions, weights, steps=[0] + [10 * k for k in range(1, n_ckpt)])
    return ScoringContext(store=store, queries=queries, checkpoint=n_ckpt - 1, progress=False,
                          options=dict(options or {}), _model=FakeModel(comps))


def planted_queries(images, captions, idx, seeds=None) -> QuerySet:
    return QuerySet(ids=[f"q{i}" for i in idx], images=images[idx], prompts=[captions[i] for i in idx],
                    seeds=[None] * len(idx), item_seeds=list(seeds if seeds is not None else [7 + i for i in idx]))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def comps():
    return tiny_components()


# ----------------------------------------------------------------------------- per-sample gradients
def _plain_grad(comps, image, prompt, item_seed, k, noise_seed):
    """Single-sample reference: autograd on the training loss, written out from scratch."""
    unet = comps.unet
    names = list(lora_parameters(unet))
    named = dict(unet.named_parameters())
    params = [named[n] for n in names]
    x0 = uint8_to_pixels(image[None])
    noise = item_noise([item_seed], len(TIMESTEPS), x0.shape[1:], noise_seed)[:, k]
    t = torch.tensor([TIMESTEPS[k]])
    x_t = comps.noise_scheduler.add_noise(x0, noise, t)
    hidden = comps.encode_prompts([prompt]).hidden
    for p in params:
        p.requires_grad_(True)
    try:
        loss = per_sample_mse(unet(x_t, t, encoder_hidden_states=hidden).sample,
                              training_target(comps.noise_scheduler, x0, noise, t))[0]
        grads = torch.autograd.grad(loss, params)
    finally:
        for p in params:
            p.requires_grad_(False)
    return dict(zip(names, grads))


@pytest.mark.parametrize("method", ["hooks", "vmap", "loop"])
def test_per_sample_grads_match_plain_autograd(comps, method):
    images = random_images(3, 0)
    prompts = ["a red circle by artist-0", "", "a square"]
    seeds = [5, 6, 7]
    items_fn, out_fn = OUTPUTS["denoise"]
    items = items_fn(comps, images, prompts, seeds, TIMESTEPS, 11)
    grads = per_sample_grads(comps.unet, items, out_fn, batch_size=4, method=method)
    for i in range(3):
        for k in range(len(TIMESTEPS)):
            ref = _plain_grad(comps, images[i], prompts[i], seeds[i], k, 11)
            row = i * len(TIMESTEPS) + k
            scale = max(float(v.abs().max()) for v in ref.values())
            assert scale > 0
            for n, v in ref.items():
                torch.testing.assert_close(grads[n][row], v, atol=2e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("method", ["hooks", "vmap", "loop"])
def test_outputs_sharing_one_forward_pass_get_their_own_exact_gradients(comps, method):
    """Two outputs of one forward pass (jacrev / retained graph) = each output's gradient on its own, and the
    denoising one = autograd on the training loss written out from scratch."""
    images = random_images(2, 4)
    prompts = ["a ring by artist-1", ""]
    items = OUTPUTS["denoise"][0](comps, images, prompts, [3, 4], TIMESTEPS, 11)
    fns = [OUTPUTS["sqnorm"][1], OUTPUTS["denoise"][1]]
    both = per_sample_grads(comps.unet, items, lambda pred, it: torch.stack([f(pred, it) for f in fns]),
                            method=method, n_outputs=2)
    alone = [per_sample_grads(comps.unet, items, f, method=method) for f in fns]
    for n, g in both.items():
        assert g.shape == (2 * len(TIMESTEPS), 2, *alone[0][n].shape[1:])
        for j in range(2):
            scale = float(alone[j][n].abs().max()) + 1e-12
            torch.testing.assert_close(g[:, j], alone[j][n], atol=1e-5 * scale, rtol=1e-4)
    ref = _plain_grad(comps, images[1], prompts[1], 4, 2, 11)
    for n, v in ref.items():
        torch.testing.assert_close(both[n][len(TIMESTEPS) + 2, 1], v, atol=2e-5 * float(v.abs().max()), rtol=1e-4)
    assert not torch.allclose(both[n][:, 0], both[n][:, 1])  # two different outputs, not one copied


def test_tensors_kept_from_the_gradient_forward_are_those_of_a_plain_forward(comps):
    """aux_fn sees each item's own forward (the batched hooks pass, inside torch.func or in the loop): what it
    keeps equals a plain no-grad forward of the same inputs, and the gradients are unchanged by keeping it."""
    from montrage.analysis.gradients import per_sample_grads_aux

    images = random_images(2, 6)
    items = OUTPUTS["denoise"][0](comps, images, ["a ring by artist-1", ""], [3, 4], TIMESTEPS, 11)
    with torch.no_grad():
        pred = comps.unet(items["x_t"], items["t"], encoder_hidden_states=items["hidden"].hidden).sample
    want = pred.flatten(1).mean(1)
    keep = lambda p, it: {"mean": p.float().flatten(1).mean(1)}  # noqa: E731
    plain = per_sample_grads(comps.unet, items, OUTPUTS["denoise"][1], method="vmap")
    for method in ("hooks", "vmap", "loop"):
        grads, kept = per_sample_grads_aux(comps.unet, items, OUTPUTS["denoise"][1], method=method, aux_fn=keep)
        torch.testing.assert_close(kept["mean"], want, atol=1e-5, rtol=1e-4)
        for n, g in plain.items():
            torch.testing.assert_close(grads[n], g, atol=1e-5 * float(g.abs().max()), rtol=1e-4)


def test_projected_gradients_shared_match_one_call_per_output(comps):
    images = random_images(3, 5)
    prompts = ["a circle", "", "a cross by artist-0"]
    got, kept = projected_gradients_shared(comps, images, prompts, [1, 2, 3], outputs=("sqnorm", "denoise"),
                                           timesteps=TIMESTEPS, proj_dim=32, proj_seed=2, memory_mb=0.001)
    assert kept == {}
    assert list(got) == ["sqnorm", "denoise"]
    for o, g in got.items():
        ref = projected_gradients(comps, images, prompts, [1, 2, 3], output=o, timesteps=TIMESTEPS, proj_dim=32,
                                  proj_seed=2)
        assert g.shape == ref.shape == (3, len(TIMESTEPS), 32)
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(ScorerError, match="unknown gradient output"):
        projected_gradients_shared(comps, images, prompts, [1, 2, 3], outputs=("sqnorm", "nope"))


def test_adapters_hooks_cannot_split_fall_back_to_torch_func():
    """A LoRA-named tensor outside a Linear / Conv2d layer's weight and bias (as DoRA's magnitudes): 'hooks' says
    so, 'auto' falls back to torch.func once for that UNet and gets its numbers; the normal adapter of another
    UNet still takes the hooks."""
    from montrage.analysis.gradients import _HOOKS_FAILED
    from montrage.analysis.hooked_grads import UnsupportedLayer

    comps = tiny_components(seed=3)
    items_fn, out_fn = OUTPUTS["denoise"]
    items = items_fn(comps, random_images(2, 3), ["a ring", ""], [1, 2], TIMESTEPS, 0)
    comps.unet.conv_in.register_parameter("lora_magnitude", torch.nn.Parameter(torch.ones(3), requires_grad=False))
    with pytest.raises(UnsupportedLayer, match="lora_magnitude"):
        per_sample_grads(comps.unet, items, out_fn, method="hooks")
    auto = per_sample_grads(comps.unet, items, out_fn, method="auto")
    assert getattr(comps.unet, _HOOKS_FAILED, False)
    vm = per_sample_grads(comps.unet, items, out_fn, method="vmap")
    for n, g in vm.items():
        torch.testing.assert_close(auto[n], g)
    other = tiny_components(seed=4)
    per_sample_grads(other.unet, items_fn(other, random_images(1, 3), [""], [1], TIMESTEPS, 0), out_fn)
    assert not getattr(other.unet, _HOOKS_FAILED, False)
    with pytest.raises(Exception, match="method must be one of auto, hooks, vmap, loop"):
        per_sample_grads(other.unet, items, out_fn, method="jacobian")


def test_only_lora_parameters_are_differentiated(comps):
    items_fn, out_fn = OUTPUTS["sqnorm"]
    items = items_fn(comps, random_images(1, 1), [""], [0], (500,), 0)
    grads = per_sample_grads(comps.unet, items, out_fn, method="vmap")
    assert grads and all("lora_" in n for n in grads)
    assert all(not p.requires_grad for n, p in comps.unet.named_parameters() if "lora_" not in n)


def test_projected_gradients_shape_and_determinism(comps):
    images = random_images(4, 2)
    prompts = ["a circle", "", "a ring by artist-1", "a cross"]
    a = projected_gradients(comps, images, prompts, [0, 1, 2, 3], output="sqnorm", timesteps=TIMESTEPS,
                            proj_dim=64, proj_seed=3, batch_size=5)
    b = projected_gradients(comps, images[[2, 0]], [prompts[2], prompts[0]], [2, 0], output="sqnorm",
                            timesteps=TIMESTEPS, proj_dim=64, proj_seed=3, batch_size=1, memory_mb=0.001)
    assert a.shape == (4, 3, 64) and a.dtype == np.float32
    # an item's gradient depends on nothing but the item (batching, order and chunking do not matter)
    np.testing.assert_allclose(b, a[[2, 0]], rtol=1e-4, atol=1e-5 * np.abs(a).max())
    # the noise is fixed per item: a different seed changes the gradient
    c = projected_gradients(comps, images[:1], prompts[:1], [99], output="sqnorm", timesteps=TIMESTEPS,
                            proj_dim=64, proj_seed=3)
    assert not np.allclose(c[0], a[0])
    with pytest.raises(ScorerError):
        projected_gradients(comps, images, prompts, [0, 1, 2, 3], output="nope", timesteps=TIMESTEPS)


def test_null_prompt_is_the_empty_prompt(comps):
    from montrage.analysis.gradients import encode_prompts

    states = encode_prompts(comps, ["", "a circle", ""]).hidden
    torch.testing.assert_close(states[0], comps.encode_prompts([""]).hidden[0])
    torch.testing.assert_close(states[2], states[0])
    assert not torch.allclose(states[1], states[0])


# ----------------------------------------------------------------------------- projection
def _dense(proj: Projector) -> torch.Tensor:
    """The projection matrix (tests only): project the identity."""
    rows = []
    for name, shape in proj.shapes.items():
        size = int(np.prod(shape))
        eye = torch.eye(size).reshape(size, *shape)
        grads = {n: (eye if n == name else torch.zeros(size, *s)) for n, s in proj.shapes.items()}
        rows.append(proj.project(grads))
    return torch.cat(rows)


def test_projection_is_deterministic_blockwise_and_linear(monkeypatch):
    import montrage.analysis.gradients as G

    monkeypatch.setattr(G, "_BLOCK_ELEMS", 32 * 10)  # 10 rows per block: several blocks per tensor
    shapes = {"b.lora_B": (7, 5), "a.lora_A": (4, 6)}
    p1 = Projector(shapes, proj_dim=32, seed=1)
    p2 = Projector(shapes, proj_dim=32, seed=1, cache_mb=0)  # regenerated every call
    assert p1.rows_per_block == 10
    R1, R2 = _dense(p1), _dense(p2)
    torch.testing.assert_close(R1, R2)
    torch.testing.assert_close(_dense(p2), R2)  # same again on a second call
    assert not torch.allclose(_dense(Projector(shapes, proj_dim=32, seed=2)), R1)
    g = {n: torch.randn(3, *s) for n, s in shapes.items()}
    flat = torch.cat([g[n].reshape(3, -1) for n in sorted(shapes)], 1)
    torch.testing.assert_close(p1.project(g), flat @ R1, rtol=1e-5, atol=1e-5)
    assert abs(float(R1.std()) - 32 ** -0.5) < 0.03


def test_projection_preserves_inner_products_jl():
    shapes = {"x.lora_A": (40, 50), "y.lora_B": (1000,)}
    proj = Projector(shapes, proj_dim=4096, seed=0)
    gen = torch.Generator().manual_seed(0)
    g = {n: torch.randn(6, *s, generator=gen) for n, s in shapes.items()}
    g["x.lora_A"][1] = g["x.lora_A"][0] + 0.5 * g["x.lora_A"][1]  # some correlated pairs
    g["y.lora_B"][1] = g["y.lora_B"][0] + 0.5 * g["y.lora_B"][1]
    flat = torch.cat([g[n].reshape(6, -1) for n in sorted(shapes)], 1).double()
    p = proj.project(g).double()
    exact, approx = flat @ flat.T, p @ p.T
    norms = exact.diag().sqrt()
    err = (approx - exact).abs() / torch.outer(norms, norms)
    assert float(err.max()) < 0.1, err
    assert float(err.mean()) < 0.04


# ----------------------------------------------------------------------------- scoring algebra
def test_normalize_rows_per_timestep():
    g = np.random.default_rng(0).normal(size=(3, 4, 5)) * np.arange(1, 5)[None, :, None]
    g[1, 2] = 0
    n = normalize_rows(g)
    norms = np.linalg.norm(n, axis=-1)
    np.testing.assert_allclose(np.delete(norms.reshape(-1), 1 * 4 + 2), 1.0, rtol=1e-5)
    assert norms[1, 2] == 0
    np.testing.assert_allclose(n[0, 3], g[0, 3] / np.linalg.norm(g[0, 3]), rtol=1e-5)


@pytest.mark.parametrize("N,D", [(6, 20), (30, 5)])
def test_trak_scores_equal_direct_formula(N, D):
    rng = np.random.default_rng(N)
    G, q = rng.normal(size=(N, D)), rng.normal(size=(3, D))
    K = G.T @ G
    lam = 0.3 * np.mean(np.diag(K))
    direct = q @ np.linalg.inv(K + lam * np.eye(D)) @ G.T
    np.testing.assert_allclose(trak_scores(G, q, 0.3), direct, rtol=1e-4, atol=1e-6)
    with pytest.raises(ScorerError):
        trak_scores(G, q, 0.0)
    assert np.all(trak_scores(np.zeros((N, D)), q) == 0)


def test_dtrak_combine_sums_timesteps():
    rng = np.random.default_rng(1)
    gt, gq = rng.normal(size=(5, 3, 8)), rng.normal(size=(2, 3, 8))
    np.testing.assert_allclose(dtrak_combine(gt, gq, 0.1), trak_scores(gt.sum(1), gq.sum(1), 0.1), rtol=1e-6)


def test_tracin_combine_formula():
    rng = np.random.default_rng(2)
    pairs = [(lr, rng.normal(size=(2, 3, 6)) * 10, rng.normal(size=(4, 3, 6))) for lr in (0.5, 2.0)]
    expect = np.zeros((2, 4))
    for lr, gq, gt in pairs:
        for q in range(2):
            for i in range(4):
                for t in range(3):
                    a, b = gq[q, t], gt[i, t]
                    expect[q, i] += lr * a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    np.testing.assert_allclose(tracin_combine(pairs), expect, rtol=1e-5)


def test_tracin_checkpoints_and_learning_rate():
    assert tracin_checkpoints(0) == [0]
    assert tracin_checkpoints(3) == [1, 2, 3]
    cfg = {"train": {"lr": 1e-3, "warmup_steps": 10}}
    assert learning_rate(cfg, 5) == pytest.approx(5e-4)
    assert learning_rate(cfg, 50) == pytest.approx(1e-3)
    with pytest.raises(ScorerError, match="optimizer="):
        learning_rate({"train": {}}, 1)
    # the lr the monitor read from the optimizer at the checkpoint wins over any schedule formula
    assert learning_rate(cfg, 5, recorded=3e-4) == 3e-4 and learning_rate({}, 5, recorded=2e-5) == 2e-5
    assert learning_rate(cfg, 5, recorded=float("nan")) == pytest.approx(5e-4)


# ----------------------------------------------------------------------------- scorers end to end
def test_scorers_are_registered():
    assert {"dtrak", "tracin"} <= set(_REGISTRY)
    assert _REGISTRY["dtrak"]().name == "dtrak" and _REGISTRY["tracin"]().name == "tracin"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    comps = tiny_components(seed=3)
    images = random_images(6, 10)
    captions = ["a circle by artist-0", "a square by artist-0", "a ring by artist-0",
                "a circle by artist-1", "a square by artist-1", "a ring by artist-1"]
    return tmp_path_factory.mktemp("planted"), comps, images, captions


@pytest.mark.parametrize("method", ["dtrak", "tracin"])
def test_planted_training_image_scores_highest(planted, method, monkeypatch):
    """A query that IS training sample j (same image, caption and noise draw) scores j highest.

    (Queries normally get their own noise draws; on this random, untrained tiny model the gradients of
    one image under two different noise draws are not reliably closer than those of two images, so
    the planted query shares the training item's noise: QUERY_SEED_OFFSET -> 0, item seed = index.)
    """
    import montrage.analysis.gradient_scorers as GS

    monkeypatch.setattr(GS, "QUERY_SEED_OFFSET", GS.TRAIN_SEED_OFFSET)
    tmp, comps, images, captions = planted
    idx = [4, 1, 0]
    ctx = make_context(tmp / method, comps, images, captions, planted_queries(images, captions, idx, seeds=idx),
                       options={"proj_dim": 256})
    scores = SCORERS[method]().score(ctx)
    assert scores.shape == (3, 6) and scores.dtype == np.float32 and np.isfinite(scores).all()
    assert scores.argmax(1).tolist() == idx, scores
    if method == "tracin":  # unit-normalised: an identical sample scores lr * T at each of checkpoints 1, 2
        np.testing.assert_allclose(scores[np.arange(3), idx], 2 * 1e-3 * len(TIMESTEPS), rtol=1e-4)


def test_tracin_uses_checkpoints_1_to_k(planted):
    tmp, comps, images, captions = planted
    q = planted_queries(images, captions, [0])
    ctx = make_context(tmp / "ck", comps, images, captions, q, options={"proj_dim": 64})
    full = TracInScorer().score(ctx)
    keys = sorted(k for k in ctx._cache if k.startswith("grad/train/"))
    assert [k.split("/")[3] for k in keys] == ["1", "2"]  # checkpoint 0 (before training) skipped
    ctx.checkpoint = 0
    only0 = TracInScorer().score(ctx)
    assert only0.shape == full.shape and not np.allclose(only0, full)


def test_training_images_come_from_the_store(tmp_path, planted):
    _, comps, images, captions = planted
    ctx = make_context(tmp_path, comps, images, captions, planted_queries(images, captions, [0]))
    ts = training_images(ctx.store)
    assert ts.images.shape == (6, 8, 8, 3) and ts.captions == captions
    np.testing.assert_array_equal(ts.images, images)


def test_missing_lora_weights_is_a_scorer_error(tmp_path, planted):
    _, comps, images, captions = planted
    ctx = make_context(tmp_path, comps, images, captions, planted_queries(images, captions, [0]), n_ckpt=2)
    ctx.store._weights[1] = {k: np.full_like(v, np.nan) for k, v in ctx.store._weights[1].items()}
    with pytest.raises(ScorerError, match="LoRA weights"):
        DTrakScorer().score(ctx)
