"""Both bf16 paths (bf16 working weights with fp32 masters, and autocast) stay close to fp32 on
Llama, Qwen2 and GPT-2 with fp32 log-probs and loss; the weights path keeps fp32 masters in
training and in checkpoints, resumes bit-exact, trains LoRA on a bf16 base; and which bf16 path a
run takes."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from test_logprobs import tiny_model
from test_shared_prompt import random_pairs
from test_train_preference import LAYOUTS, straight_and_resumed
from test_train_preference import tiny as tiny_run  # noqa: F401  (a fixture)
from test_trainer import train_steps

from prefalign.objectives import compute_loss, get
from prefalign.shared_prompt import collate_shared_pairs, pair_logps
from prefalign.training.bf16_weights import Bf16MasterWeights
from prefalign.training.cpu_attention import (
    EAGER_MAX_WIDTH,
    EAGER_MEMORY_BYTES,
    eager_attention_bytes,
    use_eager_attention_for_bf16,
)
from prefalign.training.precision import resolve_bf16_path

pytestmark = pytest.mark.usefixtures("one_thread")


def dpo(model, batch, autocast: bool = False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        chosen, rejected = pair_logps(model, batch)
        loss = compute_loss(
            get("dpo"),
            chosen.sum,
            rejected.sum,
            chosen.sum.detach() + 1,
            rejected.sum.detach() - 1,
            beta=0.1,
        ).mean()
    loss.backward()
    return chosen.sum, rejected.sum, loss


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("path", ["weights", "autocast"])
@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2", "gpt2"])
def test_bf16_matches_fp32_within_tolerance_with_fp32_logps_and_loss(arch, path):
    model32 = tiny_model(arch)
    batch = collate_shared_pairs(*random_pairs(3, n=6), pad_id=0)
    c32, r32, loss32 = dpo(model32, batch)
    grad32 = flat(p.grad for p in model32.parameters())

    model16 = copy.deepcopy(model32)
    model16.zero_grad(set_to_none=True)
    if path == "weights":
        master = Bf16MasterWeights(model16)
        c16, r16, loss16 = dpo(model16, batch)
        assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
        assert all(p.grad is None for p in model16.parameters())  # moved to the masters
        assert all(m.dtype == m.grad.dtype == torch.float32 for m in master.masters)
        # Buffers (rotary frequencies) keep full precision.
        assert all(b.dtype != torch.bfloat16 for b in model16.buffers())
        grad16 = flat(m.grad for m in master.masters)
    else:
        c16, r16, loss16 = dpo(model16, batch, autocast=True)
        assert all(p.dtype == torch.float32 for p in model16.parameters())
        grad16 = flat(p.grad for p in model16.parameters())
    assert c16.dtype == loss16.dtype == torch.float32
    torch.testing.assert_close(torch.cat([c16, r16]), torch.cat([c32, r32]), rtol=2e-2, atol=0.2)
    assert abs(float(loss16.detach() - loss32.detach())) < 1e-2
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.98


def test_micro_batch_gradients_add_up_in_fp32():
    model = tiny_model("llama")
    master = Bf16MasterWeights(model)
    batch = collate_shared_pairs(*random_pairs(3, n=4), pad_id=0)
    dpo(model, batch)
    once = [m.grad.clone() for m in master.masters]
    dpo(model, batch)
    for m, g in zip(master.masters, once, strict=True):
        torch.testing.assert_close(m.grad, 2 * g)


def test_updates_below_bf16_resolution_accumulate_in_the_masters():
    layer = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.ones_(layer.weight)
    master = Bf16MasterWeights(layer)
    optimizer = torch.optim.AdamW(master.masters, lr=1e-3, weight_decay=0.0)
    for _ in range(10):  # each Adam step moves a weight by ~lr, under bf16's spacing at 1 (2^-7)
        layer(torch.ones(1, 4, dtype=torch.bfloat16)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        master.refresh()
    torch.testing.assert_close(master.masters[0], torch.full((1, 4), 0.99), rtol=0, atol=1e-4)
    assert torch.equal(layer.weight, master.masters[0].detach().to(torch.bfloat16))
    assert float(layer.weight.detach()[0, 0]) != 1.0  # moved by the accumulated steps


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_bf16_run_keeps_fp32_masters_saves_them_and_resumes_bit_exact(request, tmp_path, layout):
    tiny = request.getfixturevalue("tiny_run")  # test_train_preference's pairs and tiny Llama
    a, b = straight_and_resumed(tiny, tmp_path, layout, "trainer.mixed_precision=bf16")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == torch.float32, name  # the masters, not the bf16 working copy
        assert torch.equal(a[name], b[name]), name
    initial = load_file(tiny["model"] / "model.safetensors")
    if layout == "full":  # trained in fp32, not merely rounded: most weights moved off bf16
        moved = [n for n in a if not torch.equal(a[n], initial[n])]
        assert moved
        w = a[moved[0]]
        assert not torch.equal(w, w.to(torch.bfloat16).float())


def test_a_bf16_trainer_holds_bf16_weights_and_steps_fp32_masters_without_autocast(tmp_path):
    from accelerate.state import AcceleratorState

    from prefalign.training.loop import Trainer, TrainerConfig

    model = tiny_model("llama")
    config = TrainerConfig(out_dir=str(tmp_path), batch_size=2, mixed_precision="bf16")
    trainer = Trainer(model, config, lengths=[4] * 4)
    assert trainer.accelerator.mixed_precision == "no"  # no autocast over bf16 weights
    assert all(p.dtype == torch.bfloat16 for p in trainer.unwrapped.parameters())
    stepped = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert stepped and all(p.dtype == torch.float32 for p in stepped)
    # accelerate keeps one process-wide state: an autocasting accelerator needs a fresh one.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        config = TrainerConfig(
            out_dir=str(tmp_path), batch_size=2, mixed_precision="bf16", bf16_path="autocast"
        )
        autocast = Trainer(tiny_model("llama"), config, lengths=[4] * 4)
        assert autocast.accelerator.mixed_precision == "bf16" and autocast.master is None
        assert all(p.dtype == torch.float32 for p in autocast.unwrapped.parameters())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_the_bf16_path_follows_the_config_and_the_process_layout():
    assert resolve_bf16_path("no", "auto", 1, False) is None
    assert resolve_bf16_path("bf16", "auto", 1, False) == "weights"
    assert resolve_bf16_path("bf16", "auto", 2, False) == "autocast"
    assert resolve_bf16_path("bf16", "auto", 1, True) == "autocast"
    assert resolve_bf16_path("bf16", "autocast", 1, False) == "autocast"
    with pytest.raises(ValueError, match="trainer.bf16_path"):
        resolve_bf16_path("bf16", "weights", 2, False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_short_bf16_rows_take_eager_attention_with_the_same_logps(arch):
    model = tiny_model(arch)
    Bf16MasterWeights(model)
    batch = collate_shared_pairs(*random_pairs(3, n=6), pad_id=0)
    with torch.no_grad():
        chosen, rejected = pair_logps(model, batch)
        assert use_eager_attention_for_bf16(model, rows=6, width=batch["input_ids"].shape[1])
        assert model.config._attn_implementation == "eager"
        eager_chosen, eager_rejected = pair_logps(model, batch)  # the additive form of the mask
    torch.testing.assert_close(eager_chosen.sum, chosen.sum, rtol=1e-2, atol=0.1)
    torch.testing.assert_close(eager_rejected.sum, rejected.sum, rtol=1e-2, atol=0.1)


def test_long_or_many_rows_keep_sdpa():
    model = tiny_model("llama")
    assert not use_eager_attention_for_bf16(model, rows=4, width=EAGER_MAX_WIDTH + 1)
    too_many = EAGER_MEMORY_BYTES // eager_attention_bytes(model.config, 1, 128) + 1
    assert not use_eager_attention_for_bf16(model, rows=too_many, width=128)
    assert model.config._attn_implementation == "sdpa"


def test_bf16_masters_stepped_inside_backward_equal_the_step_after_it(tmp_path):
    kw = dict(max_grad_norm=0, mixed_precision="bf16")
    inside, model_inside, history_inside = train_steps(tmp_path, "inside", **kw)
    after, model_after, history_after = train_steps(tmp_path, "after", step_in_backward="off", **kw)
    assert inside.in_backward is not None and inside.master is not None
    assert after.in_backward is None
    for a, b in zip(inside.master.masters, after.master.masters, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model_inside.parameters(), model_after.parameters(), strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)  # refreshed in backward
    assert [h["loss"] for h in history_inside] == [h["loss"] for h in history_after]


def test_fp32_master_gradients_stepped_inside_backward_never_coexist(tmp_path):
    from test_trainer import collate_fn, config, gpt2, rows

    from prefalign.logprobs import nll_loss
    from prefalign.training.loop import Trainer

    model = gpt2()
    cfg = config(tmp_path, max_grad_norm=0, mixed_precision="bf16")
    trainer = Trainer(model, cfg, [7] * 16)
    masters = trainer.master.masters
    alive: list[int] = []
    for p in trainer.master.working:  # runs after the master hook on the same parameter
        p.register_post_accumulate_grad_hook(
            lambda _: alive.append(sum(m.grad is not None for m in masters))
        )
    trainer.fit(collate_fn(*rows()), lambda m, b: (nll_loss(m, b), {}))
    assert len(alive) == 2 * len(masters) and max(alive) == 0
