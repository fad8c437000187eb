"""Scorer interface and registry: featurize, then score (as in trak).

A scorer maps a :class:`ScoringContext` (the run store, the queries, the checkpoint to attribute at)
to a (query x training image) score matrix; higher means "more attributable". Every scorer writes the
same JSON contract through :mod:`montrage.analysis.attribute`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol

import numpy as np

from montrage.errors import ScorerError
from montrage.models.checkpoints import RunModel
from montrage.storage import RunStore


@dataclass
class QuerySet:
    """Images to attribute: probes of the run, or arbitrary images (``--images``)."""

    ids: List[str]
    images: np.ndarray  # uint8 (Q, H, W, 3)
    prompts: List[str]  # '' when unknown (arbitrary images): null-prompt features are used then
    seeds: List[Optional[int]]
    item_seeds: List[int]  # fix the featurization noise of each query
    probe_indices: Optional[List[int]] = None  # set when the queries are the run's probes
    concepts: List[str] = field(default_factory=list)  # expected concept per query, '' if unknown
    meta: List[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def key(self) -> str:
        """Identifies the query set in caches shared across query sets (ids, prompts, seeds, pixels)."""
        import hashlib

        h = hashlib.sha256()
        h.update(repr((self.ids, self.prompts, self.item_seeds)).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()[:16]


# Cache keys of values that depend on the run alone (committed store data, the model, fits on the run's own
# anchors), never on the queries or on in-memory training gradients. They are kept in the store's
# ``reader_cache``, so every ``attribute`` call on the same RunStore object reuses them (a warm extra query pays
# for its own features only); other keys live in the context's cache, i.e. for one call unless the caller passes
# ``ctx_cache``. Post-hoc baselines keep their training-side passes per call (``grad/train/`` computed in memory,
# ``concept-trak/train/``): that is the method's own cost.
RUN_LEVEL_PREFIXES = ("dyn/", "grad/stored/", "grad/training_images", "grad/projector/", "grad/lora-finite/",
                      "fused/dyn-model/", "text-only/encoder/captions")


@dataclass
class ScoringContext:
    store: RunStore
    queries: QuerySet
    checkpoint: int  # index of the checkpoint attributed at (uses checkpoints 0..checkpoint)
    condition: str = "null"
    device: str = "cpu"
    progress: bool = True
    options: Dict[str, object] = field(default_factory=dict)  # scorer-specific (e.g. concept phrase)
    _model: Optional[RunModel] = None
    _cache: Dict[str, object] = field(default_factory=dict)

    @property
    def run_cache(self) -> Dict[str, object]:
        """The cache of run-level values: the store's ``reader_cache`` (shared by every context on that store
        object), or this context's cache for a store-like object without one."""
        cache = getattr(self.store, "reader_cache", None)
        return cache if isinstance(cache, dict) else self._cache

    @property
    def model(self) -> RunModel:
        """The run's model: loaded once per store object and device (kept in :attr:`run_cache`)."""
        if self._model is None:
            base = self.options.get("base")  # `montrage attribute --base PATH`: where the run's base model is now
            base = str(base) if base else None
            self._model = self.run_cache_get(
                f"model/{self.device}/{base}",
                lambda: RunModel(self.store.run_config, device=self.device, base_override=base))
        return self._model

    def components_at(self, k: int):
        """Model components with the LoRA weights of checkpoint index ``k`` (read and loaded only on a switch)."""
        model = self.model
        if getattr(model, "current", None) == k and hasattr(model, "components"):
            return model.components
        return model.set_weights(self.store.lora_weights(k), tag=k)

    def run_cache_get(self, key: str, make: Callable[[], object]) -> object:
        cache = self.run_cache
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def has(self, key: str) -> bool:
        """Whether ``key`` is already in the cache :meth:`cached` keeps it in (callers that batch work skip what
        is done)."""
        return key in (self.run_cache if key.startswith(RUN_LEVEL_PREFIXES) else self._cache)

    def cached(self, key: str, make: Callable[[], object]) -> object:
        """``make()`` once per key: per store object for run-level keys (:data:`RUN_LEVEL_PREFIXES`), else per
        context cache."""
        if key.startswith(RUN_LEVEL_PREFIXES):
            return self.run_cache_get(key, make)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


class Scorer(Protocol):
    name: str
    description: str

    def score(self, ctx: ScoringContext) -> np.ndarray:
        """(len(queries), n_train) scores."""


_REGISTRY: Dict[str, Callable[[], Scorer]] = {}


def register(name: str) -> Callable:
    def deco(factory: Callable[[], Scorer]) -> Callable[[], Scorer]:
        _REGISTRY[name] = factory
        return factory
    return deco


def get_scorer(name: str) -> Scorer:
    _load_builtin()
    if name not in _REGISTRY:
        raise ScorerError(f"unknown attribution method {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def available() -> List[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    """Import the modules whose scorers register themselves (kept lazy: they pull in torch.func etc.)."""
    import importlib

    for mod in ("montrage.analysis.scorers", "montrage.analysis.gradient_scorers", "montrage.analysis.concept_trak",
                "montrage.analysis.text_baseline", "montrage.analysis.fused"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
