"""Every import in the README's Python examples works (the public API it shows)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_imports() -> list[tuple[str, str | None]]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found: list[tuple[str, str | None]] = []
    for block in blocks:
        for line in block.splitlines():
            line = line.strip()
            if line.startswith(("from ", "import ")):
                node = ast.parse(line).body[0]
                if isinstance(node, ast.ImportFrom):
                    found += [(node.module, a.name) for a in node.names]
                else:
                    found += [(a.name, None) for a in node.names]
    return found


def test_the_readme_shows_imports():
    assert ("prefalign.tasks", "resolve_task") in readme_imports()


def test_every_readme_import_resolves():
    missing = []
    for module, name in readme_imports():
        try:
            imported = importlib.import_module(module)
        except ImportError as err:
            missing.append(f"{module}: {err}")
            continue
        if name is not None and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"from {module} import {name}")
    assert not missing, missing
