"""The base of every error meant for the person running the tool (feature_store's included).

A `FalconError` is an expected failure: its message names what is wrong and what to do, and the jobs print it
as one line instead of a traceback. Each subclass also keeps the builtin base it had (ValueError, RuntimeError),
so callers catching those keep working.
"""


class FalconError(Exception):
    """An expected failure whose message says what is wrong and what to do."""


class TargetLoadError(FalconError, ValueError):
    """The target could not be loaded; the message says why and what to do."""
