"""A tied embedding's gradient in one buffer: the output head's backward writes it, the input
lookup's backward adds its rows in place.

With tied input and output embeddings (SmolLM2, GPT-2, ...) the weight's gradient has two
parts: the output head's [V, H] product and the rows of the tokens the input lookup read.
Autograd makes each a full-vocabulary tensor and sums them when backward reaches the lookup,
its last step, where every other gradient is already alive: the lookup's dense [V, H] gradient
(108 MB in fp32 on SmolLM2-135M), and one more per chunk of a chunked head, are temporaries
at the peak of a full fine-tuning step. Here the lookup leaves a link in forward; the
response-only head (`prefalign.logprobs`) accumulates its part into the link's buffer in place
and returns no weight gradient, and the lookup's backward adds the rows of its tokens into that
buffer (summed per distinct token in fp32 first, as the dense backward sums them) and returns
it as the weight's one gradient. The values are the plain ones up to the order in which
repeated tokens' rows are summed; hooks on the weight's gradient (a step inside backward, bf16
masters) still see it once, complete.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary


class TiedLink:
    """The tied weight's gradient buffer of one forward, open until the lookup's backward."""

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None
        self.open = True

    def add_product(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """grad += a @ b, in place after the first."""
        if self.grad is None:
            self.grad = a @ b
        else:
            self.grad.addmm_(a, b)


# weight -> the link of the last forward's lookup (weak: a copied model shares no link).
_LINKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def open_link(weight: torch.Tensor) -> TiedLink | None:
    """The link a head reading `weight` accumulates into, if its lookup's backward is to come."""
    link = _LINKS.get(weight)
    return link if link is not None and link.open else None


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, link):
        ctx.save_for_backward(ids)
        ctx.link, ctx.padding_idx = link, padding_idx
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        link = ctx.link
        link.open = False
        grad, link.grad = link.grad, None  # the link lets go: autograd may keep it as .grad
        if grad is None:  # no head wrote into it (the full-logits path): the plain gradient
            grad = grad_out.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
        flat = ids.reshape(-1)
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.padding_idx is not None:  # the padding row gets nothing from the lookup
            keep = flat != ctx.padding_idx
            flat, rows = flat[keep], rows[keep]
        tokens, inverse = torch.unique(flat, return_inverse=True)
        summed = rows.new_zeros((tokens.numel(), rows.shape[1]), dtype=torch.float32)
        summed.index_add_(0, inverse, rows.float())
        grad.index_add_(0, tokens, summed.to(grad.dtype))
        return None, grad, None, None


def _linked_forward(self: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if not (torch.is_grad_enabled() and weight.requires_grad and type(weight) is nn.Parameter):
        return self._plain_forward(input_ids)
    link = TiedLink()
    _LINKS[weight] = link
    return _TiedLookup.apply(input_ids, weight, self.padding_idx, link)


def link_tied_embeddings(model: nn.Module) -> bool:
    """Give `model`'s input lookup the linked backward where its weight is the output head's
    (a plain `nn.Embedding`: no max_norm, no sparse or frequency-scaled gradient); returns
    whether it did."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    lookup = get_in() if get_in is not None else None
    head = get_out() if get_out is not None else None
    if (
        type(lookup) is not nn.Embedding
        or head is None
        or getattr(head, "weight", None) is not lookup.weight
        or lookup.max_norm is not None
        or lookup.scale_grad_by_freq
        or lookup.sparse
        or getattr(lookup, "_plain_forward", None) is not None
    ):
        return False
    lookup._plain_forward = lookup.forward
    lookup.forward = types.MethodType(_linked_forward, lookup)
    return True
