"""Reference policy for preference objectives: frozen, or trust-region (TR-DPO) soft / hard updates.

Two storage layouts:

- Full model: the reference is a deep copy of the policy (eval mode, no grads).
- LoRA (the policy is a peft model): the reference is a second adapter named "reference" on the
  same frozen base, so it costs adapter-sized memory. A frozen LoRA reference is the initial
  policy: the base model with adapters disabled while the starting adapter is still the
  identity (B = 0), a copy of the starting adapter when training starts from a trained one.

Updates (`theta_ref <- alpha*theta + (1-alpha)*theta_ref` every `period` steps, or
`theta_ref <- theta` every `tau` steps) run as one fused `torch._foreach_*` call per
(device, dtype) group over tensor lists built once at construction: no Python loop over
parameters on the hot path. A LoRA soft update mixes the adapters' weight updates B@A, not
their factors (`prefalign.lora_mix`): one batched QR and SVD per layer shape.

Build the reference after the policy is on its final device and dtype: the reference keeps
handles to the policy's parameters and the full copy is made where the policy lives.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch

from prefalign.config import ConfigError, bounded
from prefalign.errors import RunDirError
from prefalign.logprobs import SequenceLogps, sequence_logps
from prefalign.lora_mix import copy_factors_, mix_layers_, mix_sharded_layers_
from prefalign.modeling import is_peft_model
from prefalign.training import malloc
from prefalign.training.fsdp import (
    full_state_dict,
    full_tensor,
    is_dtensor,
    is_sharded,
    load_full_,
    local_tensor,
)

REFERENCE_ADAPTER = "reference"
Mode = Literal["frozen", "soft", "hard", "none"]
T = TypeVar("T")


@dataclass
class ReferenceSpec:
    """How the reference policy behaves during training.

    mode: "frozen" (the initial policy), "soft" / "hard" (trust-region updates), or "none" for
    objectives that need no reference (GenARM).
    """

    mode: Mode = "frozen"
    alpha: float = bounded(0.6, gt=0, max=1)  # soft: theta_ref <- alpha*theta + (1-alpha)*theta_ref
    period: int = bounded(1, min=1)  # soft: mix every `period` optimizer steps
    tau: int = bounded(512, min=1)  # hard: theta_ref <- theta every `tau` optimizer steps
    # soft with a LoRA policy: the rank of the reference adapter that holds the mixed weight
    # updates (0: 4x the policy's rank); the mixture is exact up to this rank, truncated beyond.
    lora_rank: int = bounded(0, min=0)

    def __post_init__(self) -> None:
        if self.mode not in ("frozen", "soft", "hard", "none"):
            raise ConfigError(
                f"reference mode must be frozen, soft, hard or none, got {self.mode!r}"
            )
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"reference alpha must be in (0, 1], got {self.alpha}")
        if self.lora_rank < 0:
            raise ConfigError(
                f"reference lora_rank must be >= 0 (0: 4x the policy's rank), got {self.lora_rank}"
            )
        if self.period < 1 or self.tau < 1:
            raise ConfigError(
                f"reference period and tau must be >= 1, got {self.period}, {self.tau}"
            )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / accelerate wrapper (or the model itself)."""
    return getattr(model, "module", model)


class _TensorPairs:
    """(reference, policy) tensor pairs grouped by (device, dtype): one foreach call per group."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        groups: dict[
            tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]
        ] = {}
        for ref, pol in pairs:
            # Sharded (DTensor) parameters: update this process's shards in place, a purely
            # local operation, as policy and reference are sharded alike.
            ref, pol = local_tensor(ref), local_tensor(pol)
            if ref.shape != pol.shape or ref.dtype != pol.dtype or ref.device != pol.device:
                raise ValueError(
                    "reference/policy tensor mismatch: "
                    f"{tuple(ref.shape)} {ref.dtype} {ref.device} "
                    f"vs {tuple(pol.shape)} {pol.dtype} {pol.device} "
                    "(build the reference after moving the policy)"
                )
            refs, pols = groups.setdefault((ref.device, ref.dtype), ([], []))
            refs.append(ref)
            pols.append(pol)
        self.groups = list(groups.values())
        self.n_tensors = len(pairs)

    @torch.no_grad()
    def lerp_(self, weight: float) -> None:
        # ref.lerp_(pol, w) == w*pol + (1-w)*ref, fused over the whole group.
        for refs, pols in self.groups:
            torch._foreach_lerp_(refs, pols, weight)

    @torch.no_grad()
    def copy_(self) -> None:
        for refs, pols in self.groups:
            torch._foreach_copy_(refs, pols)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout), then restore every module's own training flag."""
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in zip(model.modules(), flags, strict=True):
            module.training = flag


class ReferencePolicy:
    """Scores sequences with the reference and applies trust-region updates after optimizer
    steps."""

    def __init__(self, spec: ReferenceSpec) -> None:
        self.spec = spec

    def logps(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> SequenceLogps:
        """Reference log-probs of the response tokens: no autograd, eval-mode behaviour."""
        return self.score(lambda model: sequence_logps(model, input_ids, attention_mask, loss_mask))

    def score(self, fn: Callable[[torch.nn.Module], T]) -> T:
        """`fn(model)` run on the reference model (no autograd, eval mode, reference adapter
        active): any scoring function, e.g. a shared-prompt pair forward."""
        # No autograd: every buffer of the forward dies inside it, so it can recycle heap blocks.
        with torch.no_grad(), malloc.transient_heap():
            return self._score(fn)

    def after_optimizer_step(self, step: int) -> bool:
        """Call after every optimizer step; `step` counts steps done so far (1-based).

        Returns True if the reference was updated at this step.
        """
        mode = self.spec.mode
        if mode == "soft" and step % self.spec.period == 0:
            self._pairs().lerp_(self.spec.alpha)
            return True
        if mode == "hard" and step % self.spec.tau == 0:
            self._pairs().copy_()
            return True
        return False

    def rebind(self, policy: torch.nn.Module) -> None:
        """Pair the reference with the policy's parameters again after both were replaced in
        place (sharded by FSDP2): updates then run on the new (local-shard) tensors."""

    def separate_model(self) -> torch.nn.Module | None:
        """The model this reference holds apart from the policy (a full copy), which a sharded
        run shards like the policy; None where it lives inside the policy (a LoRA adapter)."""
        return None

    def update_metrics(self) -> dict[str, float]:
        """What to log about the last update (the LoRA soft mixture's truncation error)."""
        return {}

    def state_dict(self) -> dict:
        """Checkpoint state; tensors are live views (save or clone before training on)."""
        return {"spec": asdict(self.spec), "weights": self._weights()}

    def load_state_dict(self, state: dict) -> None:
        saved_mode = state["spec"]["mode"]
        if saved_mode != self.spec.mode:
            raise RunDirError(
                f"checkpoint holds a {saved_mode!r} reference, this run uses {self.spec.mode!r}"
            )
        self._load_weights(state["weights"])

    def save_pretrained(self, path: str | Path) -> None:
        """Write the reference in Hugging Face format (a LoRA reference adapter as a peft
        adapter)."""
        raise NotImplementedError

    # Variant hooks.
    def _score(self, fn: Callable[[torch.nn.Module], T]) -> T:
        raise NotImplementedError

    def _pairs(self) -> _TensorPairs:
        raise NotImplementedError

    def _weights(self) -> dict[str, torch.Tensor]:
        return {}

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if weights:
            raise ValueError(f"unexpected reference weights for mode {self.spec.mode!r}")


class NoReference(ReferencePolicy):
    """mode "none": the objective has no reference; updates are no-ops."""

    def _score(self, fn):
        raise RuntimeError(
            "reference mode is 'none' but the objective asked for reference log-probs; "
            "use mode 'frozen', 'soft' or 'hard' for objectives with a reference"
        )

    def after_optimizer_step(self, step: int) -> bool:
        return False

    def save_pretrained(self, path: str | Path) -> None:
        raise RuntimeError("reference mode is 'none': there is no reference model to save")


class ModelReference(ReferencePolicy):
    """A given model as a frozen reference, used as it is (no copy): the initial policy loaded
    from disk to score a trust-region run against, for example."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(ReferenceSpec(mode="frozen"))
        self.model = model.eval().requires_grad_(False)

    def _score(self, fn):
        with _eval_mode(self.model):
            return fn(self.model)


class InitialPolicyReference(ReferencePolicy):
    """A frozen full-model reference that is never copied: before the first optimizer step the
    policy *is* the initial policy, so it scores the pairs once (eval mode, no autograd) for a
    log-prob cache, and `release()` then drops it, so it can never score again.

    It saves a full copy of the weights (as large as the policy) for runs whose reference is
    only read through such a cache. Its checkpoint state holds no weights: a frozen reference
    is the initial policy, which a resumed run loads from the same source.
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__(ReferenceSpec(mode="frozen"))
        self.model: torch.nn.Module | None = unwrap(policy)

    def _score(self, fn):
        if self.model is None:
            raise RuntimeError(
                "the frozen reference was released after its log-probs were cached; "
                "nothing may score with it again"
            )
        with _eval_mode(self.model):
            return fn(self.model)

    def release(self) -> None:
        self.model = None

    def state_dict(self) -> dict:
        return {"spec": asdict(self.spec), "weights": {}, "initial_policy": True}

    def load_state_dict(self, state: dict) -> None:
        if state["spec"]["mode"] != "frozen":
            raise RunDirError(
                f"checkpoint holds a {state['spec']['mode']!r} reference, this run uses 'frozen'"
            )
        # Saved frozen weights (older checkpoints) are the initial policy's: nothing to load.


class FullReference(ReferencePolicy):
    """The reference is a full copy of the policy."""

    def __init__(self, policy: torch.nn.Module, spec: ReferenceSpec) -> None:
        super().__init__(spec)
        policy = unwrap(policy)
        self.model = copy.deepcopy(policy)
        self.model.requires_grad_(False)
        self.model.eval()
        for p in self.model.parameters():
            p.grad = None
        self._tensor_pairs = None
        if spec.mode in ("soft", "hard"):
            self._tensor_pairs = _TensorPairs(_full_pairs(self.model, policy))

    def rebind(self, policy: torch.nn.Module) -> None:
        if self._tensor_pairs is not None:
            self._tensor_pairs = _TensorPairs(_full_pairs(self.model, unwrap(policy)))

    def separate_model(self) -> torch.nn.Module:
        return self.model

    def _score(self, fn):
        return fn(self.model)

    def _pairs(self) -> _TensorPairs:
        return self._tensor_pairs

    # Frozen weights are state too: on resume the policy has moved, so a fresh copy of it would
    # be wrong.
    def _weights(self) -> dict[str, torch.Tensor]:
        if is_sharded(self.model):  # gathered (a collective): the main process keeps it
            return full_state_dict(self.model)
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state.get("initial_policy"):  # saved by an InitialPolicyReference: no weights
            if self.spec.mode != "frozen":
                raise RunDirError(
                    f"checkpoint holds a 'frozen' reference, this run uses {self.spec.mode!r}"
                )
            return  # this copy, made before resuming, is the initial policy
        super().load_state_dict(state)

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if not is_sharded(self.model):
            self.model.load_state_dict(weights)
            return
        # Sharded: each process copies its slice into its shards in place, so the tensor pairs
        # of the trust-region update keep pointing at the live storage.
        own = self.model.state_dict()
        if set(own) != set(weights):
            raise ValueError(
                "checkpoint reference does not match this model: "
                f"{sorted(set(own) ^ set(weights))[:3]}"
            )
        for name, tensor in own.items():
            load_full_(tensor, weights[name])

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(str(path))


def _full_pairs(
    ref: torch.nn.Module, policy: torch.nn.Module
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Matching parameters and floating buffers; named_parameters() yields tied tensors once."""
    pol_params = dict(policy.named_parameters())
    pairs = [(p, pol_params[name]) for name, p in ref.named_parameters()]
    pol_buffers = dict(policy.named_buffers())
    pairs += [(b, pol_buffers[name]) for name, b in ref.named_buffers() if b.is_floating_point()]
    return pairs


class LoraReference(ReferencePolicy):
    """LoRA policy: the reference is a second adapter on the shared frozen base.

    frozen: a copy of the initial adapter, or, when that adapter does not change the output yet
    (a fresh LoRA's B is zero), the bare base model with nothing stored. hard: an adapter of
    the policy's shape, copied exactly every `tau` steps. soft: an adapter of rank
    `spec.lora_rank` holding the mixture of the weight updates (see `prefalign.lora_mix`).
    """

    def __init__(self, policy: torch.nn.Module, spec: ReferenceSpec) -> None:
        super().__init__(spec)
        self.model = unwrap(policy)
        self.policy_adapter = self.model.active_adapter
        self._tensor_pairs = None
        self._factors: list[tuple[torch.Tensor, ...]] = []  # soft: (A_ref, B_ref, A, B) per layer
        self.truncation_error = 0.0  # soft: the largest dropped share of a mixture, last update
        self.uses_base = spec.mode == "frozen" and not adapter_changes_output(
            self.model, self.policy_adapter
        )
        if self.uses_base:
            return
        if REFERENCE_ADAPTER in self.model.peft_config:
            raise ValueError(f"the policy already has an adapter named {REFERENCE_ADAPTER!r}")
        config = copy.deepcopy(self.model.peft_config[self.policy_adapter])
        if spec.mode == "soft":
            config = _soft_adapter_config(config, spec)
        self.model.add_adapter(REFERENCE_ADAPTER, config)
        self._bind()
        self._sync()

    def _bind(self) -> None:
        pairs = all_pairs = _adapter_pairs(self.model, self.policy_adapter)
        self._ref_names = [name for name, _ in pairs]
        self._ref_params = [ref for _, (ref, _) in pairs]
        for p in self._ref_params:
            p.requires_grad_(False)
        if self.spec.mode == "soft":
            self._factors = _lora_factors(self.model, self.policy_adapter)
            factor_ids = {id(t) for group in self._factors for t in group}
            pairs = [
                pair for pair in pairs if id(pair[1][0]) not in factor_ids
            ]  # e.g. modules_to_save
        self._tensor_pairs = _TensorPairs([pair for _, pair in pairs])
        # Flags to put back after peft's set_adapter, which flips requires_grad between adapters.
        self._adapter_params = self._ref_params + [pol for _, (_, pol) in all_pairs]

    def after_optimizer_step(self, step: int) -> bool:
        if self.spec.mode == "soft" and step % self.spec.period == 0:
            # Whole weights (modules_to_save) mix linearly; LoRA layers mix their products.
            self._tensor_pairs.lerp_(self.spec.alpha)
            mix = mix_sharded_layers_ if is_dtensor(self._factors[0][0]) else mix_layers_
            self.truncation_error = mix(self._factors, self.spec.alpha)
            return True
        if self.spec.mode == "hard" and step % self.spec.tau == 0:
            self._sync()
            return True
        return False

    def update_metrics(self) -> dict[str, float]:
        return {"reference/truncation_error": self.truncation_error} if self._factors else {}

    def _sync(self) -> None:
        """The reference becomes the policy, exactly."""
        self._tensor_pairs.copy_()
        for group in self._factors:
            copy_factors_(*group)

    def rebind(self, policy: torch.nn.Module) -> None:
        if self._tensor_pairs is not None:
            self._bind()

    def _score(self, fn):
        with _eval_mode(self.model):
            if self.uses_base:
                with self.model.disable_adapter():
                    return fn(self.model)
            with self._reference_adapter():
                return fn(self.model)

    @contextlib.contextmanager
    def _reference_adapter(self) -> Iterator[None]:
        flags = [p.requires_grad for p in self._adapter_params]
        self.model.set_adapter(REFERENCE_ADAPTER)
        try:
            yield
        finally:
            self.model.set_adapter(self.policy_adapter)
            for p, flag in zip(self._adapter_params, flags, strict=True):
                p.requires_grad_(flag)

    def _pairs(self) -> _TensorPairs:
        return self._tensor_pairs

    def _weights(self) -> dict[str, torch.Tensor]:
        if self.uses_base:
            return {}  # the base model, which training never changes
        # A sharded adapter is gathered whole (a collective: every process calls this).
        return {
            name: full_tensor(p.detach())
            for name, p in zip(self._ref_names, self._ref_params, strict=True)
        }

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if self.uses_base:
            return super()._load_weights(weights)
        if set(weights) != set(self._ref_names) or any(
            weights[n].shape != p.shape
            for n, p in zip(self._ref_names, self._ref_params, strict=True)
        ):
            raise RunDirError(
                "checkpoint reference adapter does not match this model's adapter layout"
            )
        for name, p in zip(self._ref_names, self._ref_params, strict=True):
            load_full_(p, weights[name])  # a sharded adapter keeps its own slice, in place

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.uses_base:
            self._save_base(path)
            return
        # peft writes non-default adapters into a subfolder named after the adapter; lift it to
        # `path`.
        with tempfile.TemporaryDirectory(dir=path) as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[REFERENCE_ADAPTER])
            for item in (Path(tmp) / REFERENCE_ADAPTER).iterdir():
                shutil.move(str(item), path / item.name)

    def _save_base(self, path: Path) -> None:
        try:
            from peft.utils.save_and_load import get_base_model_state_dict
        except ImportError as err:  # added in recent peft releases
            raise RuntimeError(
                "saving a frozen LoRA reference (the base model) needs a newer peft"
            ) from err
        state = get_base_model_state_dict(self.model)
        self.model.get_base_model().save_pretrained(str(path), state_dict=state)


def _adapter_pairs(
    model: torch.nn.Module, adapter: str
) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(reference name, (reference tensor, policy tensor)) for every tensor of the policy
    adapter."""
    params = dict(model.named_parameters())
    pairs = []
    for name, pol in params.items():
        parts = name.split(".")
        if adapter not in parts:
            continue
        ref_name = ".".join(REFERENCE_ADAPTER if part == adapter else part for part in parts)
        pairs.append((ref_name, (params[ref_name], pol)))
    adapter_ids = {id(pol) for _, (_, pol) in pairs}
    shared = [n for n, p in params.items() if p.requires_grad and id(p) not in adapter_ids]
    if shared:
        warnings.warn(
            f"{len(shared)} trainable tensors outside the LoRA adapter (e.g. {shared[0]}) "
            "are shared by "
            "policy and reference, so the trust region does not cover them",
            stacklevel=3,
        )
    return pairs


def _lora_layers(model: torch.nn.Module, adapter: str) -> list[torch.nn.Module]:
    """peft's LoRA layers that carry `adapter` (Linear layers: lora_A / lora_B submodules)."""
    layers = []
    for module in model.modules():
        if adapter in getattr(module, "lora_A", {}) and adapter in getattr(module, "lora_B", {}):
            layers.append(module)
        elif adapter in getattr(module, "lora_embedding_A", {}):
            layers.append(module)
    return layers


def adapter_changes_output(model: torch.nn.Module, adapter: str) -> bool:
    """Whether `adapter` adds anything to the base model: a LoRA update B @ A is zero when either
    factor is (peft initializes B to zero), and modules_to_save copies start equal to the base."""
    for module in _lora_layers(model, adapter):
        if adapter in getattr(module, "lora_embedding_A", {}):
            factors = (module.lora_embedding_A[adapter], module.lora_embedding_B[adapter])
        else:
            factors = (module.lora_A[adapter].weight, module.lora_B[adapter].weight)
        if all(bool(f.detach().abs().sum() > 0) for f in factors):
            return True
    trained_copies = [n for n, _ in model.named_parameters() if f"modules_to_save.{adapter}." in n]
    return bool(trained_copies)  # a trained copy may differ from the base: keep it exactly


def _soft_adapter_config(config, spec: ReferenceSpec):
    """The soft reference adapter: rank `spec.lora_rank` (4x the policy's by default)."""
    if (
        getattr(config, "use_dora", False)
        or getattr(config, "rank_pattern", None)
        or getattr(config, "alpha_pattern", None)
    ):
        raise NotImplementedError(
            "reference.mode 'soft' mixes LoRA weight updates B@A at one rank and scale; DoRA and "
            "per-module rank or alpha patterns are not supported (use mode 'hard' or 'frozen')"
        )
    rank = spec.lora_rank or 4 * config.r
    scale = config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)
    config.r, config.lora_alpha, config.use_rslora = rank, scale * rank, False
    return config


def _lora_factors(model: torch.nn.Module, adapter: str) -> list[tuple[torch.Tensor, ...]]:
    """(A_ref, B_ref, A, B) weights of every LoRA linear layer, the reference's scale set to the
    policy's exactly (peft would recompute it from the config as alpha / r)."""
    groups = []
    for module in _lora_layers(model, adapter):
        if adapter in getattr(module, "lora_embedding_A", {}):
            raise NotImplementedError(
                "reference.mode 'soft' does not support LoRA on embeddings yet"
            )
        module.scaling[REFERENCE_ADAPTER] = module.scaling[adapter]
        groups.append(
            (
                module.lora_A[REFERENCE_ADAPTER].weight,
                module.lora_B[REFERENCE_ADAPTER].weight,
                module.lora_A[adapter].weight,
                module.lora_B[adapter].weight,
            )
        )
    return groups


def make_reference(policy: torch.nn.Module, spec: ReferenceSpec) -> ReferencePolicy:
    """Build the reference for `policy` (a plain, peft, or DDP/accelerate-wrapped model)."""
    if spec.mode == "none":
        return NoReference(spec)
    if is_peft_model(unwrap(policy)):
        return LoraReference(policy, spec)
    return FullReference(policy, spec)
