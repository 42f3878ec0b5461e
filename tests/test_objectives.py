"""The objective registry: hand-computed losses, registry behaviour and user objectives."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign import objectives
from prefalign.errors import UserError
from prefalign.objectives import registry

PAIRWISE = ["dpo", "robust", "ipo", "hinge", "discopop", "padll", "cell", "pfl", "genarm"]


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), the reference for -log sigmoid(z) = softplus(-z)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture
def pairs() -> tuple[torch.Tensor, ...]:
    # rho = (pc - rc) - (pr - rr) = [1, -2, 0]; the policy prefers chosen (pc > pr) only in pair 0.
    pc = torch.tensor([-1.0, -3.0, -2.0])
    pr = torch.tensor([-2.0, -1.0, -2.0])
    rc = torch.tensor([-1.0, -1.0, -1.0])
    rr = torch.tensor([-1.0, -1.0, -1.0])
    return pc, pr, rc, rr


RHO = [1.0, -2.0, 0.0]


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def assert_values(loss: torch.Tensor, expected: list[float]) -> None:
    assert loss.shape == (len(expected),)
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-5, atol=1e-6)


# --- hand-computed values -------------------------------------------------------------------


def test_dpo_values(pairs):
    assert_values(objectives.compute_loss("dpo", *pairs, beta=1.0), [softplus(-r) for r in RHO])


def test_cdpo_label_smoothing_values(pairs):
    eps, beta = 0.2, 0.5
    expected = [(1 - eps) * softplus(-beta * r) + eps * softplus(beta * r) for r in RHO]
    assert_values(objectives.compute_loss("dpo", *pairs, beta=beta, label_smoothing=eps), expected)


def test_robust_values(pairs):
    eps = 0.2
    expected = [((1 - eps) * softplus(-r) - eps * softplus(r)) / (1 - 2 * eps) for r in RHO]
    assert_values(
        objectives.compute_loss("robust", *pairs, beta=1.0, label_smoothing=eps), expected
    )


def test_robust_rejects_label_smoothing_of_one_half(pairs):
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        objectives.compute_loss("robust", *pairs, label_smoothing=0.5)


def test_ipo_values(pairs):
    # 1 / (2 * 0.25) = 2: (rho - 2)^2
    assert_values(objectives.compute_loss("ipo", *pairs, beta=0.25), [1.0, 16.0, 4.0])


def test_hinge_values(pairs):
    assert_values(objectives.compute_loss("hinge", *pairs, beta=0.5), [0.5, 2.0, 1.0])


def test_discopop_values(pairs):
    beta, tau = 0.5, 0.25
    expected = []
    for r in RHO:
        z = beta * r
        m = sigmoid(z / tau)
        expected.append((1 - m) * softplus(-z) + m * math.exp(-z))
    assert_values(objectives.compute_loss("discopop", *pairs, beta=beta, tau=tau), expected)


def test_discopop_stays_finite_where_exp_overflows():
    # z = -100: exp(-z) overflows float32 and sigmoid(z / tau) underflows to 0; the loss is ~|z|.
    pc = torch.tensor([-1000.0], requires_grad=True)
    zero = torch.zeros(1)
    loss = objectives.compute_loss("discopop", pc, zero, zero, zero, beta=0.1)
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.tensor([100.0]))
    assert torch.isfinite(pc.grad).all()


def test_padll_values(pairs):
    # weight 0.9, halved where rho < 0
    expected = [0.9 * softplus(-1.0), 0.45 * softplus(2.0), 0.9 * math.log(2)]
    assert_values(objectives.compute_loss("padll", *pairs, beta=1.0), expected)


def test_cell_values(pairs):
    expected = [0.5 * math.exp(-r) + 0.5 * softplus(-r) for r in RHO]
    assert_values(objectives.compute_loss("cell", *pairs, beta=1.0), expected)


def test_pfl_values(pairs):
    # pair 0: policy already right (pc > pr) -> logistic / 2; pairs 1, 2: 2 * relu(1 - z)
    expected = [softplus(-1.0) / 2, 2 * 3.0, 2 * 1.0]
    assert_values(objectives.compute_loss("pfl", *pairs, beta=1.0), expected)


def test_genarm_values_ignore_reference(pairs):
    pc, pr, _, _ = pairs  # pc - pr = [1, -2, 0]
    expected = [softplus(-2.0), softplus(4.0), math.log(2)]
    assert_values(objectives.compute_loss("genarm", pc, pr, None, None, beta_r=2.0), expected)
    objective = objectives.get("genarm")
    assert not objective.needs_reference
    assert objective.params() == {"beta_r": 1.0} and objective.reward_scale == "beta_r"


def test_kto_values():
    policy = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    reference = torch.full((4,), -2.0)  # log-ratios [1, 0, -1, -2]
    labels = torch.tensor([True, True, False, False])
    kl_policy = torch.tensor([-1.0, -1.0])
    kl_reference = torch.tensor([-1.5, -1.5])  # z0 = 0.5
    z0 = objectives.kto_kl_reference_point(kl_policy, kl_reference)
    loss = objectives.compute_loss(
        "kto", policy, reference, labels, z0, beta=1.0, desirable_weight=2.0
    )
    expected = [2 * (1 - sigmoid(0.5)), 2 * (1 - sigmoid(-0.5)), 1 - sigmoid(1.5), 1 - sigmoid(2.5)]
    assert_values(loss, expected)


def test_kto_reference_point_is_clamped_and_detached():
    policy = torch.tensor([0.0, 0.0], requires_grad=True)
    labels = torch.tensor([True, False])
    kl_policy = torch.tensor([-3.0, -1.0], requires_grad=True)
    kl_reference = torch.tensor([-1.0, -1.0])  # mean difference -1 -> clamped to 0
    assert objectives.kto_kl_reference_point(kl_policy, kl_reference).item() == -1.0
    z0 = objectives.kto_kl_reference_point(kl_policy, kl_reference)
    loss = objectives.kto_loss(policy, torch.zeros(2), labels, z0, beta=1.0)
    assert_values(loss.detach(), [0.5, 0.5])
    loss.sum().backward()
    assert kl_policy.grad is None  # z0 carries no gradient
    assert policy.grad is not None


def test_kto_accepts_an_all_reduced_reference_point():
    # A multi-process trainer all-reduces the batch estimate and passes it as its own argument.
    policy, reference = torch.tensor([0.0]), torch.tensor([0.0])
    labels = torch.tensor([True])
    kl_local = objectives.kto_kl_reference_point(torch.tensor([1.0, 2.0]), torch.zeros(2))
    loss = objectives.kto_loss(policy, reference, labels, reference_point=kl_local, beta=1.0)
    assert_values(loss, [1 - sigmoid(-1.5)])
    assert objectives.get("kto").param_names == ("beta", "desirable_weight", "undesirable_weight")


# --- properties -----------------------------------------------------------------------------


def test_dpo_decreases_as_chosen_log_ratio_increases():
    pc = torch.linspace(-20.0, 0.0, 50)
    zero = torch.zeros(50)
    loss = objectives.compute_loss("dpo", pc, zero - 10, zero - 10, zero - 10)
    assert (loss[1:] < loss[:-1]).all()


def test_ipo_minimum_at_half_inverse_beta():
    beta = 0.2
    target = 1 / (2 * beta)
    rho = torch.tensor([target - 0.5, target, target + 0.5], requires_grad=True)
    zero = torch.zeros(3)
    loss = objectives.compute_loss("ipo", rho, zero, zero, zero, beta=beta)
    assert loss[1].item() == pytest.approx(0.0, abs=1e-6)
    assert loss[0] > loss[1] and loss[2] > loss[1]
    loss.sum().backward()
    assert rho.grad[1].item() == pytest.approx(0.0, abs=1e-6)
    assert objectives.get("ipo").length_normalized
    assert not objectives.get("dpo").length_normalized


@pytest.mark.parametrize("name", PAIRWISE)
def test_gradients_finite_and_inputs_untouched(name):
    g = torch.Generator().manual_seed(0)
    inputs = [(-30 * torch.rand(8, generator=g)).requires_grad_() for _ in range(4)]
    before = [t.detach().clone() for t in inputs]
    loss = objectives.compute_loss(name, *inputs)
    assert loss.shape == (8,)
    loss.mean().backward()
    used = inputs[:2] if name == "genarm" else inputs
    for t in used:
        assert t.grad is not None and torch.isfinite(t.grad).all()
    for t, b in zip(inputs, before, strict=True):
        assert torch.equal(t.detach(), b)


def test_kto_gradients_finite():
    g = torch.Generator().manual_seed(0)
    policy = (-30 * torch.rand(6, generator=g)).requires_grad_()
    loss = objectives.compute_loss(
        "kto",
        policy,
        -30 * torch.rand(6, generator=g),
        torch.tensor([True, False, True, False, True, True]),
        objectives.kto_kl_reference_point(
            -30 * torch.rand(6, generator=g), -30 * torch.rand(6, generator=g)
        ),
    )
    loss.mean().backward()
    assert torch.isfinite(policy.grad).all()


@pytest.mark.parametrize("name", PAIRWISE)
def test_batch_of_one_in_bfloat16(name):
    values = [torch.tensor([v]) for v in (-4.0, -6.5, -5.0, -5.5)]
    ref = objectives.compute_loss(name, *values)
    low = objectives.compute_loss(name, *[v.bfloat16() for v in values])
    assert low.dtype == torch.bfloat16 and low.shape == (1,)
    torch.testing.assert_close(low.float(), ref, rtol=2e-2, atol=2e-2)


def test_kto_batch_of_one_in_bfloat16():
    args = [torch.tensor([-4.0]), torch.tensor([-5.0]), torch.tensor([False])]
    z0 = torch.tensor(0.5)
    ref = objectives.kto_loss(*args, z0)
    low = objectives.kto_loss(args[0].bfloat16(), args[1].bfloat16(), args[2], z0.bfloat16())
    assert low.dtype == torch.bfloat16 and low.shape == (1,)
    torch.testing.assert_close(low.float(), ref, rtol=2e-2, atol=2e-2)


# --- registry -------------------------------------------------------------------------------


def test_builtin_names_and_kinds():
    assert set(PAIRWISE) | {"kto"} <= set(objectives.names())
    assert objectives.names() == sorted(objectives.names())
    assert objectives.get("kto").kind == "unpaired"
    assert all(objectives.get(n).kind == "pairwise" for n in PAIRWISE)
    # Defaults live in the functions' signatures only: the registry repeats none of them.
    assert all(objectives.get(n).defaults == {} for n in objectives.names())
    assert objectives.get("discopop").params() == {"beta": 0.05, "tau": 0.05}
    assert objectives.get("dpo").params() == {"beta": 0.1, "label_smoothing": 0.0}


def test_resolve_decides_every_parameter_once(tmp_path):
    run = objectives.resolve("dpo", params={"beta": 0.3})
    assert dict(run.params) == {"beta": 0.3, "label_smoothing": 0.0} and run.reward_scale == 0.3
    assert objectives.resolve("genarm").reward_scale == 1.0
    path = tmp_path / "sharp.py"
    path.write_text("def sharp(pc, pr, rc, rr, beta=0.5):\n    return beta * (pr - pc)\n")
    assert objectives.resolve(code=f"{path}:sharp").reward_scale == 0.5
    path.write_text("def plain(pc, pr, rc, rr, margin=1.0):\n    return (pr - pc + margin).abs()\n")
    assert objectives.resolve(code=f"{path}:plain").reward_scale == 1.0  # no scale: unscaled
    with pytest.raises(UserError, match="config key 'objective.params.gamma'"):
        objectives.resolve("dpo", params={"gamma": 1.0})
    with pytest.raises(ValueError, match="config key 'objective.name'.*nope"):
        objectives.resolve("nope")


def test_get_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown objective 'nope'") as info:
        objectives.get("nope")
    assert "dpo" in str(info.value) and "kto" in str(info.value)


def test_compute_loss_rejects_unknown_param(pairs):
    with pytest.raises(ValueError) as info:
        objectives.compute_loss("dpo", *pairs, gamma=1.0)
    message = str(info.value)
    assert "'dpo'" in message and "gamma" in message
    assert "beta" in message and "label_smoothing" in message


def test_compute_loss_checks_input_count(pairs):
    with pytest.raises(ValueError, match="takes 4 input tensors"):
        objectives.compute_loss("kto", *pairs[:3])
    with pytest.raises(ValueError, match="takes 4 input tensors"):
        objectives.compute_loss("dpo", *pairs, pairs[0])


def test_compute_loss_uses_registry_defaults(pairs):
    # beta=0.1
    assert_values(objectives.compute_loss("dpo", *pairs), [softplus(-0.1 * r) for r in RHO])


def square_loss(pc, pr, rc, rr, beta=1.0):
    return (beta * ((pc - pr) - (rc - rr))) ** 2


def test_register_round_trip_and_duplicates(isolated_registry, pairs):
    objective = objectives.register("square", square_loss, defaults={"beta": 2.0})
    assert objectives.get("square") is objective
    assert "square" in objectives.names()
    # registry defaults override the signature's, explicit params override both
    assert_values(objectives.compute_loss("square", *pairs), [4 * r * r for r in RHO])
    assert_values(objectives.compute_loss(objective, *pairs, beta=3.0), [9 * r * r for r in RHO])
    with pytest.raises(ValueError, match="already registered"):
        objectives.register("square", square_loss)
    replaced = objectives.register("square", square_loss, overwrite=True)
    assert objectives.get("square") is replaced and replaced.defaults == {}


def test_register_validates_signature_and_defaults(isolated_registry):
    with pytest.raises(ValueError, match="gamma"):
        objectives.register("bad_defaults", square_loss, defaults={"gamma": 1.0})
    with pytest.raises(ValueError, match="4 positional"):
        objectives.register("too_few", lambda pc, pr: pc - pr)
    with pytest.raises(ValueError, match="kind"):
        objectives.register("bad_kind", square_loss, kind="listwise")
    with pytest.raises(ValueError, match="4 positional"):
        objectives.register("kto_like", lambda p, r, labels: p - r, kind="unpaired")
    with pytest.raises(ValueError, match="not callable"):
        objectives.register("not_fn", 3)


def test_register_accepts_kwargs_functions(isolated_registry, pairs):
    def anything(pc, pr, rc, rr, **params):
        return params["scale"] * (pc - pr)

    objectives.register("anything", anything)
    assert objectives.get("anything").param_names is None
    assert_values(objectives.compute_loss("anything", *pairs, scale=2.0), [2.0, -4.0, 0.0])


# --- user objectives ------------------------------------------------------------------------

# The dataclass under postponed annotations needs the module in sys.modules, as a normal import.
USER_FILE = """
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

NOT_A_FUNCTION = 3


@dataclass
class Margin:
    value: float = 1.0


def margin_loss(pc, pr, rc, rr, beta=0.5, margin=1.0):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)) - Margin(margin).value)
"""


def test_load_user_objective(tmp_path, pairs):
    path = tmp_path / "my_losses.py"
    path.write_text(USER_FILE)
    objective = objectives.load_user_objective(f"{path}:margin_loss")
    assert objective.name == f"{path}:margin_loss"
    assert objective.kind == "pairwise" and objective.needs_reference
    assert objective.param_names == ("beta", "margin")
    loss = objectives.compute_loss(objective, *pairs, beta=1.0, margin=0.5)
    assert_values(loss, [softplus(-(r - 0.5)) for r in RHO])
    with pytest.raises(ValueError, match="margin_loss' got unknown parameter.*tau"):
        objectives.compute_loss(objective, *pairs, tau=1.0)


def test_load_user_objective_errors(tmp_path):
    path = tmp_path / "my_losses.py"
    path.write_text(USER_FILE)
    with pytest.raises(ValueError, match="not found: .*missing.py"):
        objectives.load_user_objective(f"{tmp_path / 'missing.py'}:margin_loss")
    with pytest.raises(ValueError, match="my_losses.py has no function 'nope'"):
        objectives.load_user_objective(f"{path}:nope")
    with pytest.raises(ValueError, match="my_losses.py:NOT_A_FUNCTION is not callable"):
        objectives.load_user_objective(f"{path}:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match="path/to/file.py:function"):
        objectives.load_user_objective(str(path))
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(ValueError, match="broken.py failed to import: SyntaxError"):
        objectives.load_user_objective(f"{broken}:f")


def test_accepts_names_the_hyperparameters_an_objective_takes():
    assert objectives.get("dpo").accepts("beta") and not objectives.get("dpo").accepts("beta_r")
    assert objectives.get("genarm").accepts("beta_r") and not objectives.get("genarm").accepts(
        "beta"
    )
