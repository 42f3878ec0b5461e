"""Batched sampling with a KV cache, left padding, per-row stopping and optional guidance.

One decoding loop serves plain sampling (evaluation, ReST's Grow) and reward-guided decoding:
`score_fn` may turn the base model's next-token log-probs into guided scores (GenARM adds
`alpha_i * log pi_arm_i`); with no `score_fn` the base distribution is sampled as is.
`guides` are extra models (or any object with `start`/`step`, e.g. ARGS's reward-model tracker)
stepped alongside the base; `on_step` sees each step's tokens and scores (streaming, log-probs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from prefalign.errors import UserError

ScoreFn = Callable[[torch.Tensor, Any], torch.Tensor]
# on_step(rows, tokens, scores): the prompt indices that produced a token this step, those tokens,
# and the scores [len(rows), V] they were picked from (before temperature and truncation).
StepFn = Callable[[list[int], list[int], torch.Tensor], None]


class Guide(Protocol):
    """Anything stepped alongside the base model; what it returns is handed to `score_fn`."""

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any: ...

    def step(self, next_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any: ...


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64
    # False: every row decodes max_new_tokens (equal lengths for benchmarks)
    stop_at_eos: bool = True


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]  # includes the EOS token when the row stopped on it
    text: str  # decoded response without special tokens


class CachedModel:
    """A causal LM decoded step by step with its own KV cache over a left-padded batch.

    `use_cache=False` recomputes the whole sequence every step: slow, but an independent
    reference that tests hold the cached path against.
    """

    def __init__(self, model: torch.nn.Module, use_cache: bool = True):
        self.model = model
        self.use_cache = use_cache
        self.cache = None  # a transformers Cache, returned by the first forward
        self.ids: torch.Tensor | None = None  # the whole sequence so far (uncached path only)

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.cache = None
        self.ids = None
        return self._forward(input_ids, attention_mask)

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._forward(next_ids[:, None], attention_mask)

    def _forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.use_cache:
            self.ids = ids if self.ids is None else torch.cat([self.ids, ids], dim=1)
            ids = self.ids
        # Left padding shifts real tokens right; positions must count real tokens only.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = self.model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=self.use_cache,
        )
        if self.use_cache:
            self.cache = out.cache
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


def pad_left(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long, device=device)
            mask[i, width - len(r) :] = 1
    return ids, mask


def pick_tokens(
    scores: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """Choose next tokens from log-space scores [B, V]: greedy, or temperature / top-k / top-p
    sampling."""
    if params.temperature == 0:
        return scores.argmax(dim=-1)
    scores = scores / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    eos_id: int,
    pad_id: int,
    params: SamplingParams,
    generator: torch.Generator,
    score_fn: ScoreFn | None = None,
    guides: Sequence[Guide] = (),
    use_cache: bool = True,
    on_step: StepFn | None = None,
) -> list[list[int]]:
    """Decode one left-padded batch; `guides` are extra cached models stepped alongside the base.

    `score_fn(base_logps, [guide_logps...])` returns the scores to sample from.
    Rows stop independently at EOS (unless `params.stop_at_eos` is False); the loop ends when
    every row has stopped. `on_step` gets batch-local row indices.
    """
    device = next(model.parameters()).device
    ids, mask = pad_left(prompt_ids, pad_id, device)
    base = CachedModel(model, use_cache=use_cache)
    logps = base.start(ids, mask)
    guide_logps = [g.start(ids, mask) for g in guides]
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    stopped = [False] * len(prompt_ids)  # `done` on the host, kept from the tokens
    out: list[list[int]] = [[] for _ in prompt_ids]
    for _ in range(params.max_new_tokens):
        scores = score_fn(logps, guide_logps) if score_fn else logps
        next_ids = pick_tokens(scores, params, generator).masked_fill(done, pad_id)
        tokens = next_ids.tolist()  # the step's one device-to-host copy
        active = [i for i, s in enumerate(stopped) if not s]
        for i in active:
            out[i].append(tokens[i])
        if on_step is not None:
            on_step(active, [tokens[i] for i in active], scores[active])
        if params.stop_at_eos:
            done |= next_ids == eos_id
            for i in active:
                stopped[i] = tokens[i] == eos_id
        if all(stopped):
            break
        # Finished rows keep decoding pad tokens (discarded); their mask stays 1 so shapes agree.
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logps = base.step(next_ids, mask)
        guide_logps = [g.step(next_ids, mask) for g in guides]
    return out


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    params: SamplingParams,
    score_fn: ScoreFn | None = None,
    guides: Sequence[torch.nn.Module | Guide] = (),
    use_cache: bool = True,
    on_step: StepFn | None = None,
) -> list[Generation]:
    """Sample one response per prompt (repeat prompts for several samples), in batches.

    Guides that are models get their own KV cache (none with `use_cache=False`); other guides
    are used as they are. `on_step(rows, tokens, scores)` streams tokens as they are chosen,
    with `rows` indexing `prompts`.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    if next(model.parameters()).device.type != "cpu":
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(params.seed)
    encoded = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt)
        if not ids:
            raise EmptyPromptError(prompt)
        encoded.append(ids)
    cached_guides = [
        CachedModel(g.eval(), use_cache) if isinstance(g, torch.nn.Module) else g for g in guides
    ]
    results: list[Generation] = []
    for start in range(0, len(encoded), params.batch_size):
        chunk = encoded[start : start + params.batch_size]
        step_fn = None
        if on_step is not None:

            def step_fn(rows, tokens, scores, offset=start):
                on_step([offset + r for r in rows], tokens, scores)

        responses = generate_batch(
            model,
            chunk,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            params,
            generator,
            score_fn,
            cached_guides,
            use_cache=use_cache,
            on_step=step_fn,
        )
        for p, r in zip(chunk, responses, strict=True):
            results.append(Generation(p, r, tokenizer.decode(r, skip_special_tokens=True)))
    model.train(was_training)
    return results


class EmptyPromptError(UserError, ValueError):
    """A prompt with no tokens to condition on: its text is empty and the tokenizer adds no
    BOS. `where` locates it ("prompts.jsonl: prompt 3"), when the caller knows."""

    def __init__(self, prompt: str, where: str = "") -> None:
        self.prompt = prompt
        super().__init__(
            f"{where + ' ' if where else 'prompt '}({prompt[:80]!r}) encodes to no tokens: the "
            "tokenizer adds no BOS token, so a prompt needs text"
        )


def check_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], source: str) -> None:
    """Refuse, before any model is loaded, a prompt `generate` could not start from, naming
    `source` (a file, a task) and the prompt's number."""
    for i, prompt in enumerate(prompts):
        if not encode_prompt(tokenizer, prompt):
            raise EmptyPromptError(prompt, f"{source}: prompt {i + 1}")


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt's ids with the tokenizer's special tokens (empty for an empty prompt when it
    adds no BOS)."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]
