"""The mistakes a user can make, as exception types. Every command turns a `UserError` into one line naming
the key, file or row (convobot/cli.py); anything else is a bug and keeps its traceback.

Each also derives from the built-in exception it refines, so `except FileNotFoundError` still catches a
missing model path.
"""


class UserError(Exception):
    """Raised for bad input: the message says what is wrong and where."""


class ConfigError(UserError, ValueError):
    """A config value or key is wrong; the message names the key."""


class DataError(UserError, ValueError):
    """A data file or row is unusable; the message names the file and the row."""


class ModelPathError(UserError, FileNotFoundError):
    """A path given as a model, bundle or run dir is missing or is not one of those."""


class RunDirError(UserError, ValueError):
    """A file in a run dir cannot be read (cut off, hand-edited); the message names the file and line."""


class PromptTooLongError(UserError, ValueError):
    """A chat prompt does not fit the model's context."""


class MissingExtraError(UserError, ImportError):
    """A feature needs an optional extra that is not installed; the message says which `pip install` to run."""


class SaveError(UserError, OSError):
    """A write failed (disk full, read-only, a file in the way); the message names the path. Nothing half-written
    is left: the old file or folder stays, or there is none."""


class OutputExistsError(UserError, FileExistsError):
    """An output folder or file exists and overwrite was not asked for."""


class AdapterError(UserError, RuntimeError):
    """The adapter would not train anything (no target matched, or zero trainable parameters)."""


class VerificationError(UserError, RuntimeError):
    """A model check failed (merge, export or evaluation parity); the message names the check and the
    measured difference."""


class PlanError(UserError, RuntimeError):
    """The memory plan exceeds the card (message: by how much, the dominant part, what to change)."""


class CompareError(UserError, ValueError):
    """A path holds no run, or no run finished; the message names the path."""
