"""The packed prompt + chosen + rejected forward equals the stacked [chosen; rejected] batch,
values and gradients, on three architectures, both attention kernels, with and without LoRA."""

from __future__ import annotations

import pytest
import torch
from test_logprobs import random_ids, tiny_model

from prefalign.logprobs import collate_prompt_response
from prefalign.modeling import LoraSpec, add_lora
from prefalign.shared_prompt import collate_shared_pairs, pair_logps, shared_prompt_exact

pytestmark = pytest.mark.usefixtures("one_thread")


def random_pairs(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return tuple([random_ids(g, 1, 9 if k == 0 else 10) for _ in range(n)] for k in range(3))


def both_layouts(prompts, chosen, rejected):
    stacked = collate_prompt_response(prompts + prompts, chosen + rejected, pad_id=0)
    return stacked, collate_shared_pairs(prompts, chosen, rejected, pad_id=0)


def logps_and_grads(model, batch, weights):
    model.zero_grad(set_to_none=True)
    chosen, rejected = pair_logps(model, batch)
    ((chosen.sum - 0.5 * rejected.sum) * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return chosen, rejected, grads


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_equals_concatenated(arch, attention, lora):
    model = tiny_model(arch)
    model.set_attn_implementation(attention)
    if lora:
        model = add_lora(model, LoraSpec(r=4))
    assert shared_prompt_exact(model)
    prompts, chosen, rejected = random_pairs()
    stacked, packed = both_layouts(prompts, chosen, rejected)
    assert packed["input_ids"].numel() < stacked["input_ids"].numel()
    weights = torch.linspace(-1.0, 2.0, len(prompts))
    ref_c, ref_r, ref_grads = logps_and_grads(model, stacked, weights)
    c, r, grads = logps_and_grads(model, packed, weights)
    for got, want in ((c, ref_c), (r, ref_r)):
        torch.testing.assert_close(got.sum, want.sum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.n_tokens, want.n_tokens)
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prompt_is_off_where_it_would_not_be_exact():
    model = tiny_model("llama")
    model.config.model_type = "bloom"  # ALiBi: positions from the mask, not position_ids
    assert not shared_prompt_exact(model)
    mistral_like = tiny_model("llama")
    mistral_like.config.sliding_window = 16
    assert not shared_prompt_exact(mistral_like)
    assert shared_prompt_exact(mistral_like, max_width=16)
