"""The one training loop every method uses: SFT, preference objectives, ARM training, ReST's
Improve.

Read it top to bottom: plan the global batches, then for each optimizer step run the micro-batches,
reduce their metrics, clip, check that loss and gradient norm are finite (a bad step is never
applied), step, let the caller react (trust-region reference update), log, evaluate, checkpoint
(`prefalign.training.checkpoint`: weights written once, never non-finite ones).
A method supplies only `loss_fn(model, batch) -> (loss, metrics)` and the batches.

Multi-process runs (`accelerate launch`) split every global batch by rank, so 2 processes with
batch b see exactly the examples 1 process with batch 2b sees, and DDP averages their gradients.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from prefalign.config import ConfigError, bounded
from prefalign.errors import RunDirError, UserError
from prefalign.io import append_jsonl, atomic_write, flatten
from prefalign.manifest import make_run_dir
from prefalign.modeling import check_device, device_index
from prefalign.training import clip_step, malloc
from prefalign.training import step_in_backward as in_backward
from prefalign.training.bf16_weights import Bf16MasterWeights
from prefalign.training.checkpoint import (
    MODEL_DIR,
    check_checkpoint_files,
    checkpoints,
    load_trained_weights,
    point_final,
    read_checkpoint_state,
    rng_state,
    save_model,
    set_rng_state,
)
from prefalign.training.fsdp import (
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    load_full_optimizer_state,
    local_norm_to_float,
)
from prefalign.training.master_step import clip_coefficient
from prefalign.training.precision import resolve_bf16_path, resolve_mixed_precision, world_size

# A metric is a batch mean (a scalar tensor) or a (sum, count) pair: pairs are summed over
# micro-batches and processes before dividing, so a metric that only some examples have (KTO's
# rewards/chosen) averages over exactly those examples, and is null where none had it.
Metric = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, Metric]]]


@dataclass
class TrainerConfig:
    out_dir: str = "runs/train"
    batch_size: int = bounded(8, min=1)  # examples per process per micro-batch
    grad_accum: int = bounded(1, min=1)
    max_steps: int = bounded(0, min=0)  # optimizer steps; 0 means run `epochs` epochs
    epochs: float = bounded(1.0, gt=0)
    lr: float = bounded(1e-5, gt=0)
    weight_decay: float = bounded(0.0, min=0)
    adam_beta1: float = bounded(0.9, min=0, lt=1)
    adam_beta2: float = bounded(0.999, min=0, lt=1)
    adam_epsilon: float = bounded(1e-8, gt=0)
    warmup_ratio: float = bounded(0.0, min=0, max=1)
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    max_grad_norm: float = bounded(1.0, min=0)  # 0 disables clipping
    # "auto": bf16 where the device multiplies bf16 natively (prefalign.training.precision).
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    # How bf16 runs: bf16 weights with fp32 masters ("weights", one process without FSDP) or
    # autocast over fp32 weights; "auto" takes "weights" where it applies.
    bf16_path: Literal["auto", "weights", "autocast"] = "auto"
    seed: int = 0
    log_every: int = bounded(10, min=1)
    save_every: int = bounded(0, min=0)  # 0: a checkpoint only at the end
    keep_checkpoints: int = bounded(2, min=1)
    eval_every: int = bounded(0, min=0)  # 0: evaluate only at the end (when an evaluator is given)
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb, mlflow
    # Shard parameters, gradients and optimizer state over the processes (FSDP2) instead of
    # replicating them (DDP); the caller shards the model (prefalign.training.fsdp.shard).
    fsdp: bool = False
    progress: bool = True
    # Zero every dropout probability for the whole run (TRL's DPO/KTO default); the model is in
    # train mode from the first step to the last either way.
    disable_dropout: bool = False
    # Step each parameter inside backward once its gradient is complete and drop the gradient
    # (prefalign.training.step_in_backward): one copy of the weights less at the peak, the
    # same update. "auto": wherever that is exact (max_grad_norm 0, grad_accum 1, one process,
    # no fp16, no FSDP); "off": always after backward.
    step_in_backward: Literal["auto", "off"] = "auto"
    # torch's intra-op threads from the start of the run (0: torch's own, the cores or
    # OMP_NUM_THREADS); 1 on a shared machine: idle threads spin-wait on contended cores.
    threads: int = bounded(0, min=0)
    # glibc's mmap threshold (KiB), so freed activation buffers above it go back to the system
    # and the resident peak is the live peak (prefalign.training.malloc); 0 keeps glibc's
    # adaptive default. Process-wide: the first run (or the CLI) of a process decides it, a
    # later run asking for another value is warned and keeps it; unset (null) asks for nothing:
    # 256 if nothing decided before. Ignored off glibc and where MALLOC_MMAP_THRESHOLD_ is set.
    malloc_mmap_threshold_kib: int | None = bounded(None, min=0, max=malloc.MAX_THRESHOLD_KIB)


THRESHOLD_KEY = "trainer.malloc_mmap_threshold_kib"


class TrainingDiverged(UserError):
    """A non-finite loss, gradient norm or parameter: nothing of that step was applied or saved.

    The message names the step and the last finite checkpoint (or says there is none).
    """


@dataclass
class TrainResult:
    steps: int
    seconds: float
    examples_per_second: float
    history: list[dict[str, float]]
    out_dir: Path


def batch_plan(
    lengths: Sequence[int], global_batch: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The epoch's global batches (lists of example indices), a pure function of seed and epoch.

    With `group_by_length`, examples of similar length share a batch (sorted inside shuffled
    mega-batches of 50 batches), so little compute goes to padding while the order stays random.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        mega = global_batch * 50
        order = [
            i
            for s in range(0, len(order), mega)
            for i in sorted(order[s : s + mega], key=lambda i: -lengths[i])
        ]
    batches = [
        order[s : s + global_batch] for s in range(0, len(order) - global_batch + 1, global_batch)
    ]
    rng.shuffle(batches)
    return batches


def seed_everything(seed: int) -> None:
    """Seed Python and torch: call before building the model, so the seed decides a LoRA
    adapter's (or a reward head's) random init, whatever ran in the process before."""
    random.seed(seed)
    torch.manual_seed(seed)


def fused_adamw_supported(params: Sequence[torch.Tensor]) -> bool:
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


class Trainer:
    """Owns the accelerator, optimizer, schedule, logging and checkpoints of one run."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainerConfig,
        lengths: Sequence[int],
        accelerator: Accelerator | None = None,
        run_config: dict[str, Any] | None = None,
        tokenizer: Any = None,
        device: str = "auto",
    ):
        """`lengths`: the token count of every training example (the epoch's batches are planned
        from them); `device`: where to train (`model.device`) unless `accelerator` is given.
        Seed with `seed_everything(config.seed)` before building the model."""
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        malloc.decide_mmap_threshold(
            config.malloc_mmap_threshold_kib, f"{THRESHOLD_KEY} of the run in {config.out_dir}"
        )
        self.lengths = list(lengths)
        n_examples = len(self.lengths)
        self.tokenizer = tokenizer  # saved beside every checkpoint so each one loads on its own
        self.out_dir = Path(config.out_dir)
        self.accelerator = accelerator or make_accelerator(config, device)
        acc = self.accelerator
        torch.manual_seed(config.seed)
        self.global_micro_batch = config.batch_size * acc.num_processes
        per_epoch = n_examples // self.global_micro_batch // config.grad_accum
        if per_epoch == 0:
            raise ConfigError(
                f"{n_examples} examples cannot fill one optimizer step of "
                f"{config.batch_size} x {config.grad_accum} x {acc.num_processes} processes"
            )
        self.total_steps = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
        self.sharded = is_sharded(model)
        # bf16 working weights: the optimizer steps their fp32 masters (refreshed after each step).
        self.master: Bf16MasterWeights | None = None
        # An accelerator that autocasts (one the caller built for bf16) keeps the autocast path.
        if bf16_weights(config, acc.num_processes, self.sharded) and acc.mixed_precision == "no":
            self.master = Bf16MasterWeights(model)
        params = (
            self.master.masters
            if self.master is not None
            else [p for p in model.parameters() if p.requires_grad]
        )
        self.trained_params = params  # what is clipped and stepped
        optimizer = torch.optim.AdamW(
            params,
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            # One kernel over all parameters (transformers' default optimizer too) where the
            # device has it; the multi-tensor foreach path otherwise.
            fused=True if fused_adamw_supported(params) and not self.sharded else None,
        )
        if config.disable_dropout:
            disable_dropout(model)
        if self.sharded:  # FSDP2 already distributes the model: no DDP wrapper on top
            self.model, self.optimizer = model, optimizer
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        self.in_backward = None
        if config.step_in_backward == "auto" and in_backward.fits(
            config.max_grad_norm,
            config.grad_accum,
            acc.num_processes,
            config.mixed_precision,
            self.sharded,
        ):
            self.in_backward = in_backward.StepInBackward(optimizer, self._bad_gradient)
            if self.master is not None:  # fp32 masters get their gradients from the bf16 hooks
                self.master.step_master = self.in_backward.step_parameter
        # bf16 masters stepped after backward without accumulation: clipping, AdamW and the
        # refresh of the bf16 weights in one pass over the bf16 gradients (master_step).
        self.fused_master_step = (
            self.master is not None and self.in_backward is None and config.grad_accum == 1
        )
        if self.fused_master_step:
            self.master.keep_bf16_grads = True
        self.adamw = optimizer  # what the fused step updates (the prepared one wraps it)
        # Clipping folded into the optimizer step (training.clip_step) wherever accelerate's
        # clip would be torch's plain one: no loss scaler, no DeepSpeed or FSDP engine.
        self.clip_in_step = (
            not self.sharded
            and acc.scaler is None
            and acc.distributed_type
            in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        )
        name = {"constant": "constant_with_warmup"}.get(config.schedule, config.schedule)
        from transformers import get_scheduler  # 4 s of imports: not paid by a config error

        self.scheduler = get_scheduler(
            name,
            self.optimizer,
            num_warmup_steps=int(config.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.step = 0
        # Set once by the caller (anything with state_dict/load_state_dict, e.g. a trust-region
        # reference): saved with every checkpoint and restored by resume().
        self.extra_state: Any = None
        self.history: list[dict[str, float]] = []
        if acc.is_main_process:
            make_run_dir(self.out_dir)
            if run_config is not None:
                atomic_write(
                    self.out_dir / "config.json", json.dumps(run_config, indent=2, default=str)
                )
        if config.report_to:
            acc.init_trackers("prefalign", config=flat_config(run_config or {}))

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def fit(
        self,
        collate: Callable[[list[int]], dict],
        loss_fn: LossFn,
        after_step: Callable[[int], Any] | None = None,
        evaluate: Callable[[int], dict[str, float]] | None = None,
        group_by_length: bool = True,
    ) -> TrainResult:
        """Train to `total_steps` (from the resumed step, if `resume()` found a checkpoint).
        `collate(indices)` builds a batch; `after_step(step)` runs after each optimizer step
        (reference updates) and may return a dict of metrics to log with that step."""
        acc, cfg = self.accelerator, self.config
        lengths = self.lengths
        steps_per_epoch = len(lengths) // self.global_micro_batch // cfg.grad_accum
        rank = acc.process_index
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (cfg.progress and acc.is_main_process),
            desc="train",
        )
        start, seen, start_step = time.perf_counter(), 0, self.step
        plan, plan_epoch = [], None
        self.model.train()
        while self.step < self.total_steps:
            epoch, within = divmod(self.step, steps_per_epoch)
            if epoch != plan_epoch:  # one plan per epoch: building it is O(n log n)
                plan, plan_epoch = (
                    batch_plan(lengths, self.global_micro_batch, cfg.seed, epoch, group_by_length),
                    epoch,
                )
            micro = plan[within * cfg.grad_accum : (within + 1) * cfg.grad_accum]
            totals = MetricTotals()
            for m, indices in enumerate(micro):
                mine = indices[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
                batch = {
                    k: v.to(acc.device) if torch.is_tensor(v) else v
                    for k, v in collate(mine).items()
                }
                sync = m == len(micro) - 1
                with acc.no_sync(self.model) if not sync else nullcontext(), acc.autocast():
                    loss, metrics = loss_fn(self.model, batch)
                if self.in_backward is not None:  # backward steps: check the loss before it
                    self._check_finite(float(loss.detach()), None)
                acc.backward(loss / cfg.grad_accum)
                totals.add({"loss": loss, **metrics})
                seen += len(indices)
            # Reduced before the optimizer step: a non-finite loss on any process reaches every
            # process through the mean, so all of them stop at the same step, with nothing applied.
            record = totals.reduce(acc, check_keys=self.step == start_step)
            if self.in_backward is not None:  # every parameter stepped inside backward
                grad_norm = self.in_backward.grad_norm()
                # What LR schedulers check to warn of a schedule stepped before its optimizer.
                self.optimizer._opt_called = True
            elif self.fused_master_step:
                grad_norm = self.master.grad_norm()
                self._check_finite(record["loss"], grad_norm)
                self.master.step(self.adamw, clip_coefficient(grad_norm, cfg.max_grad_norm))
                self.optimizer._opt_called = True
            elif self.clip_in_step:
                norm = clip_step.grad_norm(self.trained_params)
                grad_norm = float(norm)
                self._check_finite(record["loss"], grad_norm)
                clip_step.clipped_step(
                    self.optimizer, self.adamw, self.trained_params, norm, cfg.max_grad_norm
                )
                if self.master is not None:
                    self.master.refresh()
            else:
                # Clipping at infinity still measures the norm (and unscales fp16 gradients).
                # DeepSpeed clips inside its engine and returns no norm.
                norm = acc.clip_grad_norm_(self.trained_params, cfg.max_grad_norm or math.inf)
                grad_norm = None if norm is None else local_norm_to_float(norm)
                # fp16's loss scaler expects overflows: it skips those steps and lowers the scale.
                self._check_finite(record["loss"], grad_norm if acc.scaler is None else None)
                self.optimizer.step()
                if self.master is not None:
                    self.master.refresh()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            hooked = after_step(self.step) if after_step is not None else None
            if isinstance(hooked, dict):  # the hook's own metrics (a reference's update error)
                record.update(hooked)
            record["grad_norm"] = grad_norm
            record["lr"] = self.scheduler.get_last_lr()[0]
            record["examples_per_s"] = seen / (time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            is_last = self.step == self.total_steps
            if evaluate is not None and (
                (cfg.eval_every and self.step % cfg.eval_every == 0) or is_last
            ):
                if acc.is_main_process:
                    record.update({f"eval/{k}": v for k, v in evaluate(self.step).items()})
                acc.wait_for_everyone()
                self.model.train()  # evaluators run in eval mode; training never does
            if (
                self.step % cfg.log_every == 0
                or is_last
                or any(k.startswith("eval/") for k in record)
            ):
                self._log(record)
            if (cfg.save_every and self.step % cfg.save_every == 0) or is_last:
                self.save_checkpoint()
        bar.close()
        elapsed = time.perf_counter() - start
        return TrainResult(
            self.step, elapsed, seen / max(elapsed, 1e-9), self.history, self.out_dir
        )

    def _check_finite(self, loss: float | None, grad_norm: float | None) -> None:
        """Raise before the optimizer step if this step's loss or gradient norm is not finite
        (`grad_norm` None: not measured here)."""
        step = self.step + 1
        if loss is None or not math.isfinite(loss):
            raise self._diverged(f"loss became {loss} at step {step}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise self._diverged(
                f"gradient norm became {grad_norm} at step {step} (the loss was {loss:.4g})"
            )

    def _bad_gradient(self, norm: float) -> None:
        """A non-finite gradient met inside backward: stop before anything is saved."""
        raise self._diverged(
            f"a gradient became {norm} at step {self.step + 1}",
            "parameters stepped earlier in its backward pass moved in memory, nothing was saved",
        )

    def _check_parameters(self) -> None:
        """Raise if a trained parameter is not finite: such weights are never written."""
        # A sharded (FSDP2) parameter is checked on this process's shard, and the count summed
        # over processes, so every process stops together.
        shards = [
            getattr(p, "to_local", lambda p=p: p)().detach()
            for p in self.model.parameters()
            if p.requires_grad
        ]
        bad = (
            torch.stack([(~torch.isfinite(t)).sum() for t in shards]).sum().float()
            if shards
            else torch.zeros(())
        )
        if self.sharded:
            bad = self.accelerator.reduce(bad.to(self.accelerator.device), reduction="sum")
        if bool(bad > 0):
            raise self._diverged(
                f"parameters became non-finite by step {self.step}", "they were not saved"
            )

    def _diverged(
        self, what: str, done: str = "nothing of it was applied or saved"
    ) -> TrainingDiverged:
        found = sorted(checkpoints(self.out_dir))
        last = (
            f"the last finite checkpoint is {found[-1][1]}"
            if found
            else "no checkpoint was written"
        )
        return TrainingDiverged(f"{what}; {done}, {last} (lower the lr or check the objective)")

    def _log(self, record: dict[str, float | None]) -> None:
        record = {"step": self.step, **{k: finite_or_none(v) for k, v in record.items()}}
        self.history.append(record)
        if self.accelerator.is_main_process:
            append_jsonl(self.out_dir / "metrics.jsonl", record)  # strict JSON: NaN as null
        if self.config.report_to:
            self.accelerator.log(
                {k: v for k, v in record.items() if k != "step" and v is not None}, step=self.step
            )

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N atomically (a temp dir renamed at the end), point `final` at
        it, then prune old ones. The weights are written once, in the checkpoint's model/."""
        acc = self.accelerator
        self._check_parameters()
        acc.wait_for_everyone()
        root = self.out_dir / "checkpoints"
        done = root / f"step-{self.step}"
        tmp = root / f".tmp-step-{self.step}"
        # Sharded weights, optimizer and reference states are gathered by every process
        # together (collectives) into the single-process formats; only the main one writes them.
        state = full_state_dict(self.model) if self.sharded else None
        optimizer_state = (
            full_optimizer_state(self.model, self.optimizer)
            if self.sharded
            else self.optimizer.state_dict()
        )
        extra = self.extra_state.state_dict() if self.extra_state is not None else None
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with self._fp32_parameters():  # bf16 working weights: the fp32 masters are saved
                save_model(self.unwrapped, self.tokenizer, tmp / MODEL_DIR, state_dict=state)
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if extra is not None:
                torch.save(extra, tmp / "extra_state.pt")
            (tmp / "state.json").write_text(
                json.dumps(
                    {"step": self.step, "num_processes": acc.num_processes, "fsdp": self.sharded}
                )
            )
        acc.wait_for_everyone()
        # Each process saves its own RNG state (sampling in dropout and data differ per rank).
        torch.save(rng_state(), tmp / f"rng-{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(done, ignore_errors=True)
            tmp.rename(done)
            point_final(self.out_dir, done)  # before pruning: `final` never dangles
            for old in sorted(checkpoints(self.out_dir))[: -self.config.keep_checkpoints]:
                shutil.rmtree(old[1], ignore_errors=True)
        acc.wait_for_everyone()
        return done

    def resume(self) -> bool:
        """Load the newest checkpoint of out_dir if there is one; returns whether it did."""
        found = sorted(checkpoints(self.out_dir))
        if not found:
            return False
        step, path = found[-1]
        state = read_checkpoint_state(path)
        if state["num_processes"] != self.accelerator.num_processes:
            raise RunDirError(
                f"checkpoint {path} was written by {state['num_processes']} processes; "
                "resume with the same number"
            )
        if state.get("fsdp", False) != self.sharded:
            written = "true" if state.get("fsdp", False) else "false"
            raise UserError(
                f"checkpoint {path} was written with trainer.fsdp={written}; "
                "resume with the same setting"
            )
        check_checkpoint_files(path, needs_extra=self.extra_state is not None)
        with self._fp32_parameters():  # into the fp32 masters; the bf16 weights follow
            load_trained_weights(self.unwrapped, path / MODEL_DIR)
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=False)
        if self.sharded:  # the full state by parameter name: each process keeps its slices
            load_full_optimizer_state(self.model, self.optimizer, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        if self.extra_state is not None:
            self.extra_state.load_state_dict(
                torch.load(path / "extra_state.pt", weights_only=False)
            )
        rng_file = path / f"rng-{self.accelerator.process_index}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        self.step = step
        if self.accelerator.is_main_process:
            print(f"resumed from {path} at step {step}")
        return True

    def _fp32_parameters(self):
        return self.master.fp32_parameters() if self.master is not None else nullcontext()

    def end(self) -> None:
        if self.config.report_to:
            self.accelerator.end_training()


class MetricTotals:
    """Sums and counts of one optimizer step's metrics, reduced across processes in one call."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, Metric]) -> None:
        for key, value in metrics.items():
            total, count = value if isinstance(value, tuple) else (value, 1)
            total = torch.as_tensor(total).detach().float().reshape(())
            count = torch.as_tensor(count, device=total.device).detach().float().reshape(())
            self.sums[key] = self.sums.get(key, 0) + total
            self.counts[key] = self.counts.get(key, 0) + count

    def reduce(self, accelerator: Accelerator, check_keys: bool = False) -> dict[str, float | None]:
        """Global means (None where no example had the metric). Every process must give the same
        keys: a different set would hang the all-reduce, so `check_keys` compares them first."""
        keys = sorted(self.sums)
        if check_keys and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            seen = gather_object([keys])
            if any(k != keys for k in seen):
                raise RuntimeError(
                    f"processes logged different metric keys: {seen}; "
                    "a loss_fn must return a fixed key set"
                )
        if not keys:
            return {}
        device = accelerator.device
        stacked = torch.stack(
            [self.sums[k].to(device) for k in keys] + [self.counts[k].to(device) for k in keys]
        )
        stacked = accelerator.reduce(stacked, reduction="sum").tolist()
        sums, counts = stacked[: len(keys)], stacked[len(keys) :]
        return {k: (s / c if c else None) for k, s, c in zip(keys, sums, counts, strict=True)}


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: such values are logged as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout probability: nn.Dropout modules, and the `attention_dropout` floats
    that Llama-family attention passes to its kernel directly."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def bf16_weights(config: TrainerConfig, num_processes: int, sharded: bool) -> bool:
    """Whether this run trains bf16 working weights with fp32 masters (instead of autocast)."""
    path = resolve_bf16_path(config.mixed_precision, config.bf16_path, num_processes, sharded)
    return path == "weights"


def make_accelerator(config: TrainerConfig, device: str = "auto") -> Accelerator:
    """The run's accelerator on `device` (`model.device`: auto, cpu, cuda, cuda:N)."""
    index = device_index(check_device(device))
    if index is not None:  # one GPU by number: accelerate trains on the current CUDA device
        if world_size() > 1:
            raise ConfigError(
                f"config key 'model.device': {device!r} names one GPU, but this run has "
                f"{world_size()} processes, each on its local rank's GPU: use auto or cuda"
            )
        torch.cuda.set_device(index)
    check_trackers(config.report_to)
    precision = resolve_mixed_precision(config.mixed_precision)
    if bf16_weights(config, world_size(), config.fsdp):
        precision = "no"  # the weights themselves are bf16: no autocast on top
    return Accelerator(
        # On a machine without CUDA, `cpu=True` lets torchrun processes join one gloo group.
        cpu=device == "cpu" or not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=config.report_to or None,
        project_dir=config.out_dir,
    )


def check_trackers(names: Sequence[str], key: str = "trainer.report_to") -> None:
    """Each tracker of `report_to` is one accelerate knows and is installed: accelerate raises a
    traceback for an unknown name and drops one that is not installed without a word."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = LoggerType.list()
    available = [str(t.value if isinstance(t, LoggerType) else t) for t in get_available_trackers()]
    for name in names:
        if name not in known:
            raise ConfigError(f"config key '{key}': got {name!r}, allowed: {', '.join(known)}")
        if name != "all" and name not in available:
            raise ConfigError(
                f"config key '{key}': {name!r} is not installed here (installed: "
                f"{', '.join(available) or 'none'}); pip install {name}, or leave it out"
            )


def flat_config(tree: dict[str, Any]) -> dict[str, Any]:
    """The run config as the flat scalar mapping experiment trackers take."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(tree).items()
    }
