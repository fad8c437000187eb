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

    seen, options = [], []
    real = C.attribute

    def spy(*args, **kwargs):
        seen.append(list(kwargs["queries"].prompts))
        options.append(dict(kwargs["options"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "attribute", spy)
    prompts = list(RunStore.open(tiny_run).probe_meta["prompts"])
    assert any(p.strip() for p in prompts)
    C.compare(tiny_run, "final-sim", progress=False)
    assert seen and all(p == [""] * len(prompts) for p in seen)
    # and the fused model reads each checkpoint's own model only, whatever else the caller asks
    assert all(o == {"checkpoint_channels_only": True} for o in options)
    seen.clear()
    options.clear()
    C.compare(tiny_run, "final-sim", progress=False, options={"dtrak_lambda": 0.5})
    assert all(o == {"checkpoint_channels_only": True, "dtrak_lambda": 0.5} for o in options)
    seen.clear()
    C.compare(tiny_run, "final-sim", progress=False, image_only=False)
    assert seen and all(p == prompts for p in seen)


def test_the_json_carries_the_fused_models_fields_and_its_order_under_a_share_of_zero():
    """What the fused model adds per query reaches the JSON (private fields do not); with the other images' share
    at 0 their scores tie, and they are listed in the model's own order, not the files' order."""
    from types import SimpleNamespace

    from montrage.analysis.attribute import build_payload
    from montrage.analysis.base import QuerySet

    store = SimpleNamespace(train_meta={"file_names": [f"{i}.png" for i in range(4)],
                                        "concepts": ["a", "a", "b", "b"]}, run_dir="run")
    scores = np.array([[0.0, 0.0, 0.9, 0.0], [0.1, 0.4, 0.3, 0.2]], np.float32)
    queries = QuerySet(ids=["q0", "q1"], images=None, prompts=["caption of 2", "other"], seeds=[None, None],
                       item_seeds=[0, 1])
    info = [{"query_kind": "prompt", "channels": {"x": 1.0}, "exact_caption_first": [2], "others_share": 0.0,
             "others_share_why": "memorised", "_order": np.array([2, 3, 0, 1])},
            {"query_kind": "prompt", "channels": {"x": 1.0}, "exact_caption_first": []}]
    payload = build_payload(store, "montrage", 4, scores, queries, 4, "null", {"_query_info": info})
    q0, q1 = payload["queries"]
    assert [t["train_index"] for t in q0["top"]] == [2, 3, 0, 1] and q0["others_share"] == 0.0
    assert q0["others_share_why"] == "memorised"
    assert q0["exact_caption_first"] == [2] and not any(k.startswith("_") for k in q0)
    assert [t["train_index"] for t in q1["top"]] == [1, 2, 3, 0] and "others_share" not in q1
