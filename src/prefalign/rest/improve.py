"""ReST's Improve step: fine-tune on the kept samples with one of three kinds of loss.

- `bc`: behaviour cloning, the token-averaged NLL of the kept responses (ReST's usual choice).
- `reward_weighted`: the same NLL with each response weighted by its reward (min-max scaled over
  the grown pool, then scaled to mean 1 over the kept set so the learning rate means the same).
- any registry objective (or `path/to/file.py:function`): pairwise objectives train on
  (better, worse) pairs drawn from the grown set, a kept sample against a lower-reward sample of
  the same prompt; unpaired objectives (KTO) take kept samples as desirable and samples at or
  below the threshold as undesirable. Any reference mode works (frozen, soft, hard); the
  reference starts as the policy this Improve step starts from.

Training runs on the shared Trainer, so checkpoints, resume and metrics.jsonl come for free.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from prefalign import objectives
from prefalign.config import ConfigError, bounded
from prefalign.data import TokenizedPair, TokenizedUnpaired, collate_pairs, collate_unpaired
from prefalign.logprobs import collate_prompt_response, sequence_logps
from prefalign.reference import ReferencePolicy, ReferenceSpec, make_reference
from prefalign.rest.filtering import Normalize, ThresholdSchedule, min_max
from prefalign.rest.grow import GrownSample
from prefalign.training.loop import LossFn, Trainer, TrainerConfig, TrainResult
from prefalign.training.preference import pairwise_loss_fn, unpaired_loss_fn

NLL_LOSSES = ("bc", "reward_weighted")


@dataclass
class ImproveSpec:
    steps_per_grow: int = bounded(1, min=1)
    # one per Improve step; empty: use `schedule`
    thresholds: list[float] = field(default_factory=list)
    schedule: ThresholdSchedule = field(default_factory=ThresholdSchedule)
    # restart the schedule at each Grow step, or run it across all
    schedule_scope: Literal["grow", "run"] = "grow"
    normalize: Normalize = "none"  # the ReST paper thresholds rewards scaled to [0, 1]: min_max
    min_reward: float | None = None  # absolute floor: a raw reward not above it is never kept
    # kept samples per prompt (0: no cap); ReST-EM keeps about 10
    max_per_prompt: int = bounded(0, min=0)
    dedup: bool = False  # a prompt keeps identical responses once
    # filter the last Grow step's samples, or every Grow step's so far
    data: Literal["latest", "all"] = "latest"
    # A sample cut at grow.max_new_tokens did not finish (no EOS). `drop`: left out of the step
    # before filtering, counted in its record (`unfinished_dropped`). `keep`: trained on as a
    # truncated target, without EOS, so it never teaches stopping where the cap cut it.
    # Dropping favours replies that fit the cap: raise grow.max_new_tokens if many are cut.
    unfinished: Literal["drop", "keep"] = "drop"
    # bc | reward_weighted | a registry objective (dpo, ipo, kto, ...) | path/to/file.py:function
    loss: str = "bc"
    # one loss per Improve step of a Grow step; empty: `loss` for all
    losses: list[str] = field(default_factory=list)
    # e.g. {beta: 0.1}; for objective losses only
    objective_params: dict[str, Any] = field(default_factory=dict)
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)
    # ReST-EM: each Grow step's first Improve starts from the base model
    restart_from_base: bool = False
    # ReST (Gulcehre et al. 2023) keeps the original data in each Improve step's mixture: an SFT
    # file (prompt, completion) trained on beside the kept samples (bc / reward_weighted only).
    original_data: str = ""
    # ReST lowers the learning rate in later Improve steps: step k trains at lr * lr_decay ** k
    # (k counts within a Grow step, or across the run with schedule_scope=run, as thresholds do).
    lr_decay: float = bounded(1.0, gt=0)
    # out_dir and seed are set per step; dropout is off, as in `prefalign train`: the policy's
    # samples were drawn without it (`improve.trainer.disable_dropout=false` keeps it)
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(lr=1e-5, disable_dropout=True)
    )


# An Improve loss once resolved: an NLL loss by name, or an objective with its parameters.
Loss = str | objectives.Resolved


def resolve_loss(loss: Loss, params: dict[str, Any] | None = None) -> Loss:
    """ "bc" / "reward_weighted" stay names; a registry name or `path.py:function` becomes the
    objective resolved with `params` (a user file is imported here, once per run)."""
    if isinstance(loss, objectives.Resolved) or loss in NLL_LOSSES:
        return loss
    if ":" in loss:
        objective = objectives.load_user_objective(loss)
    else:
        try:
            objective = objectives.get(loss)
        except ValueError:
            allowed = ", ".join(["bc", "reward_weighted", "path.py:function", *objectives.names()])
            message = f"config key 'improve.loss': got {loss!r}, allowed: {allowed}"
            raise ConfigError(message) from None
    return objective.resolve(params, key="improve.objective_params")


def resolve_losses(spec: ImproveSpec) -> list[Loss]:
    """The loss of each Improve step of a Grow step, each distinct one resolved once."""
    names = spec.losses or [spec.loss] * spec.steps_per_grow
    resolved: dict[str, Loss] = {}
    for name in names:
        if name not in resolved:
            params = spec.objective_params if name not in NLL_LOSSES else None
            resolved[name] = resolve_loss(name, params)
    if spec.objective_params and all(name in NLL_LOSSES for name in names):
        raise ConfigError(
            f"config key 'improve.objective_params': loss {spec.loss!r} takes no "
            f"parameters, got {sorted(spec.objective_params)}"
        )
    return [resolved[name] for name in names]


@dataclass
class ImproveData:
    """What one Improve step trains on: weighted sequences, pairs, or labelled (KTO) sequences."""

    kind: Literal["sequences", "pairs", "unpaired"]
    examples: list
    weights: list[float] = field(default_factory=list)  # sequences: one per example

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        if self.kind == "sequences":
            return [len(p) + len(r) for p, r in self.examples]
        return [e.length for e in self.examples]

    def collate(self, indices: Sequence[int], pad_id: int) -> dict:
        rows = [self.examples[i] for i in indices]
        if self.kind == "pairs":
            return collate_pairs(rows, pad_id)
        if self.kind == "unpaired":
            return collate_unpaired(rows, pad_id)
        batch = collate_prompt_response([p for p, _ in rows], [r for _, r in rows], pad_id)
        batch["weights"] = torch.tensor([self.weights[i] for i in indices], dtype=torch.float32)
        return batch


def training_pool(
    pool: Sequence[GrownSample], unfinished: Literal["drop", "keep"]
) -> list[GrownSample]:
    """The grown samples an Improve step may train on: all of them with `keep`, else only those
    that stopped on EOS."""
    return list(pool) if unfinished == "keep" else [s for s in pool if s.finished]


def build_data(
    loss: Loss,
    pool: Sequence[GrownSample],
    kept: Sequence[int],
    scores: Sequence[float],
    threshold: float,
    max_per_prompt: int = 0,
    seed: int = 0,
    min_reward: float | None = None,
) -> ImproveData:
    """The training set of one Improve step from the grown pool and the indices it keeps.
    KTO's undesirable samples are those that failed: at or below the threshold or the floor."""
    objective = resolve_loss(loss)
    if isinstance(objective, str):
        weights = [1.0] * len(kept)
        if loss == "reward_weighted":
            weights = reward_weights([pool[i].reward for i in range(len(pool))], kept)
        return ImproveData(
            "sequences", [(pool[i].prompt_ids, pool[i].response_ids) for i in kept], weights
        )
    rng = random.Random(seed)
    # Every Grow step samples the same prompt list, so prompt_index names a prompt across steps.
    by_prompt: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(pool):
        by_prompt[s.prompt_index].append(i)
    if objective.kind == "unpaired":
        failed = [
            s <= threshold or (min_reward is not None and p.reward <= min_reward)
            for s, p in zip(scores, pool, strict=True)
        ]
        rows = unpaired_examples(pool, kept, failed, by_prompt, max_per_prompt, rng)
        return ImproveData("unpaired", rows)
    return ImproveData("pairs", better_worse_pairs(pool, kept, by_prompt, rng))


def with_original(
    data: ImproveData, original: Sequence[tuple[list[int], list[int]]]
) -> ImproveData:
    """`data` with the original (prompt, completion) rows appended at weight 1."""
    if not original:
        return data
    if data.kind != "sequences":
        raise ConfigError(
            "config key 'improve.original_data' mixes SFT rows into bc / "
            f"reward_weighted steps; this step's loss trains on {data.kind}"
        )
    weights = [*data.weights, *[1.0] * len(original)]
    return ImproveData("sequences", [*data.examples, *original], weights)


def reward_weights(rewards: Sequence[float], kept: Sequence[int]) -> list[float]:
    """Rewards min-max scaled over the pool, then scaled to mean 1 over the kept samples."""
    pool = min_max(rewards) if max(rewards) > min(rewards) else [1.0] * len(rewards)
    scaled = [pool[i] for i in kept]
    mean = sum(scaled) / len(scaled) if scaled else 1.0
    return [w / mean if mean > 0 else 1.0 for w in scaled]


def better_worse_pairs(pool, kept, by_prompt, rng: random.Random) -> list[TokenizedPair]:
    """Each kept sample against a random sample of the same prompt with a lower reward and a
    different response; kept samples without such a partner form no pair."""
    pairs = []
    for i in kept:
        better = pool[i]
        worse = [
            j
            for j in by_prompt[better.prompt_index]
            if pool[j].reward < better.reward and pool[j].response_ids != better.response_ids
        ]
        if worse:
            w = pool[rng.choice(worse)]
            pairs.append(TokenizedPair(better.prompt_ids, better.response_ids, w.response_ids))
    return pairs


def unpaired_examples(
    pool, kept, failed, by_prompt, max_per_prompt, rng
) -> list[TokenizedUnpaired]:
    """Kept samples as desirable; failed samples as undesirable, at most as many per prompt as
    the cap allows (the prompt's number of samples when there is no cap)."""
    rows = [TokenizedUnpaired(pool[i].prompt_ids, pool[i].response_ids, True) for i in kept]
    for members in by_prompt.values():
        below = [j for j in members if failed[j]]
        rng.shuffle(below)
        rows += [
            TokenizedUnpaired(pool[j].prompt_ids, pool[j].response_ids, False)
            for j in below[: max_per_prompt or len(below)]
        ]
    rng.shuffle(rows)  # KTO's KL point is estimated inside each batch: mix the labels
    return rows


def weighted_nll_loss(
    model: torch.nn.Module, batch: dict
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over responses of weight x response NLL, divided by the batch's response tokens
    (plain token-averaged NLL when every weight is 1)."""
    logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    loss = -(batch["weights"] * logps.sum).sum() / logps.n_tokens.sum().clamp(min=1)
    return loss, {"nll": (-logps.sum.sum() / logps.n_tokens.sum().clamp(min=1)).detach()}


def make_loss_fn(loss: Loss, reference: ReferencePolicy, accelerator=None) -> LossFn:
    objective = resolve_loss(loss)
    if isinstance(objective, str):
        return (
            weighted_nll_loss  # objective_params belong to the objective steps of a mixed schedule
        )
    if objective.kind == "unpaired":
        return unpaired_loss_fn(objective, reference, accelerator)
    return pairwise_loss_fn(objective, reference)


def loss_at(spec: ImproveSpec, i: int) -> str:
    """The loss of Improve step i (within its Grow step)."""
    return spec.losses[i] if spec.losses else spec.loss


def reference_spec(loss: Loss, spec: ReferenceSpec) -> ReferenceSpec:
    objective = resolve_loss(loss)
    if isinstance(objective, str) or not objective.needs_reference:
        return ReferenceSpec(mode="none")
    if spec.mode == "none":
        raise ConfigError(
            f"config key 'improve.reference.mode': objective {objective.name!r} needs "
            "a reference (frozen, soft or hard)"
        )
    return spec


def fit_batch(config: TrainerConfig, n_examples: int, kind: str) -> TrainerConfig:
    """Shrink the batch when the kept set cannot fill one optimizer step (late, high thresholds)."""
    if n_examples >= config.batch_size * config.grad_accum:
        return config
    grad_accum = max(1, min(config.grad_accum, n_examples // max(1, config.batch_size)))
    batch = max(2 if kind == "unpaired" else 1, n_examples // grad_accum)
    return replace(config, batch_size=batch, grad_accum=grad_accum)


def improve(
    model: torch.nn.Module,
    tokenizer,
    data: ImproveData,
    spec: ImproveSpec,
    trainer_config: TrainerConfig,
    resume: bool = False,
    run_config: dict | None = None,
    loss: Loss | None = None,
    device: str = "auto",
) -> TrainResult:
    """Train `model` on `data` with `loss` (the run's resolved loss; by default `spec.loss` with
    `spec.objective_params`) on `device` (`model.device`); `resume` continues from the step's
    own checkpoint."""
    loss = resolve_loss(spec.loss if loss is None else loss, spec.objective_params)
    trainer_config = fit_batch(trainer_config, len(data), data.kind)
    trainer = Trainer(
        model,
        trainer_config,
        data.lengths,
        run_config=run_config,
        tokenizer=tokenizer,
        device=device,
    )
    # Built after prepare() so a full-copy reference lands on the training device.
    reference = make_reference(trainer.model, reference_spec(loss, spec.reference))
    trainer.extra_state = reference
    loss_fn = make_loss_fn(loss, reference, trainer.accelerator)
    if resume:
        trainer.resume()
    pad = tokenizer.pad_token_id
    result = trainer.fit(
        lambda idx: data.collate(idx, pad),
        loss_fn,
        after_step=reference.after_optimizer_step,
        group_by_length=data.kind
        != "unpaired",  # KTO's KL point uses the batch's own mismatched pairs
    )
    trainer.end()
    return result


@torch.no_grad()
def objective_value(
    model: torch.nn.Module, data: ImproveData, loss_fn: LossFn, pad_id: int, batch_size: int = 16
) -> float:
    """Mean loss of `loss_fn` over a fixed set, in eval mode (tests and diagnostics)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for s in range(0, len(data), batch_size):
        idx = list(range(s, min(s + batch_size, len(data))))
        loss, _ = loss_fn(model, data.collate(idx, pad_id))
        total += float(loss) * len(idx)
        n += len(idx)
    model.train(was_training)
    return total / max(n, 1)
