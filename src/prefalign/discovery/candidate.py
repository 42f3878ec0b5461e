"""What proposers produce: candidates (code to check) or errors (to record and feed back)."""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from prefalign.discovery.archive import Archive
from prefalign.discovery.static_check import MAX_CODE_CHARS, MAX_DEPTH, tree_depth


@dataclass(frozen=True)
class Candidate:
    """An objective proposal: Python source defining one pairwise loss function.

    `origin` says who proposed it ("llm", "offline", "baseline", ...); `meta` carries
    proposer-specific data kept in the archive (the offline proposer's expression genome).
    """

    name: str
    code: str
    thought: str = ""
    origin: str = "llm"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def code_hash(self) -> str:
        return code_hash(self.code)


@dataclass(frozen=True)
class ProposalError:
    """A proposal that produced no candidate (bad reply, exhausted retries); recorded as such."""

    message: str
    raw: str | None = None
    attempts: int = 1
    origin: str = "llm"


class Proposer(Protocol):
    """Anything that proposes `n` new objectives given the archive of earlier ones.

    A proposer whose `propose` also takes keyword arguments `generation` and `slots` (the
    archive indices it fills) is told them, so it can make each proposal a function of
    (seed, generation, slot) and a resumed run proposes what an uninterrupted one did."""

    def propose(self, archive: Archive, n: int) -> list[Candidate | ProposalError]: ...


def normalize_code(code: str) -> str:
    """Code with comments, docstrings and formatting removed, so cosmetic edits hash alike.

    Code beyond the static check's size or depth bounds (which it will fail) is hashed as it
    is: unparsing a deep tree recurses once per level."""
    if len(code) > MAX_CODE_CHARS:
        return code.strip()
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code.strip()
    if tree_depth(tree) > MAX_DEPTH:
        return code.strip()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and _is_docstring(body[0]):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    try:
        return ast.unparse(tree)
    except RecursionError:
        return code.strip()


def code_hash(code: str) -> str:
    """sha256 of the normalized code."""
    return hashlib.sha256(normalize_code(code).encode()).hexdigest()


def _is_docstring(stmt: ast.AST) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )
