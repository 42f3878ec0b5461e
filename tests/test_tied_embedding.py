"""A tied embedding's gradient built in one buffer (prefalign.training.tied_embedding): the same
gradients as autograd's plain sum of the head's and the lookup's parts, one chunked or not,
with a padding row, and without the lookup's dense [V, H] gradient or a [V, H] gradient per
head chunk."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama_config
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

import prefalign.logprobs as logprobs
from prefalign.logprobs import sequence_logps
from prefalign.training.tied_embedding import link_tied_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")


class VocabSized(TorchDispatchMode):
    """Counts the new buffers shaped like the embedding weight (full-vocabulary gradients)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }  # in-place ops and views return an input's storage: nothing new
        outs = out if isinstance(out, (list, tuple)) else [out]
        self.count += sum(
            isinstance(o, torch.Tensor)
            and o.shape == self.shape
            and o.untyped_storage().data_ptr() not in inputs
            for o in outs
        )
        return out


def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(tie_word_embeddings=True, vocab_size=96, hidden_size=64)
    return LlamaForCausalLM(config).train()


def batch(pad_id: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (4, 12), generator=g)
    ids[:, :3] = ids[0, :3]  # a shared prompt: repeated tokens
    ids[2, 9:] = pad_id  # padding read by the lookup
    attention = (ids != pad_id).long()
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, 3:] = attention[:, 3:].bool()
    return dict(input_ids=ids, attention_mask=attention, loss_mask=loss_mask)


def gradients(model, b) -> tuple[dict[str, torch.Tensor], int]:
    weight = model.get_input_embeddings().weight
    with VocabSized(weight.shape) as counter:
        out = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        (out.sum * torch.linspace(0.5, 1.5, out.sum.numel())).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, counter.count


@pytest.mark.parametrize(
    "chunks, dtype", [(1, torch.float32), (3, torch.float32), (3, torch.bfloat16)]
)
def test_linked_gradients_equal_the_plain_sum_with_one_vocabulary_sized_buffer(
    monkeypatch, chunks, dtype
):
    plain = tied_llama().to(dtype)  # bf16: the working weights of trainer.mixed_precision=bf16
    linked = copy.deepcopy(plain)
    assert link_tied_embeddings(linked) and not link_tied_embeddings(linked)  # once
    b = batch(plain.config.pad_token_id)
    positions = int(b["loss_mask"][:, 1:].sum())
    # Chunks of ceil(positions / chunks) rows: every chunk's backward adds into the buffer.
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", -(-positions // chunks) * 96)
    want, plain_buffers = gradients(plain, b)
    got, linked_buffers = gradients(linked, b)
    for name, g in want.items():
        if dtype == torch.float32:
            torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-7, msg=name)
        else:  # bf16 sums round at each add, in another order: within an ulp of the largest
            error = float((got[name].float() - g.float()).abs().max())
            assert error <= 2**-7 * float(g.float().abs().max()), name
    pad = plain.config.pad_token_id
    head_only = want["model.embed_tokens.weight"][pad]  # the padding row: the head's part only
    ulp = 0.0 if dtype == torch.float32 else 2**-7 * float(head_only.float().abs().max())
    torch.testing.assert_close(
        got["model.embed_tokens.weight"][pad].float(), head_only.float(), rtol=1e-6, atol=ulp
    )
    # Plain: one per head chunk plus the lookup's dense gradient (and their sums); linked: one.
    assert plain_buffers >= chunks + 1
    assert linked_buffers == 1


def test_untied_or_frozen_or_no_grad_lookups_keep_their_own_forward():
    torch.manual_seed(0)
    untied = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False))
    assert not link_tied_embeddings(untied)
    model = tied_llama()
    link_tied_embeddings(model)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert model(ids).logits.grad_fn is None
    model.requires_grad_(False)  # a LoRA base: nothing to link
    assert model.get_input_embeddings()(ids).grad_fn is None
