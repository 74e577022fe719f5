"""The one exception family for a user's mistake: a file, folder or value given to us that we cannot use.

The `rtmdet` commands print such an error as one line and exit 2; anything else escaping a command is a bug
(a traceback and a request to report it). The message names the thing and, where it can, what to do.
"""
from __future__ import annotations

import functools


class UserError(Exception):
    """A mistake in what the user gave: the message alone is the answer (no traceback)."""


class DatasetError(UserError, ValueError):
    """A data folder or annotation file that cannot be used; the message names the file and the entry."""


class ImageError(UserError, ValueError):
    """An image file that is missing or does not decode."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded into the model; the message names the file and the problem."""


def dataset_errors(func):
    """`func` (a dataset reader) with its ValueErrors, which name the file and entry that are wrong, raised as
    DatasetError: a data problem for the user to fix, not a bug."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError:
            raise
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
    return wrapper
