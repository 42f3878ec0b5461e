"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Raised on purpose where the message alone tells the user what to fix.

    Say where (file, line, field, or the config key) and what is allowed. Anything else that
    escapes a command is a bug and keeps its traceback.
    """


class RunDirError(UserError, ValueError):
    """A run directory that does not fit the command: an out_dir holding another run (without
    --resume), or a resumed run whose files contradict its saved state."""
