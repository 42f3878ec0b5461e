"""The discovery sandbox: a catalog of hostile or broken candidates is rejected with reasons,
known-good objectives pass, nothing escapes the sandbox directory, no process is left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
import torch

from prefalign import objectives
from prefalign.discovery import (
    baseline_codes,
    check_candidates,
    check_static,
    compile_objective,
)

SIG = (
    "def objective(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, "
    "reference_rejected_logps, beta=0.1):\n"
)
RHO = (
    "rho = (policy_chosen_logps - reference_chosen_logps) - "
    "(policy_rejected_logps - reference_rejected_logps)"
)
DPO_RETURN = "return -F.logsigmoid(beta * rho)"


def body(*lines: str) -> str:
    return SIG + "".join(f"    {line}\n" for line in lines)


DPO = body(RHO, DPO_RETURN)

# (id, code, substring of the rejection reason)
CATALOG = [
    ("import_os", "import os\n" + DPO, "imports are not allowed"),
    ("import_inside", body("import subprocess", RHO, DPO_RETURN), "imports are not allowed"),
    ("from_import", "from os import system\n" + DPO, "imports are not allowed"),
    ("dunder_import", body("os = __import__('os')", RHO, DPO_RETURN), "dunder name '__import__'"),
    ("open_write", body("open('x', 'w').write('pwned')", RHO, DPO_RETURN),
     "name 'open' is not allowed"),
    ("subclasses", body("c = ().__class__.__bases__[0].__subclasses__()", RHO, DPO_RETURN),
     "dunder"),
    ("private_attr", body("c = torch._C", RHO, DPO_RETURN), "attribute '_C'"),
    ("torch_load", body("w = torch.load('weights.pt')", RHO, DPO_RETURN),
     "'torch.load' is not allowed"),
    ("torch_save", body("torch.save(policy_chosen_logps, 'x.pt')", RHO, DPO_RETURN),
     "'torch.save' is not allowed"),
    ("getattr", body("load = getattr(torch, 'lo' + 'ad')", RHO, DPO_RETURN),
     "name 'getattr' is not allowed"),
    ("eval", body(RHO, "return eval('-F.logsigmoid(beta * rho)')"), "name 'eval' is not allowed"),
    ("exec", body("exec('import os')", RHO, DPO_RETURN), "name 'exec' is not allowed"),
    ("compile", body("c = compile('1', 'f', 'eval')", RHO, DPO_RETURN),
     "name 'compile' is not allowed"),
    ("globals", body("g = globals()", RHO, DPO_RETURN), "name 'globals' is not allowed"),
    ("torch_os_chain", body("torch.os.system('touch pwned')", RHO, DPO_RETURN),
     "'torch.os.system' is not allowed"),
    ("F_torch_chain", body("w = F.torch.load('w.pt')", RHO, DPO_RETURN),
     "'F.torch.load' is not allowed"),
    ("socket", body("s = socket.socket()", RHO, DPO_RETURN), "name 'socket' is not allowed"),
    ("subprocess", body("subprocess.run(['rm', '-rf', '/'])", RHO, DPO_RETURN),
     "name 'subprocess' is not allowed"),
    ("tensor_tofile", body(RHO, "rho.numpy().tofile('x')", DPO_RETURN), "'.tofile' is not allowed"),
    ("format_escape", body(RHO, "s = '{0.__class__}'.format(rho)", DPO_RETURN),
     "'.format' is not allowed"),
    ("while_true", body("while True:", "    pass", RHO, DPO_RETURN), "while loops are not allowed"),
    ("lambda", body("f = lambda x: x", RHO, DPO_RETURN), "lambdas are not allowed"),
    ("inplace_argument", body("policy_chosen_logps += 1", RHO, DPO_RETURN),
     "augmented assignment to argument"),
    ("item_assignment", body(RHO, "rho[0] = 0.0", DPO_RETURN), "only plain names can be assigned"),
    ("computed_default",
     SIG.replace("beta=0.1", "beta=[0] * 10 ** 10") + "    return policy_chosen_logps\n",
     "defaults must be plain constants"),
    ("computed_annotation",
     SIG.replace("beta=0.1", "beta: torch.zeros(10 ** 10) = 0.1")
     + "    return policy_chosen_logps\n",
     "annotations must be names"),
    ("syntax_error", "def objective(:\n    return 1\n", "syntax error"),
    ("no_function", '"""An objective, surely."""\n', "defines no function"),
    ("module_statement", "x = 1\n" + DPO, "only one function definition is allowed"),
    ("two_functions", DPO + DPO.replace("def objective", "def other"),
     "exactly one function, found 2"),
    ("wrong_arg_count", "def objective(pc, pr):\n    return -F.logsigmoid(pc - pr)\n",
     "four tensor arguments"),
    # these pass the static check; the child process catches them
    ("memory_bomb",
     body("x = torch.ones(5 * 10 ** 8)", RHO, "return -F.logsigmoid(beta * rho) + 0 * x.sum()"),
     "memory limit exceeded"),
    ("nan", body(RHO, "return -F.logsigmoid(beta * rho) * float('nan')"),
     "non-finite loss (nan or inf) on random"),
    ("overflow", body(RHO, "return torch.exp(-beta * rho)"),
     "non-finite loss (nan or inf) on extreme"),
    ("wrong_shape", body(RHO, "return (-F.logsigmoid(beta * rho)).mean()"),
     "expected a per-pair loss of shape [16]"),
    ("not_a_tensor", body("return 1.0"), "returns float, expected a tensor"),
    ("constant", body("return policy_chosen_logps * 0 + 1.0"), "constant loss"),
    ("no_gradient", body(RHO, "return -F.logsigmoid(beta * rho.detach())"), "no gradient"),
    ("rewards_lowering_chosen", body(RHO, "return F.softplus(beta * rho)"),
     "rewards lowering the chosen log-ratio"),
    ("raises", body(RHO, "return torch.stack([rho, rho[:3]])"), "raised RuntimeError"),
    # last, so that no fresh child process is needed after the kill
    ("cpu_bomb", body("for i in range(10 ** 12):", "    pass", RHO, DPO_RETURN),
     "CPU time limit exceeded"),
]  # fmt: skip


# ---------------------------------------------------------------- known-good objectives

LLM_STYLE = '''
def smooth_margin(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                  reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
                  beta: float = 0.1, *, tau: float = 1.0) -> torch.Tensor:
    """DPO with a soft floor; written the way an LLM tends to write it."""
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    z = beta * (chosen - rejected)
    loss = torch.nn.functional.softplus(-z / tau) * tau
    for _ in range(2):
        loss = loss + 0.0 * z.clamp(min=-1.0).abs()
    if tau > 0.5:
        loss = loss * 1.0
    return torch.where(z > 0, loss, loss + 0.1 * z.square())
'''

GOOD = {"dpo_handwritten": DPO, "llm_style": LLM_STYLE, **baseline_codes()}


def _listing(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Check the whole catalog in one sandbox run, from a scratch working directory."""
    root = tmp_path_factory.mktemp("catalog")
    cwd, sandbox_dir = root / "cwd", root / "sandbox"
    cwd.mkdir()
    before = _listing(root, sandbox_dir)
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        codes = [*GOOD.values(), *(code for _, code, _ in CATALOG)]
        results = check_candidates(codes, timeout_s=20, memory_mb=512, cpu_s=2, workdir=sandbox_dir)
    finally:
        os.chdir(old_cwd)
    return {
        "good": dict(zip(GOOD, results[: len(GOOD)], strict=True)),
        "results": dict(zip([case for case, _, _ in CATALOG], results[len(GOOD) :], strict=True)),
        "new_files": _listing(root, sandbox_dir) - before,
        "sandbox_left": list(sandbox_dir.iterdir()),
        "children": psutil.Process().children(recursive=True),
    }


def test_catalog_is_large_enough() -> None:
    assert len(CATALOG) >= 20
    assert len({case for case, _, _ in CATALOG}) == len(CATALOG)


@pytest.mark.parametrize(("case", "reason"), [(case, reason) for case, _, reason in CATALOG])
def test_hostile_or_broken_candidate_is_rejected_with_reason(
    catalog: dict, case: str, reason: str
) -> None:
    result = catalog["results"][case]
    assert not result.ok
    assert reason in (result.reason or ""), result.reason
    assert result.flags  # a machine-readable tag of the finding


def test_nothing_escapes_and_no_process_is_left(catalog: dict) -> None:
    assert catalog["new_files"] == set()  # no file outside the sandbox directory
    assert catalog["sandbox_left"] == []  # and the sandbox directory itself was cleaned up
    assert catalog["children"] == []
    assert catalog["results"]["cpu_bomb"].flags == ["cpu_limit"]


def test_wall_clock_limit_kills_the_process_group_and_a_new_child_takes_over(
    tmp_path: Path,
) -> None:
    code = body("for i in range(10 ** 12):", "    pass", RHO, DPO_RETURN)
    start = time.monotonic()
    stuck, after = check_candidates([code, DPO], timeout_s=1, cpu_s=60, workdir=tmp_path)
    assert not stuck.ok and "wall-clock time limit exceeded (1 s)" in stuck.reason
    assert stuck.flags == ["timeout"]
    assert after.ok  # checked by a fresh child after the kill
    assert time.monotonic() - start < 60
    assert psutil.Process().children(recursive=True) == []
    assert list(tmp_path.iterdir()) == []


def test_known_good_objectives_pass(catalog: dict) -> None:
    """Checked in the same child process as the catalog, before it."""
    for name, result in catalog["good"].items():
        assert result.ok, (name, result.reason)
    assert {"discopop", "dpo", "ipo", "hinge", "cell", "padll"} <= set(catalog["good"])
    assert catalog["good"]["llm_style"].flags == []


def test_rendered_registry_objectives_match_the_registry() -> None:
    """The offline proposer's seeds and the baselines are the registry's formulas."""
    g = torch.Generator().manual_seed(0)
    rc, rr = -(10 + 90 * torch.rand(2, 64, generator=g))
    pc, pr = rc + 3 * torch.randn(64, generator=g), rr + 3 * torch.randn(64, generator=g)
    for name, code in baseline_codes().items():
        fn = compile_objective(code)
        expected = objectives.compute_loss(name, pc, pr, rc, rr)
        torch.testing.assert_close(fn(pc, pr, rc, rr), expected, rtol=1e-5, atol=1e-6)


def test_compile_objective_refuses_what_the_static_check_refuses() -> None:
    with pytest.raises(ValueError, match="imports are not allowed"):
        compile_objective("import os\n" + DPO)
    fn = compile_objective(DPO).__wrapped__  # the candidate's own function, inside its copier
    assert fn.__globals__["__builtins__"].keys() - {"__import__"} <= {
        "abs", "min", "max", "float", "int", "bool", "range", "len", "sum", "round", "pow"
    }  # fmt: skip


def test_static_check_names_the_function() -> None:
    assert check_static(LLM_STYLE).function == "smooth_margin"
    assert check_static("def f(a, b, c, d, beta):\n    return a\n").reason.startswith(
        "the objective must take four tensor arguments"
    )
    assert (
        "nested functions"
        in check_static(body("def g(x):", "    return x", RHO, DPO_RETURN)).reason
    )
