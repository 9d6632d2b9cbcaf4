"""Errors that lorascope raises for bad input. The CLI turns them into a message and exit code 2."""


class LorascopeError(Exception):
    """Base class: a problem with the user's input, explained in the message."""


class InputError(LorascopeError):
    """A file, folder or hub id that cannot be read or has an unknown format."""


class MismatchError(LorascopeError):
    """Base and tuned weights (or an adapter and its base) do not fit together."""


class NonFiniteError(LorascopeError):
    """A tensor holds NaN or Inf."""
