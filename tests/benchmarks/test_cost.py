import numpy as np

from benchmarks.cost import measure_throughput


def test_throughput_measures_the_scorer_against_a_plain_matmul(tmp_path):
    r = measure_throughput(n_train=600, n_queries=8, feature=16, timesteps=2, checkpoints=3, root=tmp_path)
    assert r["scorer_s"] > 0 and r["plain_matmul_s"] > 0
    flops = 2.0 * 8 * 600 * 16 * 2 * (3 + 2)
    np.testing.assert_allclose(r["scorer_gflops"], flops / r["scorer_s"] / 1e9)
    np.testing.assert_allclose(r["rate_vs_plain"], r["plain_matmul_s"] / r["scorer_s"])


def test_gradient_cost_ratios_compare_each_query_kind_with_dtrak_on_the_same_kind():
    """A prompt-known query is judged against dtrak's prompt-known time, an image-only one against dtrak's image-only
    time; the target verdict applies to the prompt-known row only."""
    from benchmarks.cost import gradient_markdown, with_ratios

    timed = lambda s: {"first_s": 5.0, "extra_s": s, "extra_all_s": [s, s * 1.1]}  # noqa: E731
    g = with_ratios({"train_images": 56, "featurize": {"seconds": 21.0, "bytes": 2 ** 20, "outputs": {}},
                     "dtrak_recompute": timed(2.0), "dtrak_stored": timed(0.1), "montrage": timed(0.3),
                     "image_dtrak_recompute": timed(4.0), "image_montrage": timed(1.0)})
    assert g["montrage"]["extra_vs_dtrak_today"] == 0.15 and g["image_montrage"]["extra_vs_dtrak_today"] == 0.25
    md = gradient_markdown(g)
    assert "| montrage (fused model) | 0.30 | 0.30-0.33 | 0.150 | **missed** (1.50x the budget) |" in md
    assert "| dtrak reading the stored features | 0.10 | 0.10-0.11 | 0.050 | met |" in md
    assert "| montrage (fused model, its image-only channel set) | 1.00 | 1.00-1.10 | 0.250 | none (reported) |" in md
    assert "image_montrage 5.00 s" in md
    no_image = with_ratios({k: v for k, v in g.items() if not k.startswith("image_")})
    assert "image-only" not in gradient_markdown(no_image)
