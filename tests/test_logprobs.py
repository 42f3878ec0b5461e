"""The response-only, chunked head equals the full-logits log-probs, values and gradients, on
several architectures, tied embeddings, LoRA, and LoRA on the head itself."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB_SIZE, tiny_gpt2_config, tiny_llama_config, tiny_qwen2_config
from transformers import (
    GPT2LMHeadModel,
    LlamaForCausalLM,
    Qwen2ForCausalLM,
)

from prefalign import logprobs
from prefalign.logprobs import (
    causal_lm_parts,
    collate_prompt_response,
    full_logits_sequence_logps,
    sequence_logps,
)
from prefalign.modeling import LoraSpec, add_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(tiny_llama_config())
    if arch == "llama-tied":
        return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    if arch == "gpt2":  # learned positions, tied embeddings, Conv1D layers
        return GPT2LMHeadModel(tiny_gpt2_config(bos_token_id=1, eos_token_id=2))
    if arch == "qwen2":  # biased q/k/v projections, grouped-query attention
        return Qwen2ForCausalLM(tiny_qwen2_config(tie_word_embeddings=False))
    raise ValueError(arch)


def random_ids(g: torch.Generator, lo: int, hi: int) -> list[int]:
    """A random token list of length in [lo, hi), special tokens excluded."""
    length = int(torch.randint(lo, hi, (1,), generator=g))
    return torch.randint(4, VOCAB_SIZE, (length,), generator=g).tolist()


def random_batch(seed: int = 0, n: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prompts = [random_ids(g, 2, 9) for _ in range(n)]
    return collate_prompt_response(prompts, [random_ids(g, 1, 12) for _ in range(n)], pad_id=0)


def logps_and_grads(model, fn, batch, weights):
    model.zero_grad(set_to_none=True)
    out = fn(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    (out.sum * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gpt2", "qwen2"])
@pytest.mark.parametrize("lora", [None, "all-linear", "with-head"])
@pytest.mark.parametrize("chunks", ["one", "many"])
def test_response_only_head_equals_full_logits(arch, lora, chunks, monkeypatch):
    if chunks == "many":  # 3 positions a chunk: every batch spans several checkpointed chunks
        monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 3 * VOCAB_SIZE)
    model = tiny_model(arch)
    if lora == "all-linear":
        model = add_lora(model, LoraSpec(r=4, target_modules="all-linear"))
    elif lora == "with-head":
        targets = ["c_attn", "lm_head"] if arch == "gpt2" else ["q_proj", "v_proj", "lm_head"]
        model = add_lora(model, LoraSpec(r=4, target_modules=targets))
        head = causal_lm_parts(model).head
        assert hasattr(head, "lora_A"), "the head must carry the adapter"
        with torch.no_grad():  # peft zero-initialises B: make the head's adapter matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    assert causal_lm_parts(model) is not None
    batch = random_batch()
    weights = torch.linspace(-1.0, 2.0, batch["input_ids"].shape[0])
    fast, fast_grads = logps_and_grads(model, sequence_logps, batch, weights)
    plain, plain_grads = logps_and_grads(model, full_logits_sequence_logps, batch, weights)
    torch.testing.assert_close(fast.sum, plain.sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.n_tokens, plain.n_tokens)
    assert fast_grads.keys() == plain_grads.keys() and fast_grads
    if lora == "with-head":
        assert any("lm_head" in n and "lora" in n for n in fast_grads)
    for name in plain_grads:
        # float32 rounding is relative to the summed terms, not to the sum: an element that
        # cancels down to -0.37 in a LoRA gradient of scale 278 came out 1.6e-4 apart on an AVX2
        # CPU (the two paths sum in another order), so the absolute slack scales with the tensor.
        scale = max(1.0, plain_grads[name].abs().max().item())
        torch.testing.assert_close(
            fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6 * scale, msg=name
        )


def test_response_only_head_under_no_grad_and_bf16_autocast(monkeypatch):
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 3 * VOCAB_SIZE)
    model = tiny_model("llama")
    batch = random_batch(1)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_logps(model, *args).sum, full_logits_sequence_logps(model, *args).sum
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = sequence_logps(model, *args).sum
            plain = full_logits_sequence_logps(model, *args).sum
    assert fast.dtype == torch.float32  # log-probs stay fp32 under autocast
    torch.testing.assert_close(fast, plain, rtol=2e-2, atol=2e-2)


def test_models_that_transform_logits_take_the_full_logits_path():
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 30.0  # as Gemma 2 does after its head
    assert causal_lm_parts(model) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("grad", [True, False])
def test_head_runs_over_response_positions_only(arch, grad):
    # The model's own head call (after the body hook) must not project any position: with
    # `logits_to_keep=1` it ran one more [rows, V] matmul per forward (the last position).
    model = tiny_model(arch)
    batch = random_batch(n=4)
    projected: list[int] = []
    head = causal_lm_parts(model).head
    handle = head.register_forward_hook(
        lambda module, args, out: projected.append(args[0].shape[:-1].numel())
    )
    with torch.set_grad_enabled(grad):
        out = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    handle.remove()
    response_positions = int(batch["loss_mask"][:, 1:].sum())
    assert sum(projected) == response_positions
    expected = full_logits_sequence_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    )
    torch.testing.assert_close(out.sum, expected.sum)


def test_a_bf16_head_gives_the_fp32_logps_of_its_bf16_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB_SIZE, bias=False).to(torch.bfloat16)
    hidden = torch.randn(7, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, VOCAB_SIZE, (7,))
    ours = logprobs.head_token_logps(head, hidden, labels, VOCAB_SIZE, 3 * VOCAB_SIZE)
    (ours * torch.arange(1.0, 8.0)).sum().backward()
    ours_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    plain = logprobs.token_logps(head(hidden), labels)  # widened, log-sum-exp, gather
    (plain * torch.arange(1.0, 8.0)).sum().backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, (hidden.grad, head.weight.grad), strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-2)


def test_the_head_backward_runs_once_and_says_so():
    """Its saved logits become the gradient in place: a second backward would be wrong, so it
    raises instead."""
    head = torch.nn.Linear(8, VOCAB_SIZE, bias=False)
    hidden = torch.randn(5, 8, requires_grad=True)
    labels = torch.randint(0, VOCAB_SIZE, (5,))
    out = logprobs.head_token_logps(head, hidden, labels, VOCAB_SIZE)
    plain = logprobs.token_logps(head(hidden), labels)
    torch.testing.assert_close(out, plain)
    (grad,) = torch.autograd.grad(plain.sum(), hidden)
    out.sum().backward(retain_graph=True)
    torch.testing.assert_close(hidden.grad, grad)
    with pytest.raises(RuntimeError, match="runs once"):
        out.sum().backward()


@pytest.mark.parametrize("rows", [7, 150])  # one block of BF16_HEAD_ROWS, and three
def test_the_bf16_head_keeps_only_bf16_logits_for_backward_with_the_plain_values(rows):
    torch.manual_seed(0)
    vocab = 4096  # the logits dwarf hidden states and weights, as at a real vocabulary
    head = torch.nn.Linear(16, vocab, bias=True).to(torch.bfloat16)
    hidden = torch.randn(rows, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    scale = torch.linspace(0.5, 2.0, rows)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ours = logprobs.head_token_logps(head, hidden, labels, vocab)
    params = (hidden, head.weight, head.bias)
    ours_grads = torch.autograd.grad((ours * scale).sum(), params)
    logp = torch.log_softmax(head(hidden), dim=-1, dtype=torch.float32)  # the plain path
    plain = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    plain_grads = torch.autograd.grad((plain * scale).sum(), params)
    with torch.no_grad():  # a reference scoring without autograd: the same values, bit for bit
        assert torch.equal(logprobs.head_token_logps(head, hidden, labels, vocab), ours)
    assert torch.equal(ours, plain)
    for a, b in zip(ours_grads, plain_grads, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-3)
    # Saved: the bf16 logits (and hidden, weight, labels), not an fp32 log-softmax of the chunk.
    beside_logits = sum(saved.values()) - hidden.nbytes - head.weight.nbytes - labels.nbytes
    assert beside_logits == rows * vocab * 2  # an fp32 log-softmax would be twice that
