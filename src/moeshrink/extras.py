"""The optional extras (pyproject.toml): what each command needs beyond the core, and the one-line
error that names the extra to install."""

from __future__ import annotations

import importlib.util

from moeshrink.errors import MoeShrinkError

# Module -> (extra, distribution it comes from).
EXTRA_MODULES = {
    "lm_eval": ("eval", "lm-eval"),
    "matplotlib": ("eval", "matplotlib"),
    "llmcompressor": ("quantize", "llmcompressor"),
}


def has_module(module: str) -> bool:
    """Whether ``module`` can be imported (found, not imported: lm-eval takes seconds to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module blocked in sys.modules
        return False


def require_extra(module: str, purpose: str) -> None:
    """A one-line error naming the extra to install when ``module`` (an extra's) is not installed."""
    extra, distribution = EXTRA_MODULES[module]
    if not has_module(module):
        raise MoeShrinkError(
            f"{purpose} needs {distribution}, which is not installed: pip install 'moeshrink[{extra}]'"
        )
