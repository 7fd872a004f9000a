"""Atomic file writes, the one copy: temporary file in the same folder, fsync, rename, fsync of the
folder. A crash (SIGKILL, a full disk) during a write leaves the previous version intact; a failed
write is a :class:`~ickd.errors.DiskWriteError` naming the disk and the fix. New files get the mode
any new file of the user gets (0666 minus the umask), not mkstemp's 0600.

Neutral: standard library and ``ickd.errors`` only (the core's checkpoints and every platform layer
write through it)."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ickd.errors import DiskWriteError


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems refuse to open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask_at_import() -> int:
    # os.umask can only be read by setting it; done once, at import (before threads start).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()


def current_umask() -> int:
    """The process's umask, read without changing it where possible: ``os.umask(x)`` then
    ``os.umask(old)`` is process-global and races with threads creating files in between, so on
    Linux it is read from /proc/self/status (the ``Umask:`` line, kernel >= 4.7); elsewhere the
    value at import is used."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def file_mode() -> int:
    """The mode a plain new file gets (0o666 minus the umask): 0644 under umask 022, 0600 under 077."""
    return 0o666 & ~current_umask()


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem that holds ``path`` (or would hold it)."""
    here = Path(os.path.abspath(path))
    while not here.exists() and here != here.parent:
        here = here.parent
    while not os.path.ismount(here) and here != here.parent:
        here = here.parent
    return here


def disk_write_error(path: str | os.PathLike, exc: OSError) -> DiskWriteError:
    """A :class:`DiskWriteError` for a failed write of ``path``, naming its disk and the fix."""
    mount = mount_point(path)
    try:
        st = os.statvfs(mount)
        free = f", {st.f_bavail * st.f_frsize / 2**20:.1f} MiB free of {st.f_blocks * st.f_frsize / 2**20:.0f} MiB"
    except OSError:
        free = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "the disk is full" if exc.errno == errno.ENOSPC else "the disk quota is used up"
        fix = (f"free space on {mount} (or raise the quota), or set hydra.run.dir=<a folder on another disk>, "
               "then run the same command again: the run resumes from its last good checkpoint")
    else:
        what = exc.strerror or str(exc)
        fix = (f"check that {path.parent if isinstance(path, Path) else Path(path).parent} is writable on {mount}, "
               "or set hydra.run.dir=<a writable folder>")
    error = DiskWriteError(f"cannot write {path}: {what} (filesystem mounted at {mount}{free}); {fix}. "
                           "The previous version of the file, if any, is intact.")
    error.errno = exc.errno  # (no .filename: OSError's str() would then drop the message)
    return error


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; an OSError (e.g. ENOSPC) becomes a :class:`DiskWriteError`
    naming the disk, with no temporary file left behind and the old file untouched."""
    try:
        _atomic_write_bytes(path, data)
    except DiskWriteError:
        raise
    except OSError as exc:
        raise disk_write_error(Path(path), exc) from exc


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # folders: 0777 minus the umask, like mkdir(1)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode any new file of the user gets, so labmates
        # can read teachers, runs and studies when the umask allows it (0644 under umask 022).
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` the same file as ``src`` atomically (a hard link renamed into place; a copy where
    the filesystem has no hard links). ``src`` is replaced by rename on its next save, so ``dst``
    keeps this version."""
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link"
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
    except OSError:
        atomic_write_bytes(dst, src.read_bytes())
        return
    try:
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_write_error(dst, exc) from exc
    _fsync_dir(dst.parent)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync it; on a failed or short write the file is cut back to its complete
    lines (no torn line) and a :class:`DiskWriteError` names the disk."""
    path = Path(path)
    data = line.encode()
    try:
        with open(path, "ab", buffering=0) as f:
            size = f.tell()
            try:
                if f.write(data) != len(data):
                    raise OSError(28, "No space left on device (short write)")
                os.fsync(f.fileno())
            except OSError:
                try:
                    os.ftruncate(f.fileno(), size)
                except OSError:
                    pass
                raise
    except OSError as exc:
        raise disk_write_error(path, exc) from exc
