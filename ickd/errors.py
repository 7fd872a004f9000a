"""Error types users see. Every message names the problem and the fix."""


class IckdError(Exception):
    """Base class of every error ickd raises on purpose."""


class ConfigError(IckdError, ValueError):
    """A configuration value is invalid (bad range, inconsistent settings)."""


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup failed; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DatasetNotFoundError(IckdError, FileNotFoundError):
    """Dataset files are missing and could not be downloaded."""


class CheckpointError(IckdError):
    """A checkpoint is corrupt, truncated or does not match the model."""


class NonFiniteLossError(IckdError, FloatingPointError):
    """A training loss became NaN or inf."""


class DiskWriteError(IckdError, OSError):
    """Writing a run's file failed (disk full, quota, read-only or unwritable folder); the message
    names the file, its filesystem and the fix. Previous versions of the file are left intact."""


class TrialsFailedError(IckdError):
    """A study stopped because its trials failed by themselves (exit 1, not a mistake in the input)."""
