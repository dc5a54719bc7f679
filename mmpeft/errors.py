"""The errors a user can fix: a bad config, data file, path, checkpoint, backbone, quantization or merge.

The command line and the recipes catch `MmpeftError` and print its message with exit code 2; anything else (a
bug, or an error raised inside torch / transformers / peft) keeps its traceback. Each class also keeps the
built-in parent callers caught before (a config error is still a `ValueError`), so existing handlers work.
"""

from __future__ import annotations


class MmpeftError(Exception):
    """Something the user can fix; the message says what was wrong, where, and what would be right."""

    def __init__(self, message: str = ""):
        # An error in a DataLoader worker comes back as `ErrorType("Caught ErrorType in DataLoader worker process 0.
        # Original Traceback ...")`; keep only the original message, which already says file, row and what to do.
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if isinstance(message, str) and message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class ConfigError(MmpeftError, ValueError):
    """A config key with a wrong type, value or combination (the message names the key)."""


class DataError(MmpeftError, ValueError):
    """A data file or row that cannot be used (the message names the file and row)."""


class BackboneError(MmpeftError, ValueError):
    """A checkpoint that cannot serve as the backbone it was named for."""


class QuantizationError(MmpeftError, ValueError):
    """A quantization setting that cannot work on this model or machine."""


class CheckpointError(MmpeftError, ValueError):
    """A training checkpoint that is missing, damaged or from another run."""


class AdapterError(MmpeftError, ValueError):
    """A saved run folder (adapter, head, run record) that cannot be loaded as it is."""


class MergeError(MmpeftError, ValueError):
    """An adapter that cannot be merged as asked."""


class TrainingError(MmpeftError, RuntimeError):
    """A run that cannot go on; the message says where it stopped and what was kept."""


class MissingPathError(MmpeftError, FileNotFoundError):
    """A file or folder the user named does not exist or is not what was expected."""


class PathExistsError(MmpeftError, FileExistsError):
    """A destination that already holds something mmpeft will not overwrite without being asked."""


class HubError(MmpeftError, RuntimeError):
    """A Hub push or download that failed: no token, a refused token, someone else's repo, no network, a server
    error. The message says what was kept (the local folder always is) and what to do."""
