"""GenARM guided decoding: sample from `log pi_base + sum_i alpha_i * log pi_arm_i`.

Built on the one decoding loop of `prefalign.generation`: every ARM is a guide with its own KV
cache, stepped alongside the base over the same left-padded batch, and `score_fn` adds the
weighted ARM log-probs to the base's. Temperature, top-k/top-p and greedy then apply to the sum,
so `p(y_t) ∝ pi_base * prod_i pi_arm_i^alpha_i` at temperature 1 (Xu et al., 2025, "GenARM").

`GuidedPolicy` is the same distribution as a module scored by teacher forcing: its "logits" are
the guided scores, so `sequence_logps` and `evaluate_policy` measure log p_guided(y) and
KL(guided || base) of the guided samples exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import PreTrainedTokenizerBase

from prefalign.config import ConfigError
from prefalign.generation import Generation, SamplingParams, StepFn, generate
from prefalign.modeling import load_model, load_tokenizer


@dataclass
class Arm:
    """An autoregressive reward model and its weight; its tokenizer, when known, is checked."""

    model: torch.nn.Module
    alpha: float = 1.0
    tokenizer: PreTrainedTokenizerBase | None = None


ArmLike = Arm | tuple[torch.nn.Module, float]


def as_arms(arms: Sequence[ArmLike]) -> list[Arm]:
    return [a if isinstance(a, Arm) else Arm(a[0], float(a[1])) for a in arms]


def model_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return (
        getattr(model, "name_or_path", None)
        or getattr(config, "_name_or_path", "")
        or type(model).__name__
    )


def logits_width(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_tokenizers(
    base: PreTrainedTokenizerBase, arm: PreTrainedTokenizerBase, base_name: str, arm_name: str
) -> None:
    """Raise a one-line ValueError unless both tokenizers map the same strings to the same ids."""
    specials = ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id")
    if base.get_vocab() != arm.get_vocab():
        raise ConfigError(
            f"tokenizer mismatch: ARM '{arm_name}' ({len(arm)} tokens) does not share the "
            f"vocabulary of base '{base_name}' ({len(base)} tokens); GenARM adds log-probs "
            "token by token, so both must use one tokenizer"
        )
    for name in specials:
        if getattr(base, name) != getattr(arm, name):
            raise ConfigError(
                f"tokenizer mismatch: ARM '{arm_name}' has {name}={getattr(arm, name)} "
                f"but base '{base_name}' "
                f"has {getattr(base, name)}"
            )


def check_models(
    base: torch.nn.Module, arms: Sequence[Arm], tokenizer: PreTrainedTokenizerBase
) -> int:
    """Check every ARM against the base; returns the vocabulary width the scores are cut to.

    Models may pad their output layer past the tokenizer (Qwen sizes differ in padding): scores
    are compared on the tokenizer's ids only, which every model must cover.
    """
    base_name = model_name(base)
    width = logits_width(base)
    for arm in arms:
        arm_name = model_name(arm.model)
        if arm.tokenizer is not None:
            check_tokenizers(tokenizer, arm.tokenizer, base_name, arm_name)
        arm_width = logits_width(arm.model)
        if min(width, arm_width) < len(tokenizer):
            raise ConfigError(
                f"tokenizer mismatch: ARM '{arm_name}' scores {arm_width} tokens "
                f"and base '{base_name}' "
                f"{width}, but the tokenizer has {len(tokenizer)}"
            )
        arm_eos = getattr(getattr(arm.model, "config", None), "eos_token_id", None)
        if (
            arm_eos is not None
            and tokenizer.eos_token_id is not None
            and tokenizer.eos_token_id not in _ids(arm_eos)
        ):
            raise ConfigError(
                f"tokenizer mismatch: ARM '{arm_name}' ends sequences with token {arm_eos}, "
                f"base '{base_name}' with {tokenizer.eos_token_id}"
            )
        width = min(width, arm_width)
    return width


def _ids(value: int | list[int]) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def combine(
    base_logps: torch.Tensor, arm_logps: Sequence[torch.Tensor], alphas: Sequence[float], width: int
) -> torch.Tensor:
    """`log pi_base + sum_i alpha_i * log pi_arm_i` over the first `width` token ids."""
    scores = base_logps[..., :width]
    for alpha, logps in zip(alphas, arm_logps, strict=True):
        if alpha:
            scores = scores + alpha * logps[..., :width]
    return scores


class GuidedDecoder:
    """A base model guided by any number of ARMs, each with its own weight and KV cache."""

    def __init__(
        self, base: torch.nn.Module, arms: Sequence[ArmLike], tokenizer: PreTrainedTokenizerBase
    ):
        self.base = base
        self.arms = as_arms(arms)
        self.tokenizer = tokenizer
        self.width = check_models(base, self.arms, tokenizer)

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        use_cache: bool = True,
        on_step: StepFn | None = None,
    ) -> list[Generation]:
        """One response per prompt; `on_step(rows, tokens, scores)` streams tokens as they come."""
        # An ARM with weight 0 changes nothing: skip its forward passes entirely.
        active = [a for a in self.arms if a.alpha]
        alphas = [a.alpha for a in active]

        def score_fn(base_logps: torch.Tensor, arm_logps: list[torch.Tensor]) -> torch.Tensor:
            return combine(base_logps, arm_logps, alphas, self.width)

        return generate(
            self.base,
            self.tokenizer,
            prompts,
            params,
            score_fn=score_fn,
            guides=[a.model for a in active],
            use_cache=use_cache,
            on_step=on_step,
        )

    def policy(self) -> GuidedPolicy:
        """The guided distribution as a module, for teacher-forced log-probs and KL."""
        return GuidedPolicy(self.base, self.arms, self.width)


def guided_generate(
    base: torch.nn.Module,
    arms: Sequence[ArmLike],
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    params: SamplingParams,
    use_cache: bool = True,
    on_step: StepFn | None = None,
) -> list[Generation]:
    """GenARM decoding of `prompts` in left-padded batches of `params.batch_size`."""
    return GuidedDecoder(base, arms, tokenizer).generate(
        prompts, params, use_cache=use_cache, on_step=on_step
    )


class GuidedPolicy(torch.nn.Module):
    """The guided distribution as a causal LM for teacher-forced scoring (no generation).

    Its logits are unnormalized guided scores; log-softmax of them is log p_guided at
    temperature 1, which is what `sequence_logps` computes.
    """

    def __init__(self, base: torch.nn.Module, arms: Sequence[ArmLike], width: int | None = None):
        super().__init__()
        self.base = base
        arm_list = as_arms(arms)
        self.arm_models = torch.nn.ModuleList([a.model for a in arm_list])
        self.alphas = [a.alpha for a in arm_list]
        self.width = width or min(logits_width(m) for m in [base, *self.arm_models])

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object
    ) -> SimpleNamespace:
        def logps(model: torch.nn.Module) -> torch.Tensor:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return torch.log_softmax(out.logits.float(), dim=-1)

        arm_logps = [logps(m) for m, a in zip(self.arm_models, self.alphas, strict=True) if a]
        return SimpleNamespace(
            logits=combine(logps(self.base), arm_logps, [a for a in self.alphas if a], self.width)
        )


class SampledLogps:
    """An `on_step` hook summing, per prompt, the log-prob of each sampled token under the
    distribution it was drawn from. Exact at temperature 1 with no top-k/top-p truncation."""

    def __init__(self, n: int):
        self.logps = [0.0] * n

    def __call__(self, rows: list[int], tokens: list[int], scores: torch.Tensor) -> None:
        logps = torch.log_softmax(scores.float(), dim=-1)
        picked = (
            logps.gather(1, torch.tensor(tokens, device=scores.device)[:, None]).squeeze(1).tolist()
        )
        for r, lp in zip(rows, picked, strict=True):
            self.logps[r] += lp


class TextStream:
    """An `on_step` hook that streams text: `callback(prompt_index, new_text)` as tokens arrive.

    Text is re-decoded per row and only the new suffix is sent; a suffix ending in an incomplete
    UTF-8 character waits for the next token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, callback: Callable[[int, str], None]):
        self.tokenizer = tokenizer
        self.callback = callback
        self.tokens: dict[int, list[int]] = {}
        self.sent: dict[int, int] = {}

    def __call__(self, rows: list[int], tokens: list[int], scores: torch.Tensor) -> None:
        for row, token in zip(rows, tokens, strict=True):
            self.tokens.setdefault(row, []).append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            done = self.sent.get(row, 0)
            if len(text) > done and not text.endswith("\ufffd"):
                self.callback(row, text[done:])
                self.sent[row] = len(text)


def load_arm(path: str | Path, alpha: float = 1.0, device: str = "cpu") -> Arm:
    """An ARM from a saved model directory (full or LoRA adapter), with its tokenizer for the
    check."""
    model = load_model(path, device=device).eval()
    model.requires_grad_(False)
    return Arm(model, alpha, load_tokenizer(path))
