"""Reference policy: closed-form soft mixing, hard sync, frozen, LoRA adapter reference, resume."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import tiny_gpt2
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from prefalign.logprobs import nll_loss, sequence_logps
from prefalign.modeling import LoraSpec, add_lora
from prefalign.reference import ReferenceSpec, make_reference

VOCAB = 64


def llama(seed: int = 0, layers: int = 2, hidden: int = 32, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def gpt2(seed: int = 0, dropout: float = 0.0) -> GPT2LMHeadModel:
    return tiny_gpt2(seed, dropout, vocab_size=VOCAB, n_positions=32)  # ties wte and lm_head


def lora(model: torch.nn.Module, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(1)
    return add_lora(model, LoraSpec(r=4, alpha=8, dropout=dropout))


BUILDERS = {
    "llama": lambda: llama(),
    "llama-tied": lambda: llama(tie=True),
    "gpt2-tied": lambda: gpt2(),
    "llama-lora": lambda: lora(llama()),
}


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # one padded row
    loss_mask = attention_mask.bool().clone()
    loss_mask[:, :4] = False  # prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def tracked(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors (all of a full model, the adapter of a LoRA model)."""
    return {n: p.detach().clone().double() for n, p in model.named_parameters() if p.requires_grad}


def ref_tracked(ref, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's counterparts of `tracked(model)`, under the policy's names."""
    if hasattr(ref, "model") and ref.model is not model:  # full copy
        params = dict(ref.model.named_parameters())
    else:  # LoRA: reference adapter weights, renamed to the policy adapter
        params = {
            n.replace(".reference.", ".default."): t for n, t in ref.state_dict()["weights"].items()
        }
    return {n: params[n].detach().clone().double() for n in tracked(model)}


def train(model: torch.nn.Module, ref, steps: int, lr: float = 0.1):
    """k SGD steps; returns the parameter snapshots theta_0..theta_k and the update flags."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    snapshots, updated = [tracked(model)], []
    for step in range(1, steps + 1):
        opt.zero_grad()
        nll_loss(model, make_batch(step)).backward()
        opt.step()
        snapshots.append(tracked(model))
        updated.append(ref.after_optimizer_step(step))
    return snapshots, updated


def assert_same(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[n], b[n]) for n in a)


def lora_updates(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The weight update s * B @ A that `adapter` adds to every LoRA layer, in double precision."""
    out = {}
    for name, module in model.named_modules():
        if adapter in getattr(module, "lora_A", {}):
            a, b = module.lora_A[adapter].weight.double(), module.lora_B[adapter].weight.double()
            out[name] = module.scaling[adapter] * b @ a
    return out


def randomize_adapter(model: torch.nn.Module, seed: int = 7) -> None:
    """A trained-looking adapter: B non-zero, so the adapter changes the model's output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kind", [k for k in BUILDERS if "lora" not in k])
@pytest.mark.parametrize("period", [1, 3])
def test_soft_reference_matches_closed_form_mixture(kind: str, period: int) -> None:
    alpha, steps = 0.6, 7
    model = BUILDERS[kind]()
    ref = make_reference(model, ReferenceSpec(mode="soft", alpha=alpha, period=period))
    snapshots, updated = train(model, ref, steps)

    update_steps = [j for j in range(1, steps + 1) if j % period == 0]
    assert updated == [j in update_steps for j in range(1, steps + 1)]
    n = len(update_steps)
    expected = {}
    for name, theta0 in snapshots[0].items():
        value = (1 - alpha) ** n * theta0
        for i, j in enumerate(update_steps, start=1):
            value = value + alpha * (1 - alpha) ** (n - i) * snapshots[j][name]
        expected[name] = value
    got = ref_tracked(ref, model)
    assert differs(got, snapshots[-1])  # a real mixture, not a copy of the policy
    assert_same(got, expected, exact=False)


@pytest.mark.parametrize("period", [1, 3])
def test_lora_soft_reference_mixes_the_weight_updates_exactly(period: int) -> None:
    # theta_ref <- a*theta + (1-a)*theta_ref for the adapted weights W0 + s*B@A is the same
    # recursion on the updates s*B@A; rank 32 is the layers' full rank, so nothing is truncated.
    alpha, steps = 0.6, 7
    model = lora(llama())
    randomize_adapter(model)
    ref = make_reference(
        model, ReferenceSpec(mode="soft", alpha=alpha, period=period, lora_rank=32)
    )
    history = [lora_updates(model, "default")]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(1, steps + 1):
        opt.zero_grad()
        nll_loss(model, make_batch(step)).backward()
        opt.step()
        history.append(lora_updates(model, "default"))
        assert ref.after_optimizer_step(step) == (step % period == 0)
    expected = history[0]
    for step in range(1, steps + 1):
        if step % period == 0:
            expected = {n: alpha * history[step][n] + (1 - alpha) * expected[n] for n in expected}
    got = lora_updates(model, "reference")
    assert got.keys() == expected.keys()
    # float32 factors are mixed in float32 (prefalign.lora_mix): equal to the exact mixture up to
    # float32 roundings, ~1e-6 of each layer's norm (elementwise, the rounding order, and so the
    # last digits, moves with the thread count)
    for name in expected:
        error = float((got[name] - expected[name]).norm() / expected[name].norm())
        assert error < 1e-5, (name, error)
    assert ref.truncation_error < 1e-6


def test_lora_soft_update_of_a_sign_flipped_adapter_keeps_the_function() -> None:
    # (-A, -B) is the same function as (A, B): mixing them must keep it, not mix the factors
    # to zero (the bare base model).
    model = lora(llama())
    randomize_adapter(model)
    ref = make_reference(model, ReferenceSpec(mode="soft", alpha=0.5))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and ".default." in name:
                p.neg_()
    assert ref.after_optimizer_step(1)
    batch = make_batch()
    with torch.no_grad():
        policy = sequence_logps(model.eval(), **batch).sum
        with model.disable_adapter():
            base = sequence_logps(model, **batch).sum
    assert not torch.allclose(policy, base)
    torch.testing.assert_close(ref.logps(**batch).sum, policy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixing_beyond_the_rank_keeps_the_best_approximation_and_reports_its_error(
    dtype: torch.dtype,
) -> None:
    from prefalign.lora_mix import mix_factors_

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, generator=g), torch.randn(48, 4, generator=g)
    a_ref, b_ref = torch.randn(4, 32, generator=g), torch.randn(48, 4, generator=g)
    a, b, a_ref, b_ref = (t.to(dtype) for t in (a, b, a_ref, b_ref))
    exact = 0.6 * b.double() @ a.double() + 0.4 * b_ref.double() @ a_ref.double()  # rank 8
    error = float(mix_factors_(a_ref, b_ref, a, b, 0.6))
    u, sigma, vh = torch.linalg.svd(exact)
    best = (u[:, :4] * sigma[:4]) @ vh[:4]  # Eckart-Young: the best rank-4 approximation
    got = b_ref.double() @ a_ref.double()
    if dtype == torch.float64:
        torch.testing.assert_close(got, best, rtol=1e-10, atol=1e-10)
    else:  # computed in float32: a few dozen float32 roundings of the whole matrix (3.6e-6)
        assert float((got - best).norm() / best.norm()) < 1e-5
    assert error == pytest.approx(float(sigma[4:].norm() / sigma.norm()), rel=1e-4)
    assert 0 < error < 1


def test_batched_mix_of_many_layers_is_each_layers_own_mix_bit_for_bit() -> None:
    # mix_layers_ writes its float64 stacks in place; the plain per-layer mix is the definition.
    from prefalign.lora_mix import mix_factors_, mix_layers_

    g = torch.Generator().manual_seed(0)
    shapes = [(32, 48), (48, 32), (32, 32), (12, 20)]  # (in, out); 12 x 20: fewer than R kept
    r, rank = 4, 16
    layers = [
        tuple(
            torch.randn(rows, cols, generator=g)
            for rows, cols in ((rank, d_in), (d_out, rank), (r, d_in), (d_out, r))
        )
        for d_in, d_out in shapes * 3
    ]
    batched = [tuple(t.clone() for t in layer) for layer in layers]
    for _ in range(2):  # the second mix starts from a recompressed reference
        worst = mix_layers_(batched, 0.6)
        errors = [float(mix_factors_(*layer, 0.6)) for layer in layers]
        assert worst == max(errors) > 0
        for mine, plain in zip(batched, layers, strict=True):
            for x, y in zip(mine, plain, strict=True):
                assert torch.equal(x, y)
    assert not layers[-1][0][12:].any(), "directions past the layer's rank stay zero"


def test_frozen_lora_reference_of_a_trained_adapter_is_the_initial_policy() -> None:
    model = lora(llama())
    randomize_adapter(model)  # the policy starts from a trained adapter (e.g. LoRA SFT)
    ref = make_reference(model, ReferenceSpec(mode="frozen"))
    batch = make_batch()
    with torch.no_grad():
        initial = sequence_logps(model.eval(), **batch).sum
    torch.testing.assert_close(ref.logps(**batch).sum, initial, rtol=0, atol=0)
    model.train()
    _, updated = train(model, ref, 2, lr=0.05)
    assert not any(updated)
    torch.testing.assert_close(ref.logps(**batch).sum, initial, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(sequence_logps(model, **batch).sum, initial)


@pytest.mark.parametrize("kind", ["llama", "llama-lora"])
def test_hard_reference_syncs_every_tau_steps(kind: str) -> None:
    tau = 3
    model = BUILDERS[kind]()
    ref = make_reference(model, ReferenceSpec(mode="hard", tau=tau))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    snapshots = [tracked(model)]
    for step in range(1, 11):
        opt.zero_grad()
        nll_loss(model, make_batch(step)).backward()
        opt.step()
        snapshots.append(tracked(model))
        assert ref.after_optimizer_step(step) == (step % tau == 0)
        got = ref_tracked(ref, model)
        assert_same(got, snapshots[tau * (step // tau)])
        if step % tau:
            assert differs(got, snapshots[step])


@pytest.mark.parametrize("kind", ["llama", "llama-lora"])
def test_frozen_reference_never_changes(kind: str) -> None:
    model = BUILDERS[kind]()
    ref = make_reference(model, ReferenceSpec(mode="frozen"))
    batch = make_batch()
    before = ref.logps(**batch).sum
    _, updated = train(model, ref, 4)
    assert not any(updated)
    torch.testing.assert_close(ref.logps(**batch).sum, before, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(sequence_logps(model, **batch).sum, before)  # the policy did move


def test_frozen_lora_reference_is_the_base_model() -> None:
    plain = llama(seed=3)
    model = lora(llama(seed=3))
    n_params = sum(p.numel() for p in model.parameters())
    ref = make_reference(model, ReferenceSpec(mode="frozen"))
    assert sum(p.numel() for p in model.parameters()) == n_params  # no second adapter
    train(model, ref, 2)  # makes lora_B non-zero, so the adapter changes the output
    batch = make_batch()
    with torch.no_grad():
        expected = sequence_logps(plain.eval(), **batch).sum
        policy = sequence_logps(model, **batch).sum
    assert not torch.allclose(policy, expected)
    torch.testing.assert_close(ref.logps(**batch).sum, expected)


@pytest.mark.parametrize("lora_model", [False, True])
def test_reference_logps_have_no_grad_and_no_dropout(lora_model: bool) -> None:
    model = lora(gpt2(dropout=0.0), dropout=0.5) if lora_model else gpt2(dropout=0.5)
    if lora_model:  # lora_B starts at zero, which would hide the adapter's dropout
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
    model.train()
    ref = make_reference(model, ReferenceSpec(mode="soft"))
    batch = make_batch()
    first, second = ref.logps(**batch), ref.logps(**batch)
    assert not first.sum.requires_grad and first.sum.grad_fn is None
    torch.testing.assert_close(first.sum, second.sum, rtol=0, atol=0)
    torch.testing.assert_close(first.n_tokens, batch["loss_mask"][:, 1:].sum(1).float())
    # The reference starts equal to the policy, so it must match the policy's eval-mode scores.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(first.sum, sequence_logps(model, **batch).sum)
    model.train()
    # Train-mode scores are noisy; this makes sure dropout is really on in the policy.
    with torch.no_grad():
        assert not torch.allclose(sequence_logps(model, **batch).sum, first.sum)


def test_lora_reference_keeps_the_policy_adapter_trainable() -> None:
    model = lora(llama(), dropout=0.1)
    model.train()
    ref = make_reference(model, ReferenceSpec(mode="soft"))
    # A user-frozen policy tensor must stay frozen: peft's set_adapter would re-enable it.
    frozen = next(p for n, p in model.named_parameters() if "lora_A.default" in n)
    frozen.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(".default." in n for n, f in flags.items() if f)
    assert not any(f for n, f in flags.items() if ".reference." in n or "lora" not in n)
    ref.logps(**make_batch())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.active_adapter == "default"
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("lora_rank,times", [(0, 4), (8, 1)])
def test_lora_soft_reference_is_adapter_sized(lora_rank: int, times: int) -> None:
    base = llama(hidden=256)
    n_base = sum(p.numel() for p in base.parameters())
    model = add_lora(base, LoraSpec(r=8))
    before = sum(p.numel() for p in model.parameters())
    adapter = before - n_base
    make_reference(model, ReferenceSpec(mode="soft", lora_rank=lora_rank))
    added = sum(p.numel() for p in model.parameters()) - before
    assert added == times * adapter  # rank 4x the policy's by default


def test_tied_embeddings_stay_tied() -> None:
    model = gpt2()
    ref = make_reference(model, ReferenceSpec(mode="soft", alpha=0.5))
    train(model, ref, 2)
    emb, head = ref.model.get_input_embeddings().weight, ref.model.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()
    assert (
        model.get_input_embeddings().weight.data_ptr()
        == model.get_output_embeddings().weight.data_ptr()
    )


def test_update_is_one_foreach_call_over_many_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama(layers=12, hidden=16)
    n_tensors = len(list(model.parameters())) + sum(b.is_floating_point() for b in model.buffers())
    assert len(list(model.parameters())) > 100
    ref = make_reference(model, ReferenceSpec(mode="soft", alpha=0.25))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    expected = {n: 0.25 * p + 0.75 * (p - 1.0) for n, p in model.named_parameters()}

    calls = []
    real = torch._foreach_lerp_

    def counting(refs, pols, weight):
        calls.append(len(refs))
        return real(refs, pols, weight)

    monkeypatch.setattr(torch, "_foreach_lerp_", counting)
    assert ref.after_optimizer_step(1)
    assert calls == [n_tensors]
    got = dict(ref.model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value)


@pytest.mark.parametrize("kind", ["llama", "llama-lora"])
def test_state_dict_round_trip_restores_the_reference(kind: str) -> None:
    spec = ReferenceSpec(mode="soft", alpha=0.5)
    model = BUILDERS[kind]()
    ref = make_reference(model, spec)
    train(model, ref, 3)
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    expected, batch = ref_tracked(ref, model), make_batch()
    expected_logps = ref.logps(**batch).sum

    fresh_model = BUILDERS[kind]()  # a resumed run builds its reference from a fresh policy
    fresh = make_reference(fresh_model, spec)
    assert differs(ref_tracked(fresh, fresh_model), expected)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    assert_same(ref_tracked(fresh, fresh_model), expected)
    torch.testing.assert_close(fresh.logps(**batch).sum, expected_logps, rtol=0, atol=0)

    with pytest.raises(ValueError, match="hard"):
        make_reference(BUILDERS[kind](), ReferenceSpec(mode="hard")).load_state_dict(
            ref.state_dict()
        )


def test_full_frozen_state_keeps_the_initial_weights() -> None:
    model = llama()
    ref = make_reference(model, ReferenceSpec(mode="frozen"))
    state = {k: v.clone() for k, v in ref.state_dict()["weights"].items()}
    train(model, ref, 2)
    resumed = make_reference(model, ReferenceSpec(mode="frozen"))  # copy of the trained policy
    resumed.load_state_dict({"spec": ref.state_dict()["spec"], "weights": state})
    batch = make_batch()
    torch.testing.assert_close(resumed.logps(**batch).sum, ref.logps(**batch).sum, rtol=0, atol=0)


def test_none_mode() -> None:
    ref = make_reference(llama(), ReferenceSpec(mode="none"))
    with pytest.raises(RuntimeError, match="mode is 'none'"):
        ref.logps(**make_batch())
    assert ref.after_optimizer_step(512) is False
    ref.load_state_dict(ref.state_dict())


def test_spec_validation() -> None:
    with pytest.raises(ValueError):
        ReferenceSpec(mode="soft", alpha=0.0)
    with pytest.raises(ValueError):
        ReferenceSpec(mode="hard", tau=0)
    with pytest.raises(ValueError):
        ReferenceSpec(mode="sometimes")  # type: ignore[arg-type]


def test_wrapped_policy_is_unwrapped() -> None:
    class Wrapper(torch.nn.Module):  # stands in for DDP / accelerate
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    model = llama()
    ref = make_reference(Wrapper(model), ReferenceSpec(mode="hard", tau=1))
    train(model, ref, 1)
    assert_same(ref_tracked(ref, model), tracked(model))


def test_save_pretrained_full_and_lora(tmp_path) -> None:
    from peft import PeftModel

    batch = make_batch()
    model = llama()
    ref = make_reference(model, ReferenceSpec(mode="soft"))
    train(model, ref, 2)
    ref.save_pretrained(tmp_path / "full")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(loaded, **batch).sum, ref.logps(**batch).sum)

    model = lora(llama(seed=5))
    ref = make_reference(model, ReferenceSpec(mode="soft"))
    train(model, ref, 2)
    ref.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(llama(seed=5), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(loaded, **batch).sum, ref.logps(**batch).sum)

    model = lora(llama(seed=6))
    ref = make_reference(model, ReferenceSpec(mode="frozen"))
    ref.save_pretrained(tmp_path / "base")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_logps(loaded, **batch).sum, sequence_logps(llama(seed=6), **batch).sum
        )
