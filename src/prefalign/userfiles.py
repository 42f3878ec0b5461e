"""Import a user's Python file by path (objectives, reward functions) with one-line errors."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from prefalign.errors import UserError


class UserFileError(UserError, ValueError):
    """A user's Python file that is missing or fails to import; the message names it."""


def import_python_file(path_text: str, label: str, module_prefix: str) -> ModuleType:
    """Execute `path_text` as a module registered in sys.modules (as a normal import would be:
    dataclasses look their module up there). Errors read '{label} file ...'."""
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise UserFileError(f"{label} file not found: {path_text}")
    # A unique module name per file; loading again re-executes the file.
    module_name = f"{module_prefix}_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserFileError(f"{label} file {path_text} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise UserFileError(
            f"{label} file {path_text} failed to import: {type(err).__name__}: {err}"
        ) from err
    return module
