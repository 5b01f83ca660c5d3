"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations


class MoeShrinkError(Exception):
    """A problem with the user's input (model, data, budget, output), raised before heavy work.

    The CLI prints the message alone, without a traceback.
    """
