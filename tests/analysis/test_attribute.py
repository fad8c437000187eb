"""Concept proportions and the JSON contract helpers of montrage.analysis.attribute."""
import numpy as np

from montrage.analysis.attribute import proportions


def test_proportions_keep_every_concept_and_are_offset_and_scale_free():
    p = proportions({"a": 0.9, "b": 0.5, "c": 0.1})
    assert abs(sum(p.values()) - 1) < 1e-9
    assert p["a"] > p["b"] > p["c"] > 0  # the weakest concept is not forced to 0
    q = proportions({"a": 90.0 + 7, "b": 50.0 + 7, "c": 10.0 + 7})
    np.testing.assert_allclose([p[c] for c in "abc"], [q[c] for c in "abc"], rtol=1e-9)


def test_proportions_ties_and_scale():
    assert proportions({"a": 1.0, "b": 1.0}) == {"a": 0.5, "b": 0.5}
    wide = proportions({"a": 1.0, "b": 0.0}, scale=10.0)
    narrow = proportions({"a": 1.0, "b": 0.0}, scale=0.1)
    assert 0.5 < wide["a"] < narrow["a"] < 1.0
    assert proportions({}) == {}


def test_compare_attributes_probe_generations_without_their_prompts(tiny_run, monkeypatch):
    """'When was a concept learned' must be read from the generations, not from a prompt that names the concept:
    compare withholds the probes' prompts by default (text-path channels would otherwise attribute the base
    model's generations to the named concept at step 0)."""
    import montrage.analysis.compare as C
    from montrage.storage import RunStore

    seen = []
    real = C.attribute

    def spy(*args, **kwargs):
        seen.append(list(kwargs["queries"].prompts))
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "attribute", spy)
    prompts = list(RunStore.open(tiny_run).probe_meta["prompts"])
    assert any(p.strip() for p in prompts)
    C.compare(tiny_run, "final-sim", progress=False)
    assert seen and all(p == [""] * len(prompts) for p in seen)
    seen.clear()
    C.compare(tiny_run, "final-sim", progress=False, image_only=False)
    assert seen and all(p == prompts for p in seen)
