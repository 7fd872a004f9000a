"""Where studies live: one interface, several Optuna storages.

- default: Optuna's journal file ``<study dir>/journal.log`` (no server; safe for many processes on
  one node, works on NFS in practice);
- any SQLAlchemy URL, e.g. ``postgresql+psycopg2://user@host:5432/db`` for many nodes, with Optuna's
  RDB heartbeats. Passwords never go into URLs that ickd stores or prints: use PGPASSWORD or
  ~/.pgpass (libpq reads both).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from ickd.errors import ConfigError

JOURNAL_FILE = "journal.log"


class StorageError(ConfigError):
    """The study storage cannot be opened or reached."""


_PASSWORD_QUERY_KEYS = ("password", "passwd")


def _is_sql_url(url: str | None) -> bool:
    return bool(url) and "://" in str(url) and not str(url).startswith("journal://")


def redact(url: str | None) -> str:
    """The URL with any password (in the credentials or the query) hidden, safe to print and log."""
    if not url:
        return "journal"
    if not _is_sql_url(url):
        return url
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        in_query = [k for k in parsed.query if k.lower() in _PASSWORD_QUERY_KEYS]
        return parsed.difference_update_query(in_query).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: hide everything but the scheme
        return f"{url.split('://', 1)[0]}://***"


def has_password(url: str | None) -> bool:
    if not _is_sql_url(url):
        return False
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:
        creds = str(url).split("://", 1)[1].split("@", 1)
        return len(creds) == 2 and ":" in creds[0]
    return parsed.password is not None or any(k.lower() in _PASSWORD_QUERY_KEYS for k in parsed.query)


def password_refusal(url: str) -> str:
    """Why a URL with a password is refused, and the fix; the password itself is never shown."""
    return (
        f"the storage URL {redact(url)} contains a password; remove it from the URL and put it in "
        "PGPASSWORD or ~/.pgpass (libpq reads both), so no secret lands in study files, logs or study.yaml"
    )


def is_journal(url: str | None) -> bool:
    return url in (None, "", "journal") or str(url).startswith("journal://") or str(url).endswith(".log")


def journal_path(url: str | None, study_dir: Path) -> Path:
    if url in (None, "", "journal"):
        return study_dir / JOURNAL_FILE
    text = str(url)
    return Path(text[len("journal://"):] if text.startswith("journal://") else text)


def open_storage(
    url: str | None,
    study_dir: Path,
    heartbeat: Mapping[str, Any] | None = None,
    retry: Mapping[str, Any] | None = None,
) -> BaseStorage:
    """Open the storage of a study (the journal file in ``study_dir`` by default)."""
    if has_password(url):
        raise StorageError(password_refusal(str(url)))
    if is_journal(url):
        path = journal_path(url, study_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    heartbeat = dict(heartbeat or {})
    max_retry = int((retry or {}).get("max_retries", 0))
    try:
        return RDBStorage(
            str(url),
            engine_kwargs={"pool_pre_ping": True, "connect_args": _connect_args(str(url))},
            heartbeat_interval=int(heartbeat.get("interval_s", 30)),
            grace_period=int(heartbeat.get("grace_s", 120)),
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry) if max_retry > 0 else None,
        )
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(
            f"cannot open the study storage {redact(url)}: {reason}. Check that the database server runs "
            "and is reachable from this node (host, port, database name), and that the password is in "
            "PGPASSWORD or ~/.pgpass"
        ) from None


def _connect_args(url: str) -> dict[str, Any]:
    # Fail fast instead of hanging on an unreachable host.
    return {"connect_timeout": 10} if url.startswith("postgresql") else {}


def dashboard_storage(url: str | None, study_dir: Path) -> str:
    """The argument optuna-dashboard takes: a journal file path or the URL."""
    return str(journal_path(url, study_dir)) if is_journal(url) else str(url)


def uses_heartbeats(storage: BaseStorage) -> bool:
    """True for storages with Optuna's heartbeats (RDB), also behind the cache wrapper that
    ``optuna.load_study`` puts around an RDBStorage."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None
