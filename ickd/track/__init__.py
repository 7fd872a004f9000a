"""Tracking: the W&B logger (a trainer callback), resuming from W&B artifacts, offline sync, and the
one helper that runs compose -> loggers -> train (``ickd.track.execute``). Reports moved to ickd.report."""

# W&B tracking (ickd/track/wandb_logger.py). Looked up lazily so importing ickd.track (e.g. for the
# reports) loads neither the trainer nor wandb; wandb itself is imported only when a run starts.
_LOGGER_NAMES = ("WandbLogger", "loggers_for", "resolve_mode", "redact", "flatten", "platform_tag")
# trainer.resume=wandb:... (ickd/track/artifacts.py): resolved to a local file before the trainer runs.
_ARTIFACT_NAMES = ("resolve_resume", "is_artifact_ref")


def __getattr__(name: str):
    if name in _LOGGER_NAMES:
        from ickd.track import wandb_logger

        return getattr(wandb_logger, name)
    if name in _ARTIFACT_NAMES:
        from ickd.track import artifacts

        return getattr(artifacts, name)
    raise AttributeError(f"module 'ickd.track' has no attribute {name!r}")
