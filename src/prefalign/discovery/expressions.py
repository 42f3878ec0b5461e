"""Objective expressions: small trees over the margin, rendered as objective code.

The building blocks are those of the known objectives (`prefalign.objectives`): log-sigmoid,
exp, relu, softplus, tanh and squares of the margin `z = beta * rho`, temperatures, constant
mixtures, sigmoid modulation (DiscoPOP), and a switch on the sign of the margin (PADLL).
"""

from __future__ import annotations

import ast
import random
from dataclasses import dataclass
from typing import Any

LEAVES = ("z", "rho", "zp", "const", "invbeta")
UNARY = (
    "neg",
    "logsigmoid",
    "sigmoid",
    "exp",
    "relu",
    "softplus",
    "tanh",
    "square",
    "scale",
    "temp",
)
BINARY = ("add", "sub", "mul")
MIXES = ("mix", "smix", "where")  # binary, with a parameter
ARITY = {op: n for ops, n in ((LEAVES, 0), (UNARY, 1), (BINARY, 2), (MIXES, 2)) for op in ops}
# Unary ops that can replace each other without changing what the parameter means.
SWAPPABLE = ("logsigmoid", "sigmoid", "exp", "relu", "softplus", "tanh", "square", "neg")
MAX_NODES = 30
MAX_DEPTH = 7


@dataclass(frozen=True)
class Expr:
    """A node: `op`, its children, and its parameter (constant, weight, temperature, ...)."""

    op: str
    args: tuple[Expr, ...] = ()
    value: float | None = None

    def to_json(self) -> list[Any]:
        return [self.op, self.value, [a.to_json() for a in self.args]]

    @staticmethod
    def from_json(data: list[Any]) -> Expr:
        op, value, args = data
        arity = ARITY.get(op)
        if arity is None or arity != len(args):
            raise ValueError(f"not an objective expression: {op!r} with {len(args)} argument(s)")
        return Expr(op, tuple(Expr.from_json(a) for a in args), value)

    def nodes(self) -> list[Expr]:
        out = [self]
        for a in self.args:
            out.extend(a.nodes())
        return out

    def depth(self) -> int:
        return 1 + max((a.depth() for a in self.args), default=0)

    def uses(self, op: str) -> bool:
        return any(n.op == op for n in self.nodes())


@dataclass(frozen=True)
class Genome:
    """An objective: its expression and its beta (the scale of the margin)."""

    expr: Expr
    beta: float

    def to_json(self) -> dict[str, Any]:
        return {"expr": self.expr.to_json(), "beta": self.beta}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Genome:
        return Genome(Expr.from_json(data["expr"]), float(data["beta"]))


# ---------------------------------------------------------------- constructors

Z, RHO, ZP = Expr("z"), Expr("rho"), Expr("zp")


def const(v: float) -> Expr:
    return Expr("const", (), v)


def unary(op: str, x: Expr, value: float | None = None) -> Expr:
    return Expr(op, (x,), value)


def binary(op: str, a: Expr, b: Expr, value: float | None = None) -> Expr:
    return Expr(op, (a, b), value)


def logistic(x: Expr = Z) -> Expr:
    """-log sigmoid(x)."""
    return unary("neg", unary("logsigmoid", x))


def primitives() -> list[Expr]:
    """Loss-shaped pieces, each decreasing in the margin."""
    return [
        logistic(),
        unary("relu", binary("sub", const(1.0), Z)),
        unary("exp", unary("neg", Z)),
        unary("softplus", unary("neg", Z)),
        unary("square", binary("sub", Z, const(1.0))),
        unary("neg", unary("tanh", Z)),
        unary("sigmoid", unary("neg", Z)),
        logistic(unary("temp", Z, 0.5)),
    ]


def registry_seeds() -> dict[str, Genome]:
    """The registry's pairwise objectives as genomes (same formulas and default betas)."""
    return {
        "dpo": Genome(logistic(), 0.1),
        "hinge": Genome(unary("relu", binary("sub", const(1.0), Z)), 0.1),
        # IPO: (rho - 1 / (2 beta))^2
        "ipo": Genome(
            unary("square", binary("sub", RHO, unary("scale", Expr("invbeta"), 0.5))), 0.1
        ),
        # DiscoPOP: sigmoid(z / tau) modulates between the logistic and the exponential loss
        "discopop": Genome(binary("smix", logistic(), unary("exp", unary("neg", Z)), 0.05), 0.05),
        "cell": Genome(binary("mix", unary("exp", unary("neg", Z)), logistic(), 0.5), 0.05),
        # PADLL: weight 0.9 * 0.5 where rho < 0, else 0.9
        "padll": Genome(
            binary("where", unary("scale", logistic(), 0.45), unary("scale", logistic(), 0.9), 0.0),
            0.05,
        ),
    }


# ---------------------------------------------------------------- rendering

_TENSOR_ARGS = (
    "policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps"
)


def render(genome: Genome, name: str) -> str:
    """Objective code for `genome`, a function called `name` with the pairwise signature."""
    lines = [
        f"def {name}({_TENSOR_ARGS}, beta={_num(genome.beta)}):",
        "    rho = (policy_chosen_logps - reference_chosen_logps) - (",
        "        policy_rejected_logps - reference_rejected_logps",
        "    )",
        "    z = beta * rho",
    ]
    if genome.expr.uses("zp"):
        lines.append("    zp = beta * (policy_chosen_logps - policy_rejected_logps)")
    lines.append(f"    return {_expr(genome.expr)}")
    # A round trip through the AST drops the redundant parentheses of the rendering.
    return ast.unparse(ast.parse("\n".join(lines))) + "\n"


def _num(v: float | None) -> str:
    text = f"{float(v if v is not None else 0.0):.4g}"
    return f"({text})" if text.startswith("-") else text


def _expr(e: Expr) -> str:
    a = [_expr(x) for x in e.args]
    v = _num(e.value)
    match e.op:
        case "z" | "rho" | "zp":
            return e.op
        case "const":
            return v
        case "invbeta":
            return "(1 / beta)"
        case "neg":
            return f"(-{a[0]})"
        case "logsigmoid" | "softplus":
            return f"F.{e.op}({a[0]})"
        case "sigmoid" | "exp" | "relu" | "tanh":
            return f"torch.{e.op}({a[0]})"
        case "square":
            return f"({a[0]} ** 2)"
        case "scale":
            return f"({v} * {a[0]})"
        case "temp":
            return f"({a[0]} / {v})"
        case "add" | "sub" | "mul":
            sign = {"add": "+", "sub": "-", "mul": "*"}[e.op]
            return f"({a[0]} {sign} {a[1]})"
        case "mix":
            return f"({v} * {a[0]} + (1 - {v}) * {a[1]})"
        case "smix":
            m = f"torch.sigmoid(z / {v})"
            return f"((1 - {m}) * {a[0]} + {m} * {a[1]})"
        case "where":
            return f"torch.where(z < {v}, {a[0]}, {a[1]})"
    raise ValueError(f"unknown expression op {e.op!r}")


# ---------------------------------------------------------------- variation


def mutate(genome: Genome, rng: random.Random) -> tuple[Genome, str]:
    """One random edit; returns the child and the operator's name."""
    operator = rng.choice(
        ["constant", "constant", "beta", "swap", "replace", "wrap", "temperature"]
    )
    expr, beta = genome.expr, genome.beta
    paths = _paths(expr)
    candidates = {
        "constant": [p for p in paths if _get(expr, p).value is not None],
        "swap": [p for p in paths if _get(expr, p).op in SWAPPABLE],
        "temperature": [p for p in paths if _get(expr, p).op in ("z", "rho", "zp")],
    }
    if not candidates.get(operator, paths):
        operator = "beta"
    if operator == "beta":
        beta = _clip(beta * rng.lognormvariate(0, 0.5), 0.005, 1.0)
    elif operator == "constant":
        path = rng.choice(candidates["constant"])
        node = _get(expr, path)
        expr = _set(expr, path, Expr(node.op, node.args, _perturb(node, rng)))
    elif operator == "swap":
        path = rng.choice(candidates["swap"])
        node = _get(expr, path)
        new_op = rng.choice([op for op in SWAPPABLE if op != node.op])
        expr = _set(expr, path, Expr(new_op, node.args))
    elif operator == "replace":
        expr = _set(expr, rng.choice(paths), rng.choice(primitives()))
    elif operator == "wrap":
        path = rng.choice(paths)
        expr = _set(expr, path, _wrap(_get(expr, path), rng))
    else:  # a temperature on one occurrence of the margin
        path = rng.choice(candidates["temperature"])
        node = _get(expr, path)
        expr = _set(expr, path, unary("temp", node, round(rng.lognormvariate(0, 0.6), 3)))
    return Genome(expr, round(beta, 4)), operator


def crossover(a: Genome, b: Genome, rng: random.Random) -> Genome:
    """`a` with one of its subtrees replaced by a subtree of `b`; beta from either parent."""
    donor = _get(b.expr, rng.choice(_paths(b.expr)))
    return Genome(_set(a.expr, rng.choice(_paths(a.expr)), donor), rng.choice([a.beta, b.beta]))


def within_limits(genome: Genome) -> bool:
    return len(genome.expr.nodes()) <= MAX_NODES and genome.expr.depth() <= MAX_DEPTH


def _wrap(node: Expr, rng: random.Random) -> Expr:
    """Combine `node` with a primitive loss: a mixture, a modulation, a switch, a scale."""
    other = rng.choice(primitives())
    kind = rng.choice(["mix", "smix", "where", "scale", "add"])
    if kind == "mix":
        return binary("mix", node, other, round(rng.uniform(0.2, 0.8), 2))
    if kind == "smix":
        return binary("smix", node, other, round(rng.uniform(0.02, 1.0), 3))
    if kind == "where":
        return binary("where", node, other, round(rng.gauss(0, 0.5), 2))
    if kind == "scale":
        return unary("scale", node, round(rng.uniform(0.3, 2.0), 2))
    return binary("add", node, unary("scale", other, round(rng.uniform(0.05, 0.5), 2)))


def _perturb(node: Expr, rng: random.Random) -> float:
    v = float(node.value or 0.0)
    if node.op == "mix":
        return round(_clip(v + rng.gauss(0, 0.15), 0.05, 0.95), 3)
    if node.op in ("where", "const"):
        return round(v + rng.gauss(0, 0.5), 3)
    return round(_clip(v * rng.lognormvariate(0, 0.4), 1e-3, 100.0), 4)  # scales, temperatures


Path = tuple[int, ...]


def _paths(root: Expr, prefix: Path = ()) -> list[Path]:
    """Every node's position: the child indices leading to it from the root."""
    out = [prefix]
    for i, a in enumerate(root.args):
        out.extend(_paths(a, prefix + (i,)))
    return out


def _get(root: Expr, path: Path) -> Expr:
    for i in path:
        root = root.args[i]
    return root


def _set(root: Expr, path: Path, new: Expr) -> Expr:
    if not path:
        return new
    i, rest = path[0], path[1:]
    args = root.args[:i] + (_set(root.args[i], rest, new),) + root.args[i + 1 :]
    return Expr(root.op, args, root.value)


def _clip(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)
