"""One exception tree for everything lora_lens refuses.

Every error is bad *input* (a file, a tensor, a config or an option): the CLI
prints its message on one line and exits 2. Anything else that escapes is a bug
and exits 1. Messages say what was found, what was expected and what to do.

Each class also subclasses the matching builtin, so ``except ValueError`` in
user code keeps working.
"""

from __future__ import annotations


class LoraLensError(Exception):
    """Base of every error lora_lens raises on purpose (bad input)."""


class CheckpointError(LoraLensError, ValueError):
    """A file or folder is missing, unreadable, truncated, corrupt or of the wrong kind."""


class UnsafeFileError(CheckpointError):
    """A pickle file that is not a plain weights-only state dict; it was refused, not run."""


class ConfigError(LoraLensError, ValueError):
    """A config file or an option holds a value lora_lens cannot use."""


class ShapeError(LoraLensError, ValueError):
    """Tensors whose shapes or dtypes do not fit together."""


class NonFiniteError(LoraLensError, ValueError):
    """A weight holds NaN or Inf."""


class KeyMatchError(LoraLensError, KeyError):
    """A name could not be matched: an unknown key scheme, or a module absent from the base."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class DiskFullError(OSError):
    """No space left while writing an output; not bad input (the CLI exits 1), but not a bug either.

    Raised after the partial output is removed; ``errno`` is ``ENOSPC`` or ``EDQUOT``.
    """
