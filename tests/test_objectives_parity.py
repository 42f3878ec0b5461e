"""Parity of our objectives with TRL 1.16's DPOTrainer and KTOTrainer (a dev dependency).

TRL 1.x has no standalone loss function: each loss is computed inline in the trainers'
`_compute_loss`, from per-token log-probs returned by the model's fused LM head
(`model(..., labels=..., fused_lm_head=True).log_probs`). Both levels therefore run real trainers:
- objective level: stub models whose fused-head output carries given sequence log-probs (spread
  evenly over each completion's tokens), so TRL's loss code sees exactly the numbers ours gets;
  loss and gradients with respect to those log-probs are compared.
- model level: a tiny Llama and TRL's own tokenization, collation and log-prob computation,
  against `prefalign.logprobs.sequence_logps` and our objective on the same batch; loss and
  parameter gradients are compared.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

from prefalign import objectives  # noqa: E402
from prefalign.logprobs import sequence_logps, split_pairs  # noqa: E402

# We pass gradient_checkpointing=False explicitly (TRL defaults it to True); transformers 5 warns
# that the name is deprecated, and TRL itself calls the deprecated `is_gradient_checkpointing`.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*deprecated:FutureWarning")

# our objective -> (TRL DPO loss_type, our params). Betas differ from the defaults, and
# discopop's tau from its beta, so a parameter read from the wrong place would show.
DPO_CASES = {
    "dpo": ("sigmoid", {"beta": 0.3}),
    "ipo": ("ipo", {"beta": 0.25}),
    "hinge": ("hinge", {"beta": 0.2}),
    "robust": ("robust", {"beta": 0.15, "label_smoothing": 0.1}),
    "discopop": ("discopop", {"beta": 0.05, "tau": 0.1}),
}
KTO_PARAMS = {"beta": 0.1, "desirable_weight": 1.3, "undesirable_weight": 0.7}


def trl_config(cls, tmp_path, **kwargs):
    return cls(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        **kwargs,
    )


def dpo_args(tmp_path, loss_type: str, params: dict, batch_size: int):
    trl_params = dict(params)
    if "tau" in trl_params:
        trl_params["discopop_tau"] = trl_params.pop("tau")
    return trl_config(
        DPOConfig,
        tmp_path,
        loss_type=[loss_type],
        per_device_train_batch_size=batch_size,
        **trl_params,
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_llama(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


PREFERENCES = {
    "prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"],
    "chosen": [" w10 w11", " w12", " w13 w14 w15"],
    "rejected": [" w16", " w17 w18 w19", " w20 w21"],
}
UNPAIRED = {
    "prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w22 w23"],
    "completion": [" w10 w11", " w12", " w13 w14 w15", " w24 w25 w26 w27"],
    "label": [True, False, True, False],
}


def dpo_trainer(tmp_path, loss_type: str, params: dict, batch_size: int = 3) -> DPOTrainer:
    return DPOTrainer(
        model=tiny_llama(0),
        ref_model=tiny_llama(1),
        args=dpo_args(tmp_path, loss_type, params, batch_size),
        train_dataset=Dataset.from_dict(PREFERENCES),
        processing_class=tiny_tokenizer(),
    )


def kto_trainer(tmp_path) -> KTOTrainer:
    args = trl_config(KTOConfig, tmp_path, per_device_train_batch_size=4, **KTO_PARAMS)
    return KTOTrainer(
        model=tiny_llama(0),
        ref_model=tiny_llama(2),
        args=args,
        train_dataset=Dataset.from_dict(UNPAIRED),
        processing_class=tiny_tokenizer(),
    )


# --- objective level ------------------------------------------------------------------------


class StubLM:
    """Stands in for a model with TRL's fused LM head; `per_token[m]` answers
    input_ids[0, 0] == m."""

    def __init__(self, per_token: dict[int, torch.Tensor]):
        self.per_token = per_token

    def __call__(self, input_ids, labels, fused_lm_head, **kwargs):
        assert fused_lm_head
        log_probs = self.per_token[int(input_ids[0, 0])]
        zeros = torch.zeros_like(log_probs).detach()
        return SimpleNamespace(
            log_probs=log_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
            aux_loss=None,
        )


def completion_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """One prompt token, then `lengths[i]` completion tokens, then padding."""
    position = torch.arange(width)
    return ((position >= 1) & (position <= lengths.unsqueeze(1))).long()


def spread(sums: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [N, T-1] (fused-head layout) summing to `sums` over each completion."""
    shifted = mask[:, 1:].to(sums.dtype)
    return (sums / shifted.sum(1)).unsqueeze(1) * shifted


def random_logps(generator: torch.Generator, n: int) -> torch.Tensor:
    return -5 - 20 * torch.rand(n, generator=generator)


@pytest.mark.parametrize("name", DPO_CASES)
def test_objective_parity_with_trl_dpo(name, tmp_path):
    loss_type, params = DPO_CASES[name]
    trainer = copy.copy(dpo_trainer(tmp_path, loss_type, params))
    g = torch.Generator().manual_seed(0)
    batch, width = 8, 7
    lengths = torch.randint(1, width, (2 * batch,), generator=g)
    mask = completion_mask(lengths, width)
    pc, pr = (random_logps(g, batch).requires_grad_() for _ in range(2))
    rc, rr = random_logps(g, batch), random_logps(g, batch)
    inputs = {
        "input_ids": torch.zeros(2 * batch, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch, width, dtype=torch.long),
        "completion_mask": mask,
    }
    trainer.ref_model = StubLM({0: spread(torch.cat([rc, rr]), mask)})
    trl_loss = trainer._compute_loss(StubLM({0: spread(torch.cat([pc, pr]), mask)}), inputs, False)
    trl_grads = torch.autograd.grad(trl_loss, [pc, pr])

    # TRL's IPO divides each log-ratio by the completion's token count: we get per-token means.
    n_chosen, n_rejected = lengths[:batch], lengths[batch:]
    if objectives.get(name).length_normalized:
        pc_in, pr_in, rc_in, rr_in = pc / n_chosen, pr / n_rejected, rc / n_chosen, rr / n_rejected
    else:
        pc_in, pr_in, rc_in, rr_in = pc, pr, rc, rr
    loss = objectives.compute_loss(name, pc_in, pr_in, rc_in, rr_in, **params).mean()
    grads = torch.autograd.grad(loss, [pc, pr])

    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(grads, trl_grads, strict=True):
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_objective_parity_cdpo_with_trl_aot_at_batch_size_one(tmp_path):
    # TRL 1.16's "sigmoid" loss ignores label_smoothing (cDPO is gone). Its "aot" loss is the cDPO
    # form applied to log-ratios sorted over the batch; with one pair, sorting is the identity.
    params = {"beta": 0.5, "label_smoothing": 0.2}
    trainer = copy.copy(dpo_trainer(tmp_path, "aot", params, batch_size=1))
    g = torch.Generator().manual_seed(1)
    mask = completion_mask(torch.tensor([3, 2]), 5)
    inputs = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.ones(2, 5, dtype=torch.long),
        "completion_mask": mask,
    }
    for _ in range(5):
        pc, pr = (random_logps(g, 1).requires_grad_() for _ in range(2))
        rc, rr = random_logps(g, 1), random_logps(g, 1)
        trainer.ref_model = StubLM({0: spread(torch.cat([rc, rr]), mask)})
        policy = StubLM({0: spread(torch.cat([pc, pr]), mask)})
        trl_loss = trainer._compute_loss(policy, inputs, False)
        loss = objectives.compute_loss("dpo", pc, pr, rc, rr, **params).mean()
        torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
        for ours, theirs in zip(
            torch.autograd.grad(loss, [pc, pr]),
            torch.autograd.grad(trl_loss, [pc, pr]),
            strict=True,
        ):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kl_shift", [0.7, -0.7], ids=["kl_positive", "kl_clamped"])
def test_objective_parity_with_trl_kto(kl_shift, tmp_path):
    trainer = copy.copy(kto_trainer(tmp_path))
    g = torch.Generator().manual_seed(2)
    batch, width = 6, 7
    mask = completion_mask(torch.randint(1, width, (batch,), generator=g), width)
    kl_mask = completion_mask(torch.randint(1, width, (batch,), generator=g), width)
    policy = random_logps(g, batch).requires_grad_()
    reference = random_logps(g, batch)
    kl_reference = random_logps(g, batch)
    kl_policy = kl_reference + kl_shift + 0.1 * torch.randn(batch, generator=g)
    labels = torch.tensor([True, False, True, True, False, False])
    inputs = {
        "input_ids": torch.zeros(batch, width, dtype=torch.long),  # stubs dispatch on token 0 / 1
        "attention_mask": torch.ones(batch, width, dtype=torch.long),
        "completion_mask": mask,
        "KL_input_ids": torch.ones(batch, width, dtype=torch.long),
        "KL_attention_mask": torch.ones(batch, width, dtype=torch.long),
        "KL_completion_mask": kl_mask,
        "label": labels,
    }
    trainer.ref_model = StubLM({0: spread(reference, mask), 1: spread(kl_reference, kl_mask)})
    stub = StubLM({0: spread(policy, mask), 1: spread(kl_policy, kl_mask)})
    trl_loss = trainer._compute_loss(stub, inputs, False)
    (trl_grad,) = torch.autograd.grad(trl_loss, [policy])

    z0 = objectives.kto_kl_reference_point(kl_policy, kl_reference)
    loss = objectives.compute_loss("kto", policy, reference, labels, z0, **KTO_PARAMS).mean()
    (grad,) = torch.autograd.grad(loss, [policy])
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-5, atol=1e-7)


# --- model level ----------------------------------------------------------------------------


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    assert sum(g.abs().sum() for g in theirs.values()) > 0
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", DPO_CASES)
def test_model_parity_with_trl_dpo(name, tmp_path):
    loss_type, params = DPO_CASES[name]
    trainer = dpo_trainer(tmp_path, loss_type, params)
    model, ref_model = trainer.model, trainer.ref_model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])

    model.zero_grad()
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = gradients(model)

    model.zero_grad()
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool())
    chosen, rejected = split_pairs(sequence_logps(model, *args))
    with torch.no_grad():
        ref_chosen, ref_rejected = split_pairs(sequence_logps(ref_model, *args))
    mean = objectives.get(name).length_normalized
    pick = (lambda s: s.mean) if mean else (lambda s: s.sum)
    loss = objectives.compute_loss(
        name, pick(chosen), pick(rejected), pick(ref_chosen), pick(ref_rejected), **params
    ).mean()
    loss.backward()

    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert_same_gradients(gradients(model), trl_grads)


def test_model_parity_with_trl_kto(tmp_path):
    trainer = kto_trainer(tmp_path)
    model, ref_model = trainer.model, trainer.ref_model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

    model.zero_grad()
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = gradients(model)

    model.zero_grad()
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool())
    kl_args = (
        batch["KL_input_ids"],
        batch["KL_attention_mask"],
        batch["KL_completion_mask"].bool(),
    )
    policy = sequence_logps(model, *args).sum
    with torch.no_grad():
        reference = sequence_logps(ref_model, *args).sum
        kl_policy = sequence_logps(model, *kl_args).sum
        kl_reference = sequence_logps(ref_model, *kl_args).sum
    # These seeds give a positive KL estimate, so the reference point z0 is active (not clamped).
    assert objectives.kto_kl_reference_point(kl_policy, kl_reference) > 0
    z0 = objectives.kto_kl_reference_point(kl_policy, kl_reference)
    loss = objectives.compute_loss(
        "kto", policy, reference, batch["label"], z0, **KTO_PARAMS
    ).mean()
    loss.backward()

    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert_same_gradients(gradients(model), trl_grads)
