"""Where studies live: one interface, several Optuna storages.

- default: Optuna's journal file ``<study dir>/journal.log`` (no server; safe for many processes on
  one node, works on NFS in practice);
- any SQLAlchemy URL, e.g. ``postgresql+psycopg2://user@host:5432/db`` for many nodes, with Optuna's
  RDB heartbeats. Passwords never go into URLs that ickd stores or prints: use PGPASSWORD or
  ~/.pgpass (libpq reads both).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from ickd.errors import ConfigError
from ickd.runs.atomic import atomic_write_bytes
from ickd.redaction import is_secret_query_name, redact_text, url_password_in

JOURNAL_FILE = "journal.log"
TORN_SUFFIX = ".torn"

log = logging.getLogger("ickd.sweep")


class StorageError(ConfigError):
    """The study storage cannot be opened or reached."""


class JournalCorruptError(StorageError):
    """A line inside the journal file is not valid JSON and could not be repaired automatically."""


# libpq parameters whose names look secret but hold file paths, not secrets: allowed in URLs.
_PATH_QUERY_KEYS = ("sslkey", "sslcert", "sslrootcert", "sslcrl", "sslcrldir", "passfile")


def _is_sql_url(url: str | None) -> bool:
    return bool(url) and "://" in str(url) and not str(url).startswith("journal://")


def redact(url: str | None) -> str:
    """The URL with any secret hidden (ickd/redaction.py: userinfo passwords, and query parameters
    named like pass/secret/token/key/auth), safe to print and log."""
    if not url:
        return "journal"
    if not _is_sql_url(url):
        return url
    return redact_text(str(url))


def _secret_query_keys(url: str) -> list[str]:
    query = str(url).split("?", 1)[1] if "?" in str(url) else ""
    names = [part.split("=", 1)[0] for part in query.replace(";", "&").split("&") if part]
    return [n for n in names if is_secret_query_name(n) and n.lower() not in _PATH_QUERY_KEYS]


def has_password(url: str | None) -> bool:
    """True if the URL carries a secret: a password in its userinfo, or a query parameter such as
    ``password=``, ``sslpassword=`` or ``token=``."""
    if not _is_sql_url(url):
        return False
    return url_password_in(str(url)) or bool(_secret_query_keys(str(url)))


def password_refusal(url: str) -> str:
    """Why a URL with a secret is refused, and the fix; the secret itself is never shown."""
    keys = _secret_query_keys(url)
    where = f"a secret (query parameter {', '.join(keys)})" if keys else "a password"
    return (
        f"the storage URL {redact(url)} contains {where}; remove it from the URL: put the password in "
        "PGPASSWORD or ~/.pgpass (libpq reads both), and other secrets such as sslpassword in a libpq "
        "service file (~/.pg_service.conf or $PGSERVICEFILE, then ?service=NAME in the URL), so no secret "
        "lands in study files, logs or study.yaml"
    )


def is_journal(url: str | None) -> bool:
    return url in (None, "", "journal") or str(url).startswith("journal://") or str(url).endswith(".log")


def journal_path(url: str | None, study_dir: Path) -> Path:
    if url in (None, "", "journal"):
        return study_dir / JOURNAL_FILE
    text = str(url)
    return Path(text[len("journal://"):] if text.startswith("journal://") else text)


# Optuna writes each operation as one compact JSON object starting with its op code.
_OP_START = b'{"op_code"'


def _salvage(line: bytes) -> int | None:
    """For an invalid line that is a torn operation with a complete one appended after it (what an
    older ickd wrote after a full disk), the offset where the complete operation starts."""
    pos = line.find(_OP_START, 1)
    while pos != -1:
        try:
            json.loads(line[pos:])
            return pos
        except ValueError:
            pos = line.find(_OP_START, pos + 1)
    return None


def _keep_torn(path: Path, pieces: list[bytes]) -> Path:
    torn = path.with_name(path.name + TORN_SUFFIX)
    with open(torn, "ab") as f:  # appended: bytes cut by earlier repairs stay
        for piece in pieces:
            f.write(piece.rstrip(b"\n") + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return torn


def repair_journal(path: str | os.PathLike) -> int:
    """Make an Optuna journal file appendable again, under Optuna's own journal lock (so two workers
    never both repair, and no append runs meanwhile). Returns the number of bytes cut.

    - a torn final line (no newline, or not valid JSON: a full disk or a crash mid-write) is cut back
      to the last newline;
    - a line holding a torn operation followed by a complete one (an append after a torn line) keeps
      the complete operation;
    the cut bytes are appended to ``<journal>.torn`` and a warning is logged. Any other invalid line
    raises :class:`JournalCorruptError` with repair instructions.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    lock = JournalFileOpenLock(str(path))
    if not os.access(path.parent, os.W_OK) or not os.access(path, os.W_OK):
        lock = None  # someone else's study, read-only to us: check it, repair nothing
    else:
        lock.acquire()
    try:
        data = path.read_bytes()
        lines = data.splitlines(keepends=True)
        kept: list[bytes] = []
        cut: list[bytes] = []
        for number, line in enumerate(lines, start=1):
            last = number == len(lines)
            if line.endswith(b"\n") or not last:
                try:
                    json.loads(line)
                    kept.append(line)
                    continue
                except ValueError as exc:
                    error = exc
            else:
                error = ValueError("no newline at the end (torn write)")
            start = _salvage(line) if line.endswith(b"\n") else None
            if start is not None:
                cut.append(line[:start])
                kept.append(line[start:])
            elif last:
                cut.append(line)
            else:
                raise JournalCorruptError(_corrupt_message(path, number, len(lines), line, error))
        if not cut:
            return 0
        removed = sum(len(c) for c in cut)
        if lock is None:
            log.warning(
                "the study journal %s ends in a torn write (%d byte(s)); Optuna skips it when reading, but "
                "only its owner can repair it (any ickd sweep command of theirs does)", path, removed,
            )
            return 0
        torn = _keep_torn(path, cut)
        repaired = b"".join(kept)
        if data.startswith(repaired):  # only the tail changes: cut it in place
            with open(path, "r+b") as f:
                f.truncate(len(repaired))
                f.flush()
                os.fsync(f.fileno())
        else:
            atomic_write_bytes(path, repaired)
        log.warning(
            "repaired the study journal %s: cut %d byte(s) of a torn write (a full disk or a crash while "
            "writing); they are kept in %s. Trials recorded before it are intact.", path, removed, torn,
        )
        return removed
    finally:
        if lock is not None:
            lock.release()


def _corrupt_message(path: Path, number: int, total: int, line: bytes, error: Exception) -> str:
    shown = line[:80].decode("utf-8", "replace").rstrip()
    return (
        f"the study journal {path} cannot be read: line {number} of {total} is not valid JSON ({error}): "
        f"{shown!r}{'...' if len(line) > 80 else ''}. Optuna cannot replay the study past it. To repair: stop "
        f"every worker of this study, back the file up (cp {path} {path}.bak), delete that line "
        f"(sed -i '{number}d' {path}; the one operation it held, usually a trial attribute or state, is lost) "
        f"and run the command again. Bytes cut from torn writes earlier are kept in {path}{TORN_SUFFIX}"
    )


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
        repair_journal(path)  # a torn last line would make every later append unreadable
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
