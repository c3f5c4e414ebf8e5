"""What can go wrong that the user can fix, in one place.

Every error vitlab raises for a bad input is a `VitlabError`: the `vitlab` command prints its
message as one line and exits non-zero (2 for a bad flag or setting, 1 for anything else), and
`--debug` (or VITLAB_DEBUG=1) shows the traceback instead. Any other exception is a bug in vitlab
and keeps its traceback. Errors that torch raises for what the user asked of it (out of memory, a
dtype the device cannot compute) are translated here.
"""

from __future__ import annotations

import re


class VitlabError(Exception):
    """A problem with what vitlab was given; the message names the file, flag or setting and what to
    do."""

    exit_code = 1


class ConfigError(VitlabError, ValueError):
    """A flag, setting or combination of settings that cannot be used."""

    exit_code = 2


class CheckpointError(VitlabError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


class DataError(VitlabError, ValueError):
    """A dataset, folder or image that cannot be used; the message names it."""


class ExportError(VitlabError):
    """An export that cannot be done or did not reproduce the model; nothing was written."""


class TrainingError(VitlabError, RuntimeError):
    """A run that cannot go on; the message says why and what was kept."""


class VitlabWarning(UserWarning):
    """Something that works but is probably not what the user wants (bf16 emulated on this CPU,
    say)."""


_NOT_IMPLEMENTED = re.compile(r"\"?(\w+)\"? not implemented for '(\w+)'")


def torch_error_message(error: BaseException) -> str | None:
    """One line for an error torch raised because of what it was asked (memory, dtype, device), or
    None: a bug."""
    import torch

    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError)
        and re.search(r"out of memory|can't allocate memory|not enough memory", text)
    ):
        return (
            "out of memory: use a smaller batch size (--train_batch_size with "
            "--gradient_accumulation_steps, or --batch_size), a smaller model or image size, or "
            "--precision bf16"
        )
    found = _NOT_IMPLEMENTED.search(text)
    if isinstance(error, (RuntimeError, NotImplementedError)) and found:
        return (
            f"torch has no {found.group(2)} kernel for {found.group(1)} on this device; use "
            "--precision fp32"
        )
    if isinstance(error, RuntimeError) and "could not create a primitive" in text:
        return f"oneDNN cannot run this on this CPU ({first}); use --precision fp32"
    return None
