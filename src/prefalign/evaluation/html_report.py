"""Moved to `prefalign.report`; this name re-exports it for one release."""

from prefalign.report import *  # noqa: F403
from prefalign.report import __all__  # noqa: F401
