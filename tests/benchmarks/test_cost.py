import numpy as np

from benchmarks.cost import measure_throughput


def test_throughput_measures_the_scorer_against_a_plain_matmul(tmp_path):
    r = measure_throughput(n_train=600, n_queries=8, feature=16, timesteps=2, checkpoints=3, root=tmp_path)
    assert r["scorer_s"] > 0 and r["plain_matmul_s"] > 0
    flops = 2.0 * 8 * 600 * 16 * 2 * (3 + 2)
    np.testing.assert_allclose(r["scorer_gflops"], flops / r["scorer_s"] / 1e9)
    np.testing.assert_allclose(r["rate_vs_plain"], r["plain_matmul_s"] / r["scorer_s"])
