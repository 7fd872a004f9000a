"""What ``Trainer.fit()`` costs beyond the training steps: evaluation, checkpoints (with or without
the memory bank) and bookkeeping, per bank-checkpoint policy (issue 12, Scope 2).

Each cell is a real IC-KD ``fit()`` (offline paradigm, memory bank of the whole training set, the
fast path's settings) composed like ``ickd train`` composes it, on CIFAR-100-shaped synthetic data.
Per cell it prints:

* ``step_images_per_s``: images trained / time inside the epochs' training loops (``time/epoch_s``,
  the trainer's own figure, what bench/throughput.py reports);
* ``fit_images_per_s``: images trained / wall time of ``fit()``'s epochs loop (evaluation,
  checkpoints and callbacks included; the one-off bank fill pass before it is ``fill_s``);
* ``save_s``: total seconds in ``Trainer.save`` and ``last_pt_mb``: the size of the last ``last.pt``
  written with (``full``) and without (``lean``) the bank.

Policies: ``bank-every-epoch`` (memory.update=overwrite, trainer.bank_checkpoint_every=1: every
checkpoint carries the bank, as before issue 12), ``bank-every-5`` (the default,
trainer.bank_checkpoint_every=5), ``frozen-rebuilt`` (memory.update=frozen: the bank is never
saved; a resume rebuilds it with the fill pass).

    .venv/bin/python bench/fit_overhead.py                   # CPU default: tiny nets, < 2 min
    .venv/bin/python bench/fit_overhead.py --full --device cuda --epochs 6 --batches-per-epoch 0

``--full`` uses the paper pair (ResNet32x4 -> ResNet8x4, bank of 50,000 x 256); ``--batches-per-epoch
0`` trains whole epochs. Output: one JSON line per cell, a summary JSON line (command, environment),
then a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (  # noqa: E402  (bench/ is not a package)
    FULL_PAIR, SMOKE_PAIR, build_trainer, command_line, compose, environment, pair_label, random_teacher_checkpoint, release,
    synthetic_cifar100,
)

from ickd.engine.run import build_data_from_config  # noqa: E402
from ickd.engine.trainer import resolve_device  # noqa: E402

POLICIES: dict[str, list[str]] = {
    "bank-every-epoch": ["memory.update=overwrite", "trainer.bank_checkpoint_every=1"],
    "bank-every-5": ["memory.update=overwrite", "trainer.bank_checkpoint_every=5"],
    "frozen-rebuilt": ["memory.update=frozen"],
}


def run_cell(config: dict[str, Any], data, device: torch.device, out: Path, seed: int) -> dict[str, Any]:
    trainer = build_trainer(config, data, device, out, seed)
    saves: list[tuple[float, bool]] = []
    save = trainer.save

    def timed_save(*args, **kwargs):
        t0 = time.perf_counter()
        save(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        saves.append((time.perf_counter() - t0, (out / "checkpoints" / "last.pt").stat().st_size / 2**20))

    trainer.save = timed_save
    t0 = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(m["time/epoch_s"] for m in history)
    images = sum(m["time/images_per_s"] * m["time/epoch_s"] for m in history)
    sizes = [size for _, size in saves]
    cell = {
        "status": summary["status"],
        "epochs": len(history),
        "images": round(images),
        "step_images_per_s": round(images / train_s, 1),
        "fit_images_per_s": round(images / float(summary["wall_time_s"]), 1),
        "fit_s": round(float(summary["wall_time_s"]), 3),
        "fill_s": round(wall - float(summary["wall_time_s"]), 3),  # the bank fill pass and set-up, before the epochs
        "train_s": round(train_s, 3),
        "save_s": round(sum(s for s, _ in saves), 3),
        "saves": len(saves),
        "last_pt_mb_max": round(max(sizes), 2) if sizes else None,
        "last_pt_mb_min": round(min(sizes), 2) if sizes else None,
        "step_mode": history[-1].get("step_mode"),
    }
    del trainer
    return cell


def print_table(summary: dict[str, Any]) -> None:
    print()
    print(f"fit() end-to-end vs step-only images/s ({summary['env']['device_name']}, {summary['setup']['pair']})")
    print()
    print("| policy | epochs | step img/s | fit img/s | fit / step | saves | save s | last.pt MB (max / min) | fill s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in summary["cells"]:
        if "error" in c:
            print(f"| {c['policy']} | error: {c['error']} ||||||||")
            continue
        print(f"| {c['policy']} | {c['epochs']} | {c['step_images_per_s']:.0f} | {c['fit_images_per_s']:.0f} | "
              f"{c['fit_images_per_s'] / c['step_images_per_s']:.3f} | {c['saves']} | {c['save_s']:.3f} | "
              f"{c['last_pt_mb_max']} / {c['last_pt_mb_min']} | {c['fill_s']:.1f} |")
    print()
    print(f"command: {summary['command']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the paper pair (ResNet32x4 -> ResNet8x4); default: tiny nets")
    p.add_argument("--device", default="auto")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num-train", type=int, default=50000, help="training-set (= memory-bank) size")
    p.add_argument("--batches-per-epoch", type=int, default=10, help="trainer.max_batches_per_epoch (0: whole epochs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    pair = FULL_PAIR if args.full else SMOKE_PAIR
    limit = args.batches_per_epoch or None
    common = [*pair, *synthetic_cifar100(args.num_train),
              f"trainer.device={device}", "trainer.progress=off", f"seed={args.seed}", "distill=ickd",
              "trainer.pipeline=device", "trainer.step=auto", "trainer.amp=auto", "trainer.channels_last=auto",
              f"trainer.batch_size={args.batch}", f"trainer.epochs={args.epochs}", f"trainer.max_batches_per_epoch={limit}"
              if limit else "trainer.max_batches_per_epoch=null"]
    cells: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ickd-fit-bench-") as tmp:
        folder = Path(tmp)
        base = compose([*common, *args.override])
        data = build_data_from_config(base)
        teacher = random_teacher_checkpoint(base, data.num_classes, data.in_channels, folder)
        for policy in args.policies:
            cell: dict[str, Any] = {"kind": "cell", "benchmark": "fit_overhead", "policy": policy, "batch": args.batch}
            try:
                config = compose([*common, f"teacher.checkpoint={teacher}", *POLICIES[policy], *args.override])
                cell.update(run_cell(config, data, device, folder / policy, args.seed))
            except Exception as exc:  # one failed cell must not hide the others
                cell["error"] = f"{type(exc).__name__}: {exc}"
            release(device)
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    summary = {
        "kind": "summary", "benchmark": "fit_overhead", "command": command_line(), "env": environment(device),
        "setup": {"pair": pair_label(base), "num_train": args.num_train, "epochs": args.epochs, "batch": args.batch,
                  "batches_per_epoch": limit, "bank": f"{args.num_train} x {base['memory'].get('size') or 'N'}"},
        "wall_s": round(time.perf_counter() - started, 1),
        "cells": cells,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "cells"}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print_table(summary)
    return 1 if any("error" in c for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
