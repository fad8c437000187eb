from benchmarks.realsize import measure


def test_realsize_measures_every_component_on_a_small_unet():
    r = measure(small=True, batch=2)
    for key in ("train_step_s", "capture_per_image_s", "probe_per_image_s", "per_sample_grad_s"):
        assert r[key] > 0, key
    assert r["capture_image_over_step"] == r["capture_per_image_s"] / r["train_step_s"]
    assert r["lora_params"] > 0 and r["capture_timesteps"] == 3 and r["capture_conditions"] == 2
