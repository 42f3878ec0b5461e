"""`prefalign train`: an offline preference objective with a frozen, soft or hard reference.

The whole recipe, top to bottom: load model and tokenizer, load and tokenize data, build the
reference policy, define the loss of one batch (four log-probs in, the registry's objective out),
hand it to the shared Trainer with the reference update as its after-step hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from prefalign import objectives
from prefalign.config import ConfigError
from prefalign.data.tokenize import TruncationSettings
from prefalign.logprobs import SequenceLogps, sequence_logps
from prefalign.manifest import write_manifest
from prefalign.modeling import (
    ModelSpec,
    check_device,
    is_peft_model,
    load_model,
    load_tokenizer,
)
from prefalign.reference import (
    InitialPolicyReference,
    ModelReference,
    ReferencePolicy,
    ReferenceSpec,
    make_reference,
)
from prefalign.shared_prompt import pair_logps
from prefalign.training import malloc
from prefalign.training.cpu_attention import use_eager_attention_for_bf16
from prefalign.training.forward import (
    PairLogps,
    SpeedSpec,
    live_reference_logps,
    pair_collator,
    use_shared_prompt,
)
from prefalign.training.loop import (
    THRESHOLD_KEY,
    Trainer,
    TrainerConfig,
    TrainResult,
    make_accelerator,
    seed_everything,
)
from prefalign.training.precision import precision_hint


@dataclass
class ObjectiveSpec:
    name: str = "dpo"  # a registry name (prefalign.objectives.names())
    code: str | None = None  # or a user objective: "path/to/file.py:function"
    params: dict[str, Any] = field(default_factory=dict)  # e.g. {beta: 0.1}


@dataclass
class PreferenceData(TruncationSettings):
    path: str = ""
    eval_path: str | None = None  # held-out pairs: reward accuracy and margin
    skip_invalid: bool = False


@dataclass
class ToyEval:
    task: str | None = None  # a task (toy:sentiment, ...): gold reward and KL to the initial policy
    n_prompts: int = 64
    samples_per_prompt: int = 1
    max_new_tokens: int = 24


@dataclass
class PreferenceConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)
    data: PreferenceData = field(default_factory=PreferenceData)
    eval: ToyEval = field(default_factory=ToyEval)
    speed: SpeedSpec = field(default_factory=SpeedSpec)
    # Dropout off, as in TRL's DPO and KTO trainers: policy and reference log-probs of the same
    # pair then differ only by the weights (`trainer.disable_dropout=false` keeps it).
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(out_dir="runs/train", lr=5e-6, disable_dropout=True)
    )


def resolve_objective(spec: ObjectiveSpec) -> objectives.Resolved:
    """The run's objective with its parameters, resolved once (a user file is imported once)."""
    return objectives.resolve(spec.name, spec.code, spec.params)


def reward_beta(
    objective: objectives.Objective | objectives.Resolved, params: dict[str, Any]
) -> float:
    """The scale of the logged implicit rewards: the objective's reward-scale parameter
    (`beta`, GenARM's `beta_r`) as `params` over the objective's defaults resolve it."""
    if isinstance(objective, objectives.Resolved):
        return objective.objective.resolve({**objective.params, **params}).reward_scale
    return objective.resolve(params).reward_scale


def pairwise_loss_fn(
    objective: objectives.Resolved,
    reference: ReferencePolicy,
    reference_logps: Callable[[dict], PairLogps] | None = None,
):
    """Loss of one preference batch (stacked [chosen; rejected] rows or shared-prompt packed
    rows), with TRL-style reward metrics. `reference_logps(batch)` replaces the reference's
    forward pass (a cache of a frozen reference)."""
    beta = objective.reward_scale
    reference_logps = reference_logps or live_reference_logps(reference)

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected = pair_logps(model, batch)
        if objective.needs_reference:
            ref_chosen, ref_rejected = reference_logps(batch)
        else:
            zeros = SequenceLogps(torch.zeros_like(chosen.sum), chosen.n_tokens)
            ref_chosen, ref_rejected = zeros, zeros
        pick = (lambda s: s.mean) if objective.length_normalized else (lambda s: s.sum)
        losses = objective.loss(pick(chosen), pick(rejected), pick(ref_chosen), pick(ref_rejected))
        reward_chosen = beta * (chosen.sum - ref_chosen.sum).detach()
        reward_rejected = beta * (rejected.sum - ref_rejected.sum).detach()
        metrics = {
            "rewards/chosen": reward_chosen.mean(),
            "rewards/rejected": reward_rejected.mean(),
            "rewards/margins": (reward_chosen - reward_rejected).mean(),
            "rewards/accuracies": (reward_chosen > reward_rejected).float().mean(),
            "logps/chosen": chosen.sum.detach().mean(),
            "logps/rejected": rejected.sum.detach().mean(),
        }
        return losses.mean(), metrics

    return loss_fn


def unpaired_loss_fn(objective: objectives.Resolved, reference: ReferencePolicy, accelerator):
    """KTO: per-example loss against the batch's KL reference point, averaged across processes
    before clamping (as TRL does), so N processes see the same z0 as one process with N x batch."""

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        kl_inputs = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_loss_mask"])
        policy = sequence_logps(model, *inputs).sum
        ref = reference.logps(*inputs).sum
        with torch.no_grad():
            kl_policy = sequence_logps(model, *kl_inputs).sum
        kl_ref = reference.logps(*kl_inputs).sum
        z0 = objectives.kto_kl_reference_point(kl_policy, kl_ref)
        z0 = accelerator.reduce(z0.detach().reshape(1), reduction="mean")[0]
        losses = objective.loss(policy, ref, batch["labels"], z0)
        beta = objective.reward_scale
        labels = batch["labels"]
        rewards = beta * (policy - ref).detach()
        # The same keys on every process whatever its labels: (sum, count) pairs, which the
        # Trainer sums across processes before dividing.
        metrics = {
            "kl": z0.clamp(min=0),
            "rewards/chosen": (rewards[labels].sum(), labels.sum()),
            "rewards/rejected": (rewards[~labels].sum(), (~labels).sum()),
        }
        return losses.mean(), metrics

    return loss_fn


def run_preference(
    config: PreferenceConfig,
    resume: bool = False,
    log=print,
    objective: objectives.Resolved | None = None,
) -> TrainResult:
    """Train a policy with any registry or user objective and any reference mode; `objective`
    is `config.objective` already resolved by a caller that needed it first."""
    from prefalign.data import (
        collate_unpaired,
        load_preference_data,
        load_unpaired_data,
        tokenize_preference,
        tokenize_unpaired,
    )

    # Resolving checks the params by config key (names, kinds) before anything is loaded.
    objective = objective or resolve_objective(config.objective)
    if not config.model.name_or_path:
        raise ConfigError(
            "config key 'model.name_or_path' is required (a model directory or hub id)"
        )
    if not config.data.path:
        raise ConfigError("config key 'data.path' is required")
    if objective.needs_reference and config.reference.mode == "none":
        raise ConfigError(
            f"objective '{objective.name}' needs a reference policy; "
            "reference.mode 'none' is for reference-free objectives"
        )
    check_device(config.model.device)  # before anything loads
    write_manifest(config.trainer.out_dir, "train")
    tokenizer = load_tokenizer(config.model.name_or_path)
    trunc = dict(**config.data.limits(), skip_invalid=config.data.skip_invalid)
    unpaired = objective.kind == "unpaired"
    loader, tokenize = (
        (load_unpaired_data, tokenize_unpaired)
        if unpaired
        else (load_preference_data, tokenize_preference)
    )
    loaded = loader(config.data.path, tokenizer=tokenizer, skip_invalid=config.data.skip_invalid)
    examples, skipped = tokenize(loaded.records, tokenizer, **trunc)
    skipped = loaded.skipped + skipped
    if skipped:
        log(f"skipped {sum(skipped.values())} invalid rows of {config.data.path}: {dict(skipped)}")

    # After the data: a bad row is reported without waiting for the model to load.
    seed_everything(config.trainer.seed)  # the seed decides a LoRA adapter's init
    # Decided before loading, whose peak it lowers too.
    malloc.decide_mmap_threshold(
        config.trainer.malloc_mmap_threshold_kib,
        f"{THRESHOLD_KEY} of the run in {config.trainer.out_dir}",
    )
    model = load_model(
        config.model.name_or_path,
        dtype=config.model.dtype,
        device="cpu",
        lora=config.model.lora,
        gradient_checkpointing=config.model.gradient_checkpointing,
        lean_activations=config.model.lean_activations == "auto",
    )
    ref_spec = config.reference if objective.needs_reference else ReferenceSpec(mode="none")
    use_cache = (
        not unpaired and ref_spec.mode == "frozen" and config.speed.reference_cache == "auto"
    )
    # A frozen full-model reference read only through its cache (held-out pairs would score
    # with it live) needs no copy of the weights: the cache is built from the untrained policy.
    cached_only = (
        use_cache
        and not config.data.eval_path
        and not config.trainer.fsdp
        and not is_peft_model(model)
    )
    run = dict(lengths=[e.length for e in examples], run_config=asdict(config), tokenizer=tokenizer)
    if config.trainer.fsdp:
        from prefalign.training.fsdp import local_fraction, shard_with_reference

        # the process group sharding needs
        accelerator = make_accelerator(config.trainer, config.model.device)
        # Made before sharding, so its copy (or adapter) is sharded like the policy.
        reference = make_reference(model, ref_spec)
        shard_with_reference(model, reference)
        local, total = local_fraction(model)
        log(f"FSDP2: {local} of {total} parameter elements on process {accelerator.process_index}")
        trainer = Trainer(model, config.trainer, accelerator=accelerator, **run)
    else:
        trainer = Trainer(model, config.trainer, device=config.model.device, **run)
        if trainer.master is not None and not unpaired:  # bf16 weights: the attention kernel
            rows, width = widest_batch(
                examples,
                config.trainer.batch_size,
                use_shared_prompt(config.speed, model, examples),
            )
            if use_eager_attention_for_bf16(trainer.unwrapped, rows, width):
                log(f"bf16 on the CPU, rows of at most {width} tokens: eager attention")
        if cached_only:  # the policy scores the cache before its first step: no copy at all
            reference = InitialPolicyReference(trainer.model)
        else:  # built after prepare() so a full copy lands on the training device
            reference = make_reference(trainer.model, ref_spec)
    trainer.extra_state = reference  # checkpointed with the run: a trust-region reference moves
    pad = tokenizer.pad_token_id
    if unpaired:
        loss_fn = unpaired_loss_fn(objective, reference, trainer.accelerator)

        def collate(indices: list[int]) -> dict:
            return collate_unpaired(
                [examples[i] for i in indices], pad, max_length=config.data.max_length
            )
    else:
        shared = use_shared_prompt(config.speed, trainer.unwrapped, examples)
        log(f"shared-prompt forward: {'on' if shared else 'off'}")
        if hint := precision_hint(config.trainer.mixed_precision, torch.cuda.is_available()):
            log(hint)
        collate = pair_collator(examples, pad, shared)

    evaluate = None
    if config.eval.task or config.data.eval_path:
        evaluate = make_evaluator(config, tokenizer, trainer, reference, objective)

    def reference_cache():
        from prefalign.training.ref_cache import build_reference_cache

        settings = {
            "layout": "shared" if shared else "stacked",
            "mixed_precision": config.trainer.mixed_precision,
            # bf16 weights and autocast round differently: their caches differ.
            "bf16_weights": trainer.master is not None,
        }
        return build_reference_cache(
            reference,
            examples,
            collate,
            config.data.path,
            trainer.accelerator,
            config.trainer.batch_size,
            settings,
            log=log,
        )

    cached = None
    if cached_only:  # before resume, which loads trained weights into the policy
        cached = reference_cache()
        reference.release()
        log("frozen reference: scored by the untrained policy into the cache, no copy kept")
    if resume:
        trainer.resume()
    if use_cache and cached is None:  # after resume: the resumed reference is fingerprinted
        cached = reference_cache()
    if not unpaired:
        loss_fn = pairwise_loss_fn(objective, reference, reference_logps=cached)

    def after_step(step: int) -> dict[str, float]:
        return reference.update_metrics() if reference.after_optimizer_step(step) else {}

    result = trainer.fit(
        collate,
        loss_fn,
        after_step=after_step,
        evaluate=evaluate,
        # KTO's KL point uses the batch's own mismatched pairs: length-grouping would bias them.
        group_by_length=not unpaired,
    )
    trainer.end()
    return result


def widest_batch(examples, batch_size: int, shared: bool) -> tuple[int, int]:
    """Rows and width of the widest training batch in the packed or the stacked layout."""
    if shared:
        return batch_size, max(
            len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples
        )
    width = max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples)
    return 2 * batch_size, width


def make_evaluator(
    config: PreferenceConfig,
    tokenizer,
    trainer: Trainer,
    reference: ReferencePolicy,
    objective: objectives.Resolved,
):
    """Periodic evaluation: gold reward + KL to the INITIAL policy on a task, and reward
    accuracy/margin on held-out pairs.

    `pair_accuracy` / `pair_margin` score the implicit reward against the initial policy, so
    frozen and trust-region runs are comparable; a trust-region run also logs them against its
    moving reference, as `pair_accuracy_vs_reference` / `pair_margin_vs_reference`."""
    from prefalign.evaluation.core import evaluate_policy
    from prefalign.evaluation.pairs import load_eval_pairs, pair_metrics

    initial = None
    moving = reference.spec.mode in ("soft", "hard")
    if config.eval.task or (moving and config.data.eval_path):
        # From disk, not a copy of the policy: on resume the policy has moved already.
        initial = load_model(
            config.model.name_or_path,
            dtype=config.model.dtype,
            device=str(trainer.accelerator.device),
        )
    if config.eval.task:
        from prefalign.tasks import resolve_task

        task = resolve_task(config.eval.task)
        prompts = task.prompts("eval")[: config.eval.n_prompts]
    beta = objective.reward_scale
    eval_pairs = (
        load_eval_pairs(tokenizer, config.data.eval_path, config.data)
        if config.data.eval_path
        else None
    )
    initial_ref = ModelReference(initial) if initial is not None else None

    def evaluate(step: int) -> dict[str, float]:
        model = trainer.unwrapped
        out: dict[str, float] = {}
        if config.eval.task:
            result = evaluate_policy(
                model,
                tokenizer,
                task,
                prompts,
                reference=initial,
                samples_per_prompt=config.eval.samples_per_prompt,
                max_new_tokens=config.eval.max_new_tokens,
            )
            out.update({"gold_reward": result.gold_reward, "kl": result.kl})
            if result.accuracy is not None:
                out["accuracy"] = result.accuracy
        if config.data.eval_path:
            held_out = (tokenizer, config.data.eval_path, beta, config.data)
            scored = pair_metrics(
                model, initial_ref if moving else reference, *held_out, pairs=eval_pairs
            )
            out.update(scored)
            if moving:
                scored = pair_metrics(model, reference, *held_out, pairs=eval_pairs)
                out.update({f"{k}_vs_reference": v for k, v in scored.items()})
        model.train()
        return out

    return evaluate
