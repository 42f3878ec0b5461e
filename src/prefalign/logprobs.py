"""Sequence log-probabilities of responses, prompt tokens masked.

Batches are right-padded token matrices with a `loss_mask` that is True on response tokens.
A preference batch stacks its B chosen rows on top of its B rejected rows, so the policy (and
the reference) score both halves in one forward pass.

Response-only head: a Hugging Face causal LM runs its decoder body over every position, but the
output embedding (vocabulary V) only over the positions that predict a response token, in chunks
of at most `HEAD_CHUNK_ELEMENTS` logits, each reduced at once to log p(label) by a log-sum-exp in
fp32 and recomputed in backward (activation checkpointing per chunk). Memory for the head is one
chunk instead of an fp32 [N, T, V] tensor, and prompt positions cost no head FLOPs. This is the
chunked cross-entropy idea of Wijmans et al., "Cut Your Losses in Large-Vocabulary Language
Models" (2024), applied to the positions a preference loss reads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from prefalign.training.tied_embedding import open_link

# Logits per head chunk: 2^24 fp32 values = 64 MiB (341 positions of a 49,152-token vocabulary).
HEAD_CHUNK_ELEMENTS = 2**24
# Config fields of architectures that transform logits after the output embedding; the
# response-only head would skip the transform, so such models take the full-logits path.
POST_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class SequenceLogps:
    """Per-sequence summed log-probs of response tokens and the number of those tokens."""

    sum: torch.Tensor  # [N]
    n_tokens: torch.Tensor  # [N]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n_tokens.clamp(min=1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under logits, one value per position, without a [N, T, V] log-softmax copy."""
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@dataclass
class CausalLMParts:
    """The pieces of a Hugging Face causal LM the response-only head needs."""

    body: torch.nn.Module  # the decoder: its first output is the hidden state the head reads
    head: torch.nn.Module  # the output embedding (possibly LoRA-wrapped)
    vocab_size: int


def causal_lm_parts(model: torch.nn.Module) -> CausalLMParts | None:
    """Body and head of a (DDP-, peft- or FSDP-wrapped) Hugging Face causal LM, or None where the
    response-only head would not be exact (no such structure, or logits transformed after it)."""
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    prefix = getattr(inner, "base_model_prefix", "")
    body = getattr(inner, prefix, None) if prefix else None
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    config = getattr(inner, "config", None)
    if body is None or head is None or config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text_config, key, None) for key in POST_HEAD_TRANSFORMS):
        return None
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return None
    return CausalLMParts(body=body, head=head, vocab_size=int(text_config.vocab_size))


class _LinearTokenLogps(torch.autograd.Function):
    """log p(labels) under hidden @ weight.T + bias in fp32, whose backward turns the saved
    logits into the softmax gradient in place: no logits-sized temporaries (a plain
    logsumexp/gather backward makes three or four, 54 MB each for 274 positions of a
    49,152-token vocabulary). Its backward runs once (the saved logits are consumed)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, link=None):
        logits = torch.nn.functional.linear(hidden, weight, bias)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        picked = logits.gather(-1, labels.unsqueeze(-1))
        ctx.save_for_backward(hidden, weight, logits, lse, labels)
        ctx.has_bias, ctx.consumed, ctx.link = bias is not None, False, link
        return (picked - lse).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        if ctx.consumed:
            raise RuntimeError("the response-only head's backward runs once (retain_graph)")
        ctx.consumed = True
        hidden, weight, logits, lse, labels = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        # d/dlogits of (picked - lse) = onehot(label) - softmax, times the incoming gradient.
        softmax_grad = logits.sub_(lse).exp_().mul_(-grad)
        softmax_grad.scatter_add_(-1, labels.unsqueeze(-1), grad)
        return _linear_grads(ctx, softmax_grad, hidden, weight)


# Rows of bf16 logits widened to fp32 at a time by the bf16 head (12 MB at a 49,152 vocabulary).
BF16_HEAD_ROWS = 64


def _bf16_log_softmax_rows(logits: torch.Tensor, start: int) -> torch.Tensor:
    """fp32 log-softmax of BF16_HEAD_ROWS rows of bf16 logits: the fused kernel, row by row the
    same values as over the whole chunk."""
    return torch.log_softmax(logits[start : start + BF16_HEAD_ROWS], dim=-1, dtype=torch.float32)


class _Bf16LinearTokenLogps(torch.autograd.Function):
    """log p(labels) under bf16 logits hidden @ weight.T + bias, as one fp32 log-softmax (the
    plain path's values), saving only the bf16 logits: backward turns them into the bf16
    softmax gradient in place, widening BF16_HEAD_ROWS rows at a time. The plain path keeps an
    fp32 log-softmax of the chunk for backward and makes two more fp32 and one bf16
    logits-sized tensors in it (55 MB each in fp32 for 280 positions of a 49,152 vocabulary).
    Its backward runs once (the saved logits are consumed)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, link=None):
        logits = torch.nn.functional.linear(hidden, weight, bias)
        picked = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
        for start in range(0, logits.shape[0], BF16_HEAD_ROWS):
            rows = _bf16_log_softmax_rows(logits, start)
            y = labels[start : start + BF16_HEAD_ROWS].unsqueeze(-1)
            picked[start : start + BF16_HEAD_ROWS] = rows.gather(-1, y).squeeze(-1)
        ctx.save_for_backward(hidden, weight, logits, labels)
        ctx.has_bias, ctx.consumed, ctx.link = bias is not None, False, link
        return picked

    @staticmethod
    def backward(ctx, grad):
        if ctx.consumed:
            raise RuntimeError("the response-only head's backward runs once (retain_graph)")
        ctx.consumed = True
        hidden, weight, logits, labels = ctx.saved_tensors
        for start in range(0, logits.shape[0], BF16_HEAD_ROWS):
            g = grad[start : start + BF16_HEAD_ROWS].unsqueeze(-1)
            # d/dlogits of log_softmax[label] = onehot(label) - softmax, times the gradient.
            rows = _bf16_log_softmax_rows(logits, start).exp_().mul_(-g)
            rows.scatter_add_(-1, labels[start : start + BF16_HEAD_ROWS].unsqueeze(-1), g)
            logits[start : start + BF16_HEAD_ROWS].copy_(rows)  # rounded to bf16, as autograd
        return _linear_grads(ctx, logits, hidden, weight)


def _linear_grads(ctx, softmax_grad, hidden, weight):
    """The gradients of hidden, weight and bias of a head Function from the logits' gradient
    (a tied weight's part goes into its link; `prefalign.training.tied_embedding`)."""
    grad_hidden = softmax_grad @ weight if ctx.needs_input_grad[0] else None
    grad_weight = None
    if ctx.needs_input_grad[1]:
        link = ctx.link
        if link is not None and link.open:  # a tied weight: its lookup returns the sum
            link.add_product(softmax_grad.t(), hidden)
        else:
            grad_weight = softmax_grad.t() @ hidden
    grad_bias = softmax_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_hidden, grad_weight, grad_bias, None, None


def _chunk_logps(
    head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, link=None
) -> torch.Tensor:
    weight = getattr(head, "weight", None)
    if (
        type(head) is torch.nn.Linear  # not a LoRA-wrapped or quantized head
        and not (head._forward_hooks or head._forward_pre_hooks)  # FSDP's unshard, observers
        and type(weight) is torch.nn.Parameter  # not a DTensor shard
        and weight.dtype == hidden.dtype
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled(hidden.device.type)
    ):
        if weight.dtype == torch.float32:
            return _LinearTokenLogps.apply(hidden, weight, head.bias, labels, link)
        if weight.dtype == torch.bfloat16:  # bf16 working weights
            return _Bf16LinearTokenLogps.apply(hidden, weight, head.bias, labels, link)
    logits = head(hidden)
    if logits.dtype == torch.float32:  # the arithmetic of _LinearTokenLogps' forward: a
        return token_logps(logits, labels)  # no-grad reference equals the policy bit for bit
    # bf16 logits (bf16 weights, autocast): one fused log-softmax widened to fp32 inside the
    # kernel, then the labels' entries: 1.5x faster forward and backward on the CPU than
    # widening, log-sum-exp and gather as separate passes. Its output is one chunk.
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def head_token_logps(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """log p(labels[i] | hidden[i]) for [M, H] hidden states, chunk by chunk.

    With autograd on and more than one chunk, each chunk is checkpointed: backward recomputes its
    logits, so at most one chunk of logits is alive at any time.
    """
    rows = max(1, (chunk_elements or HEAD_CHUNK_ELEMENTS) // vocab_size)
    # A tied weight's gradient buffer, taken now: a recomputed chunk must add to this forward's.
    weight = getattr(head, "weight", None)
    link = open_link(weight) if isinstance(weight, torch.Tensor) else None
    if hidden.shape[0] <= rows:
        return _chunk_logps(head, hidden, labels, link)
    recompute = torch.is_grad_enabled()
    out = []
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start : start + rows], labels[start : start + rows]
        if recompute:
            out.append(checkpoint(_chunk_logps, head, h, y, link, use_reentrant=False))
        else:
            out.append(_chunk_logps(head, h, y, link))
    return torch.cat(out)


def gathered_token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """log p(labels[i]) predicted from the hidden state at (rows[i], cols[i]); None if the model
    has no exact response-only head (callers then use the full logits).

    The head runs inside the model's own forward call (a hook on the decoder body), so DDP and
    FSDP wrappers see one ordinary forward; the model's own head call projects no position.
    """
    parts = causal_lm_parts(model)
    if parts is None:
        return None
    result: list[torch.Tensor] = []

    def on_body_output(module, args, output):
        hidden = output[0][rows, cols]
        result.append(head_token_logps(parts.head, hidden, labels, parts.vocab_size))

    handle = parts.body.register_forward_hook(on_body_output)
    # No position for the model's own head call: `logits_to_keep=1` would project each row's
    # last position through the full vocabulary once more for nothing (an empty index list is
    # transformers' `slice_logits_to_keep` API).
    none_kept = torch.empty(0, dtype=torch.long, device=input_ids.device)
    try:
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            logits_to_keep=none_kept,
            **kwargs,
        )
    finally:
        handle.remove()
    return result[0]


def full_logits_sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
) -> SequenceLogps:
    """`sequence_logps` through the model's full [N, T, V] logits (any model returning logits)."""
    input_ids, attention_mask, loss_mask = _trim(input_ids, attention_mask, loss_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    # Position t predicts token t+1: shift labels and mask left by one.
    per_token = token_logps(logits[:, :-1], input_ids[:, 1:])
    mask = loss_mask[:, 1:].to(per_token.dtype)
    return SequenceLogps(sum=(per_token * mask).sum(dim=1), n_tokens=mask.sum(dim=1))


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
) -> SequenceLogps:
    """Sum of log p(y_t | x, y_<t) over the positions where `loss_mask` is True.

    Padding is trimmed to the longest real row first, so a batch never pays for more columns than
    its longest sequence. Hugging Face causal LMs take the response-only head; other models
    (anything whose forward returns `.logits`) the full logits.
    """
    input_ids, attention_mask, loss_mask = _trim(input_ids, attention_mask, loss_mask)
    mask = loss_mask[:, 1:]
    rows, cols = mask.nonzero(as_tuple=True)
    labels = input_ids[:, 1:][rows, cols]
    per_token = gathered_token_logps(model, input_ids, attention_mask, rows, cols, labels)
    if per_token is None:
        return full_logits_sequence_logps(model, input_ids, attention_mask, loss_mask)
    return SequenceLogps(
        sum=per_row_sums(per_token, rows, input_ids.shape[0]), n_tokens=mask.sum(dim=1).float()
    )


def per_row_sums(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def _trim(input_ids, attention_mask, loss_mask):
    width = int(attention_mask.sum(dim=1).max())
    return input_ids[:, :width], attention_mask[:, :width], loss_mask[:, :width]


def split_pairs(logps: SequenceLogps) -> tuple[SequenceLogps, SequenceLogps]:
    """Split the stacked [chosen; rejected] result of a preference batch into its halves."""
    half = logps.sum.shape[0] // 2
    return (
        SequenceLogps(logps.sum[:half], logps.n_tokens[:half]),
        SequenceLogps(logps.sum[half:], logps.n_tokens[half:]),
    )


def nll_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-averaged negative log-likelihood of the response tokens of a batch (SFT, BC)."""
    logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    return -logps.sum.sum() / logps.n_tokens.sum().clamp(min=1)


def pad_right(rows: list[list[int]], pad_value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate_prompt_response(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch of prompt+response token lists with a response-only loss mask."""
    rows = [p + r for p, r in zip(prompts, responses, strict=True)]
    input_ids = pad_right(rows, pad_id)
    attention_mask = pad_right([[1] * len(r) for r in rows], 0)
    loss_mask = pad_right(
        [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses, strict=True)], 0
    )
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask.bool()}
