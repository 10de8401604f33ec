"""The one exception type for mistakes a user can make (bad path, bad value, bad shard).

The CLI prints its message as one paragraph and exits with status 2, without a traceback;
every other exception is a bug and keeps its traceback. :func:`config_error` and
:func:`require` give config checks one wording: ``config KEY=VALUE: FIX``.
"""

from __future__ import annotations

import typing


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""


def config_error(key: str, value, fix: str) -> typing.NoReturn:
    raise UserError(f"config {key}={value!r}: {fix}")


def require(cond: bool, key: str, value, fix: str) -> None:
    """``config_error(key, value, fix)`` unless ``cond``."""
    if not cond:
        config_error(key, value, fix)
