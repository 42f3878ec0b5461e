"""Static (AST) check of candidate objective code: a whitelist, not a blacklist.

The code must be one function definition built from arithmetic, comparisons, local names and
calls to a fixed list of torch / torch.nn.functional / math functions. Everything else is
refused with a reason the proposer can act on. This runs in the parent before any code runs;
the child process of `sandbox.py` is the second line of defence.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

MAX_CODE_CHARS = 20_000
MAX_NODES = 3_000
# Syntax-tree levels: a DPO-like body needs about 12; compiling, unparsing and the checks
# themselves recurse once per level (a 400-term sum is 400 levels deep).
MAX_DEPTH = 100
N_TENSOR_ARGS = 4

# Elementwise and reduction math; no I/O, no serialization, no in-place (trailing "_") ops.
TORCH_FUNCTIONS = frozenset(
    """abs absolute acos asin atan atan2 clamp clamp_min clamp_max clip cos cosh erf erfc exp exp2
    expm1 log log10 log1p log2 logaddexp logit sigmoid tanh relu sqrt rsqrt square pow sign sin
    sinh where minimum maximum min max mean sum std var median zeros_like ones_like full_like zeros
    ones full tensor as_tensor stack cat lerp reciprocal neg negative softmax log_softmax logsumexp
    isfinite isnan nan_to_num heaviside floor ceil round trunc frac fmod remainder hypot
    float32 float64 bool Tensor pi e inf nan""".split()
)
FUNCTIONAL = frozenset(
    """logsigmoid softplus relu sigmoid tanh gelu silu elu selu celu leaky_relu softsign hardtanh
    relu6 mish tanhshrink softshrink hardshrink softmax log_softmax""".split()
)
SPECIAL = frozenset("expit logit log_ndtr ndtr erf erfc log1p expm1 xlogy".split())
MATH = frozenset(
    """pi e tau inf log log1p log2 log10 exp expm1 sqrt tanh sin cos atan erf erfc floor ceil
    fabs pow isfinite""".split()
)
ALLOWED_PATHS = frozenset(
    {f"torch.{n}" for n in TORCH_FUNCTIONS}
    | {f"torch.nn.functional.{n}" for n in FUNCTIONAL}
    | {f"F.{n}" for n in FUNCTIONAL}
    | {f"torch.special.{n}" for n in SPECIAL}
    | {f"math.{n}" for n in MATH}
)
# Prefixes of allowed paths: legal only as the inner part of a longer allowed path.
_PATH_PREFIXES = frozenset(
    ".".join(p.split(".")[:i]) for p in ALLOWED_PATHS for i in range(1, p.count(".") + 1)
)
MODULE_NAMES = frozenset({"torch", "F", "math"})
# Methods and attributes of tensors (and of Python numbers) that compute values, nothing else.
TENSOR_ATTRIBUTES = frozenset(
    """abs clamp clamp_min clamp_max clip exp exp2 expm1 log log1p log2 log10 sigmoid tanh relu
    sqrt rsqrt pow square mean sum neg sign float double detach maximum minimum logaddexp lerp
    reciprocal sin cos atan erf erfc logit max min std var median lt gt le ge eq ne
    masked_fill any all unsqueeze squeeze reshape view shape size dtype ndim numel dim item
    softmax log_softmax logsumexp isfinite isnan nan_to_num floor ceil round trunc frac""".split()
)
SAFE_BUILTINS = frozenset("abs min max float int bool range len sum round pow".split())
# Names the candidate's globals hold besides SAFE_BUILTINS (see sandbox_worker.restricted_globals).
GLOBAL_NAMES = MODULE_NAMES | SAFE_BUILTINS | {"Tensor"}

_ALLOWED_NODES = (
    ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Return, ast.Assign, ast.AugAssign,
    ast.AnnAssign, ast.Expr, ast.If, ast.For, ast.Break, ast.Continue, ast.Pass,
    ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Call, ast.keyword,
    ast.Name, ast.Attribute, ast.Subscript, ast.Slice, ast.Tuple, ast.List, ast.Constant,
    ast.Load, ast.Store,
    ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
)  # fmt: skip
_NODE_REASONS = {
    ast.Import: "imports are not allowed (torch, F and math are already available)",
    ast.ImportFrom: "imports are not allowed (torch, F and math are already available)",
    ast.While: "while loops are not allowed (use tensor operations)",
    ast.Lambda: "lambdas are not allowed",
    ast.ClassDef: "classes are not allowed",
    ast.Global: "global/nonlocal statements are not allowed",
    ast.Nonlocal: "global/nonlocal statements are not allowed",
    ast.With: "with statements are not allowed",
    ast.Try: "try statements are not allowed",
    ast.Raise: "raise statements are not allowed",
    ast.Delete: "del statements are not allowed",
    ast.AsyncFunctionDef: "async functions are not allowed",
    ast.Yield: "generators are not allowed",
    ast.YieldFrom: "generators are not allowed",
    ast.NamedExpr: "assignment expressions (:=) are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
    ast.Starred: "*args unpacking is not allowed",
    ast.Dict: "dict literals are not allowed",
    ast.Set: "set literals are not allowed",
}


@dataclass(frozen=True)
class StaticResult:
    """Outcome of the static check; `function` is the name of the one function defined."""

    ok: bool
    reason: str | None = None
    function: str | None = None


class _Rejected(Exception):
    pass


def check_static(code: str) -> StaticResult:
    """Parse `code` and check it against the whitelist; never executes anything."""
    if not isinstance(code, str) or not code.strip():
        return StaticResult(False, "empty code: define one function")
    if len(code) > MAX_CODE_CHARS:
        return StaticResult(False, f"code too long ({len(code)} > {MAX_CODE_CHARS} characters)")
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return StaticResult(False, f"syntax error: {e.msg} (line {e.lineno})")
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        return StaticResult(False, f"code cannot be parsed: {type(e).__name__}")
    depth = tree_depth(tree)
    if depth > MAX_DEPTH:
        return StaticResult(
            False, f"code is nested too deeply ({depth} > {MAX_DEPTH} syntax levels; a long sum "
            "or chain counts one level per term: use intermediate variables)"
        )  # fmt: skip
    try:
        function = _check_module(tree)
    except _Rejected as e:
        return StaticResult(False, str(e))
    except RecursionError:
        return StaticResult(False, "code is nested too deeply")
    return StaticResult(True, None, function)


def tree_depth(tree: ast.AST) -> int:
    """Depth of a syntax tree, computed without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _check_module(tree: ast.Module) -> str:
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise _Rejected(f"code too large (more than {MAX_NODES} syntax nodes)")
    body = [s for s in tree.body if not _is_docstring(s)]
    functions = [s for s in body if isinstance(s, ast.FunctionDef)]
    others = [s for s in body if not isinstance(s, ast.FunctionDef)]
    for node in ast.walk(tree):  # the clearest reasons first: imports anywhere, dunders anywhere
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            raise _Rejected(_NODE_REASONS[ast.Import])
    if others:
        raise _Rejected(
            f"only one function definition is allowed at module level, found a "
            f"{type(others[0]).__name__} statement (line {others[0].lineno})"
        )
    if len(functions) != 1:
        raise _Rejected(
            "code defines no function" if not functions
            else f"code must define exactly one function, found {len(functions)}"
        )  # fmt: skip
    fn = functions[0]
    params = _check_signature(fn)
    _Checker(params).check_function(fn)
    return fn.name


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _check_signature(fn: ast.FunctionDef) -> set[str]:
    a = fn.args
    if fn.decorator_list:
        raise _Rejected("decorators are not allowed")
    if a.vararg or a.kwarg:
        raise _Rejected("*args/**kwargs are not allowed in the objective's signature")
    positional = a.posonlyargs + a.args
    if len(positional) < N_TENSOR_ARGS:
        raise _Rejected(
            f"the objective must take four tensor arguments (policy_chosen_logps, "
            f"policy_rejected_logps, reference_chosen_logps, reference_rejected_logps), "
            f"'{fn.name}' takes {len(positional)}"
        )
    if len(positional) - len(a.defaults) > N_TENSOR_ARGS:
        raise _Rejected(
            "the objective must take four tensor arguments; every further parameter "
            "(a hyper-parameter such as beta) needs a default value"
        )
    if any(d is None for d in a.kw_defaults):
        raise _Rejected("keyword-only hyper-parameters need default values")
    # Defaults and annotations run when the function is defined (also in the trainer's
    # process): keep them to constants and dotted names, so defining it never computes.
    for default in a.defaults + a.kw_defaults:
        if not _is_constant(default):
            raise _Rejected("hyper-parameter defaults must be plain constants such as 0.1")
    for p in positional + a.kwonlyargs:
        _check_annotation(p.annotation)
    _check_annotation(fn.returns)
    return {p.arg for p in positional + a.kwonlyargs}


def _is_constant(node: ast.expr | None) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return isinstance(node, ast.Constant) and not isinstance(node.value, bytes)


def _check_annotation(node: ast.expr | None) -> None:
    if node is None or (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        return
    if _dotted(node) is None:
        raise _Rejected("type annotations must be names such as torch.Tensor or float")


class _Checker:
    """Walks the function; names must be parameters, locals, or whitelisted globals."""

    def __init__(self, params: set[str]) -> None:
        self.params = params
        self.locals = set(params)

    def check_function(self, fn: ast.FunctionDef) -> None:
        self._check_name(fn.name)
        nodes = list(ast.walk(fn))
        for node in nodes:  # collect local names first: order of use does not matter
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                self.locals.add(node.id)
        # Attribute nodes that are the inner part of a longer chain (torch.nn in torch.nn.f).
        self.inner = {id(n.value) for n in nodes if isinstance(n, ast.Attribute)}
        # The most telling reason first: a forbidden construct, then an unknown name
        # (`open(...).write` is best explained by `open`, not by `.write`), then the rest.
        for node in nodes[1:]:
            if type(node) in _NODE_REASONS or isinstance(node, ast.FunctionDef):
                self._check_node(node)
        for node in nodes[1:]:
            if isinstance(node, ast.Name):
                self._check_node(node)
        for node in nodes[1:]:
            self._check_node(node)

    def _check_node(self, node: ast.AST) -> None:
        if type(node) in _NODE_REASONS:
            raise _Rejected(_NODE_REASONS[type(node)])
        if isinstance(node, ast.FunctionDef):
            raise _Rejected("nested functions are not allowed")
        if not isinstance(node, _ALLOWED_NODES):
            raise _Rejected(f"{type(node).__name__} is not allowed in objective code")
        if isinstance(node, ast.arg):
            self._check_name(node.arg)
        elif isinstance(node, ast.Name):
            self._check_name(node.id)
            if isinstance(node.ctx, ast.Load) and node.id not in self.locals:
                if node.id not in GLOBAL_NAMES:
                    raise _Rejected(f"name '{node.id}' is not allowed")
        elif isinstance(node, ast.Attribute):
            self._check_attribute(node)
        elif isinstance(node, ast.keyword) and node.arg == "out":
            raise _Rejected(
                "out= is not allowed (it writes into an existing tensor); use the returned value"
            )
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bytes):
                raise _Rejected("bytes literals are not allowed")
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                self._check_target(target)
            target = node.target if isinstance(node, ast.AugAssign) else None
            if isinstance(target, ast.Name) and target.id in self.params:
                raise _Rejected(
                    f"augmented assignment to argument '{target.id}' would modify the caller's "
                    "tensor in place; assign to a new name instead"
                )
        elif isinstance(node, ast.For):
            self._check_target(node.target)
            it = node.iter
            if not (
                isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "range"
            ):
                raise _Rejected("for loops may only iterate over range(...)")
            if node.orelse:
                raise _Rejected("for/else is not allowed")

    def _check_target(self, target: ast.expr) -> None:
        names = target.elts if isinstance(target, ast.Tuple) else [target]
        for t in names:
            if not isinstance(t, ast.Name):
                raise _Rejected(
                    "only plain names can be assigned (no item or attribute assignment: "
                    "it would modify tensors in place)"
                )

    def _check_attribute(self, node: ast.Attribute) -> None:
        if node.attr.startswith("_"):
            raise _Rejected(f"dunder/private attribute '{node.attr}' is not allowed")
        if node.attr.endswith("_"):
            raise _Rejected(
                f"in-place method '.{node.attr}' is not allowed (it modifies a tensor); use "
                f"'.{node.attr.rstrip('_')}' and a new name"
            )
        path = _dotted(node)
        if path is not None and path.split(".")[0] in MODULE_NAMES:
            inner_ok = path in _PATH_PREFIXES and id(node) in self.inner
            if path not in ALLOWED_PATHS and not inner_ok:
                raise _Rejected(f"attribute '{path}' is not allowed")
            return
        if node.attr not in TENSOR_ATTRIBUTES:
            raise _Rejected(f"attribute '.{node.attr}' is not allowed on a value")

    def _check_name(self, name: str) -> None:
        if name.startswith("__") or name.endswith("__"):
            raise _Rejected(f"dunder name '{name}' is not allowed")


def _dotted(node: ast.expr) -> str | None:
    """'a.b.c' for a chain of attributes rooted at a name; None for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))
