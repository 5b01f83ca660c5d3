"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

import errno
import os


class MoeShrinkError(Exception):
    """A problem with the user's input (model, data, budget, output), raised before heavy work.

    The CLI prints the message alone, without a traceback.
    """


# A full file system or an exhausted quota; libraries that wrap the OSError (safetensors) keep the
# system's message in theirs.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = tuple(os.strerror(code) for code in _NO_SPACE)


def is_out_of_space(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is the disk (or quota) running out."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return True
        if any(text in str(current) for text in _NO_SPACE_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False
