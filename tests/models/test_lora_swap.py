"""In-place LoRA loads (the analysis' checkpoint switches) equal peft's loader; eval_mode restores the mode."""
import numpy as np
import pytest
import torch

from montrage.errors import ConfigError
from montrage.models.components import eval_mode
from montrage.models.lora import copy_lora_state, load_lora_state, lora_slots, lora_state
from tests.analysis.test_gradients import randomize_lora, tiny_components


def test_copy_lora_state_equals_peft_loader_and_refuses_other_layouts():
    a, b = tiny_components(0), tiny_components(0)
    randomize_lora(a.unet, 11)
    wanted = {k: v.numpy().copy() for k, v in lora_state(a.unet).items()}  # numpy, as the store returns them
    randomize_lora(a.unet, 12)
    randomize_lora(b.unet, 12)
    load_lora_state(a.unet, wanted)
    slots = lora_slots(b.unet)
    assert set(slots) == set(wanted)
    copy_lora_state(slots, wanted)
    sa, sb = lora_state(a.unet), lora_state(b.unet)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(np.array_equal(sb[k].numpy(), wanted[k]) for k in wanted)
    x, t = torch.randn(2, *a.latent_shape), torch.tensor([10, 500])
    cond = a.encode_prompts(["a", "b"])
    with torch.no_grad():
        assert torch.equal(a.predict(x, t, cond), b.predict(x, t, cond))
    with pytest.raises(ConfigError, match="LoRA state"):
        copy_lora_state(slots, {k: v for k, v in list(wanted.items())[1:]})


def test_eval_mode_restores_and_is_free_when_already_in_eval():
    comps = tiny_components(0)
    unet = comps.unet
    unet.train()
    with eval_mode(unet):
        assert not any(m.training for m in unet.modules())
    assert all(m.training for m in unet.modules())
    unet.eval()
    calls = []
    unet.train = lambda mode=True: calls.append(mode)  # would be called to switch modes
    with eval_mode(unet):
        pass
    assert calls == []
