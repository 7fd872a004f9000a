"""Read W&B's local run files (``run-<id>.wandb``) without a server.

wandb 0.31 writes each run as a LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs and has
no Python reader any more (the old ``DataStore`` went with the Go core), so this is a minimal one:
a 7-byte file header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a
7-byte header (crc32, length, type: full/first/middle/last). Used by ``ickd wandb sync --dry-run``
and by the tests that check what a run logged.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def raw_records(path: str | Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        return
    ident, magic, _version = _FILE_HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file (header {ident!r} {magic:#x})")
    pos, pending = _FILE_HEADER.size, b""
    while pos + _CHUNK_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER.size:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0:  # zero padding up to the end of the block (or of a file still being written)
            pos += left
            continue
        chunk = data[pos + _CHUNK_HEADER.size: pos + _CHUNK_HEADER.size + length]
        pos += _CHUNK_HEADER.size + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def records(path: str | Path) -> Iterator[Any]:
    """The ``Record`` protobufs of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    for raw in raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def _items(items) -> dict[str, Any]:
    out = {}
    for item in items:
        key = "/".join(item.nested_key) if item.nested_key else item.key
        out[key] = json.loads(item.value_json)
    return out


def read_run(path: str | Path) -> dict[str, Any]:
    """One run file as plain data: ``id``, ``project``, ``entity``, ``group``, ``job_type``,
    ``name``, ``tags``, ``config`` (key -> value), ``history`` (one dict per logged step) and
    ``summary`` (the last value of each summary key), ``metrics`` (define_metric calls), and
    ``exit_code`` (None until the run's exit record is on disk: wandb-core buffers the file and may
    flush its tail only after ``run.finish()`` has returned, so a reader must wait for it)."""
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "metrics": [], "exit_code": None}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(id=r.run_id, project=r.project, entity=r.entity, group=r.run_group, job_type=r.job_type,
                       name=r.display_name, tags=list(r.tags))
            run["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "config":
            run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            run["history"].append(_items(record.history.item))
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
        elif kind == "metric":
            m = record.metric
            run["metrics"].append({"name": m.name or m.glob_name, "step_metric": m.step_metric})
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def run_file(offline_dir: str | Path) -> Path | None:
    files = sorted(Path(offline_dir).glob("run-*.wandb"))
    return files[0] if files else None
