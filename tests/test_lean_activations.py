"""Lean RMSNorm / SwiGLU forwards: the same values and gradients as the model's own modules,
fewer bytes saved for backward, and no swap where a module is not recognised."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt2_config, tiny_llama_config, tiny_qwen2_config
from transformers import AutoModelForCausalLM

from prefalign.modeling import LoraSpec, add_lora
from prefalign.training.lean_activations import lean_activations

pytestmark = pytest.mark.usefixtures("one_thread")


def model_from(config, lora: bool = False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if lora:
        model = add_lora(model, LoraSpec(r=4, alpha=8))
        with torch.no_grad():  # nonzero B, so the adapters' gradients are not trivially equal
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return model.train()


def batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    loss = (logits.log_softmax(-1)[..., 3] * inputs["attention_mask"]).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def saved_bytes(model, inputs) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs).logits.sum()
    return sum(seen.values())


CONFIGS = {
    "llama": lambda: tiny_llama_config(),
    "llama-tied": lambda: tiny_llama_config(tie_word_embeddings=True),
    "qwen2": lambda: tiny_qwen2_config(),
}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_lean_forward_equals_plain(arch, lora):
    config = CONFIGS[arch]()
    plain = model_from(config, lora)
    lean = copy.deepcopy(plain)
    layers = config.num_hidden_layers
    # Two norms a layer and the final norm, one MLP a layer.
    assert lean_activations(lean) == 3 * layers + 1
    inputs = batch(config.vocab_size)
    plain_logits, plain_grads = loss_and_grads(plain, inputs)
    lean_logits, lean_grads = loss_and_grads(lean, inputs)
    torch.testing.assert_close(lean_logits, plain_logits, rtol=1e-5, atol=1e-5)
    assert lean_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert saved_bytes(lean, inputs) < saved_bytes(plain, inputs)


def test_lean_saves_the_normalized_input_and_the_mlp_products_less():
    """Per token and layer the lean model saves 2 hidden-size tensors (the norms' normalized
    inputs) and 2 intermediate-size ones (silu(gate), silu(gate) * up) fewer."""
    config = tiny_llama_config()
    plain = model_from(config)
    lean = copy.deepcopy(plain)
    lean_activations(lean)
    inputs = batch(config.vocab_size)
    tokens = inputs["input_ids"].numel()
    per_layer = 2 * config.hidden_size + 2 * config.intermediate_size
    final_norm = config.hidden_size
    expected = (config.num_hidden_layers * per_layer + final_norm) * tokens * 4
    assert saved_bytes(plain, inputs) - saved_bytes(lean, inputs) == expected


def test_lean_survives_a_deepcopy_and_keeps_the_copy_its_own():
    config = tiny_llama_config()
    model = model_from(config)
    lean_activations(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    inputs = batch(config.vocab_size)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, twin(**inputs).logits)
    norm = twin.model.norm
    assert norm.forward.__self__ is norm  # bound to the copy, not to the original


def test_unrecognised_modules_keep_their_forward():
    model = model_from(tiny_gpt2_config())  # LayerNorm and GELU MLP: nothing Llama-like
    assert lean_activations(model) == 0
    assert all("_plain_forward" not in m.__dict__ for m in model.modules())


def test_a_norm_with_other_arithmetic_is_not_swapped():
    """Gemma-style (1 + weight) scaling fails the probe against the module's own forward."""

    class OffsetRMSNorm(torch.nn.Module):
        def __init__(self, size: int):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(size))
            self.eps = 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    module = torch.nn.Sequential(OffsetRMSNorm(8))
    assert lean_activations(module) == 0
    x = torch.randn(2, 8)
    torch.testing.assert_close(module(x), module[0].forward(x))


def test_autocast_runs_the_plain_forward():
    config = tiny_llama_config()
    model = model_from(config)
    lean_activations(model)
    inputs = batch(config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = model(**inputs).logits
    for m in model.modules():
        if "_plain_forward" in m.__dict__:
            m.forward = m._plain_forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(**inputs).logits
    torch.testing.assert_close(lean, plain, rtol=0, atol=0)


def test_a_hooked_down_projection_runs_its_own_forward():
    """A hook on down_proj (an FSDP unit of its own unshards there) sees every call, and the
    values stay the plain ones."""
    config = tiny_llama_config()
    model = model_from(config)
    plain = copy.deepcopy(model)
    calls = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda module, args: calls.append(1))
    lean_activations(model)
    inputs = batch(config.vocab_size)
    calls.clear()
    lean_logits, lean_grads = loss_and_grads(model, inputs)
    assert len(calls) == config.num_hidden_layers
    plain_logits, plain_grads = loss_and_grads(plain, inputs)
    torch.testing.assert_close(lean_logits, plain_logits, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
