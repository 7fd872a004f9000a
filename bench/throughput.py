"""Training throughput of CE / KD / DKD / IC-KD on the classic and the fast path, in one process.

Each cell (method x batch size x path) is a real run composed like ``ickd train`` composes it
(``experiment=cifar100/res32x4_res8x4``: ResNet32x4 -> ResNet8x4, SGD recipe, the ``configs/distill``
defaults, memory bank of the whole training set, k = 16) on CIFAR-100-shaped synthetic data
(50,000 x 3 x 32 x 32 uint8, 100 classes). Per cell: build the Trainer, fill the memory bank (IC-KD;
not timed), one warm-up pass of W batches (cuDNN autotuning, CUDA-graph capture, worker start-up),
then T batches through ``Trainer.train_epoch``, data loading and augmentation included; images/s is
the trainer's own ``time/images_per_s`` of that pass (it ends with a device sync).

    .venv/bin/python bench/throughput.py --smoke        # CPU smoke: tiny nets, a few batches, < 2 min
    .venv/bin/python bench/throughput.py                # the full table (one GPU: about 2 minutes)
    .venv/bin/python bench/throughput.py --methods kd ickd --batches 64 --paths fast

Paths (``PATHS``): ``classic`` = torch DataLoader workers + per-sample torchvision PIL transforms,
eager step, fp32 (TF32 convolutions on CUDA), NCHW; ``fast`` = uint8 data resident on the device with
batched augmentation, CUDA-graph step on CUDA, bf16 autocast on CUDA, channels_last on CUDA (on a
CPU the fast path differs from the classic one only in its data pipeline).

The teacher is randomly initialised (saved as a checkpoint and loaded through the normal path):
speed does not depend on the weights. Targets (issue; checked only on CUDA, full mode): IC-KD fast
>= 25,000 images/s at batch 64 and >= 45,000 at batch 512, >= 3.5x the classic path at batch 64,
IC-KD/KD step time <= 1.05 on the fast path at batch 64 and 512.

Output: one JSON line per cell (``"kind": "cell"``), one summary JSON line (``"kind": "summary"``:
command, environment, ratios, targets), then markdown tables. ``--out FILE`` also writes the summary
(with the cells) to FILE. Exit status 1 when a cell failed, 2 with ``--strict`` when a target failed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without install

from ickd.config_store import compose_run_config  # noqa: E402
from ickd.distill import build_distiller  # noqa: E402
from ickd.engine.run import build_data_from_config, to_container  # noqa: E402
from ickd.engine.trainer import Trainer, TrainerConfig, resolve_device, seed_everything  # noqa: E402
from ickd.errors import ConfigError  # noqa: E402
from ickd.models import create_model  # noqa: E402

METHODS = ("ce", "kd", "dkd", "ickd")
BATCHES = (64, 512)

#: Trainer settings of each path (the rest is the run config's). ``num_workers`` is filled in later.
PATHS: dict[str, dict[str, Any]] = {
    "classic": {"pipeline": "classic", "step": "eager", "amp": "off", "channels_last": "off"},
    "fast": {"pipeline": "device", "step": "auto", "amp": "auto", "channels_last": "auto"},
}

#: The paper pair (full mode) and a tiny stand-in for CPU smoke runs; both keep the paper recipe.
FULL_PAIR = ["experiment=cifar100/res32x4_res8x4"]
SMOKE_PAIR = [
    "experiment=cifar100/res32x4_res8x4",
    "teacher=resnet8", "+teacher.kwargs.widths=[8,8,16,32]",
    "student=resnet8", "+student.kwargs.widths=[4,4,8,16]",
]


def synthetic_cifar100(num_train: int, num_val: int = 128) -> list[str]:
    """Overrides of the synthetic CIFAR-100-shaped data (32x32x3, 100 classes) the benchmarks train on."""
    return ["dataset=synthetic", "dataset.kwargs.num_classes=100", f"dataset.kwargs.num_train={num_train}",
            f"dataset.kwargs.num_val={num_val}", "dataset.kwargs.image_size=32", "dataset.kwargs.channels=3"]

# Issue targets: (name, what, threshold, comparison).
TARGETS = (
    ("ickd_fast_b64_images_per_s", "IC-KD fast path images/s at batch 64", 25000.0, ">="),
    ("ickd_fast_b512_images_per_s", "IC-KD fast path images/s at batch 512", 45000.0, ">="),
    ("ickd_b64_fast_vs_classic", "IC-KD fast / classic images/s at batch 64", 3.5, ">="),
    ("ickd_vs_kd_step_fast_b64", "IC-KD / KD step time, fast path, batch 64", 1.05, "<="),
    ("ickd_vs_kd_step_fast_b512", "IC-KD / KD step time, fast path, batch 512", 1.05, "<="),
)


# ---------------------------------------------------------------------------------- environment
def git_revision() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(device: torch.device) -> dict[str, Any]:
    """What a reader needs to compare numbers: machine, versions, threads, code revision."""
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **git_revision(),
    }
    return env


def command_line() -> str:
    """The exact command that produced this output."""
    return shlex.join([sys.executable, *sys.argv])


# ---------------------------------------------------------------------------------- building runs
def random_teacher_checkpoint(config: dict[str, Any], num_classes: int, in_channels: int, folder: Path) -> Path:
    """Save a randomly initialised teacher of the config's architecture, loaded like a trained one."""
    spec = config["teacher"]
    path = folder / f"teacher-{spec['name']}-{num_classes}x{in_channels}.pt"
    if not path.exists():
        torch.manual_seed(0)
        net = create_model(str(spec["name"]), num_classes, in_channels=in_channels, **dict(spec.get("kwargs") or {}))
        torch.save({"model": net.state_dict()}, path)
    return path


def pair_label(config: dict[str, Any]) -> str:
    def net(spec: dict[str, Any]) -> str:
        kwargs = ", ".join(f"{k}={v}" for k, v in (spec.get("kwargs") or {}).items())
        return f"{spec['name']}({kwargs})" if kwargs else str(spec["name"])

    return f"{net(config['teacher'])} -> {net(config['student'])} (random teacher)"


def compose(overrides: list[str]) -> dict[str, Any]:
    return to_container(compose_run_config(overrides))


def path_overrides(path: str, num_workers: int) -> list[str]:
    settings = dict(PATHS[path])
    if path == "classic":
        settings["num_workers"] = num_workers
    return [f"trainer.{k}={v}" for k, v in settings.items()]


def build_trainer(config: dict[str, Any], data, device: torch.device, out_dir: Path, seed: int = 0) -> Trainer:
    """The Trainer ``ickd.engine.run.train`` would build for ``config`` (without fit)."""
    trainer_cfg = TrainerConfig.from_mapping(config["trainer"])
    seed_everything(seed, trainer_cfg.deterministic)
    distiller = build_distiller(config, data.num_classes, data.in_channels, data.num_train, device)
    return Trainer(distiller, data, trainer_cfg, config["optim"], out_dir, seed=seed, run_config=config, device=device)


def step_info(trainer: Trainer) -> dict[str, Any]:
    """How the trainer actually ran (the resolved auto settings, CUDA-graph counters)."""
    info: dict[str, Any] = {
        "step": getattr(trainer, "step_mode", "eager"),
        "pipeline": trainer.pipeline,
        "amp": "bf16" if trainer.autocast_dtype is torch.bfloat16 else "off",
        "channels_last": bool(trainer.channels_last),
    }
    banks = getattr(trainer.distiller, "banks", {})
    if banks:
        bank = next(iter(banks.values()))
        info["bank_backend"] = getattr(bank, "retriever_name", None)
        info["bank_dtype"] = str(getattr(bank, "feats", torch.empty(0)).dtype).removeprefix("torch.")
    graph = trainer.step.graph
    if graph is not None and hasattr(graph, "stats"):
        info.update(graph.stats())
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(trainer: Trainer, warmup: int, timed: int) -> float:
    """Fill the banks and run ``warmup`` batches; returns the fill time in seconds."""
    batches = len(trainer.train_loader)
    if timed > batches or warmup > batches:
        raise ValueError(f"the training set gives {batches} batches per epoch at this batch size; "
                         "lower --warmup/--timed or raise --num-train")
    t0 = time.perf_counter()
    trainer.fill_banks()
    sync(trainer.device)
    fill_s = time.perf_counter() - t0
    trainer.cfg.max_batches_per_epoch = warmup
    trainer.train_epoch(0)
    return fill_s


def timed_pass(trainer: Trainer, timed: int) -> dict[str, Any]:
    """Time ``timed`` batches through train_epoch. Epoch 0 again, as the warm-up: a later epoch
    index could change what a CUDA graph bakes in and force a recapture inside the timed pass."""
    trainer.cfg.max_batches_per_epoch = timed
    before = step_info(trainer)
    metrics = trainer.train_epoch(0)
    info = step_info(trainer)
    for key in ("graph_replays", "eager_steps", "graph_captures"):
        if key in info:  # counters of the timed pass only
            info[key] -= before.get(key, 0)
    epoch_s = float(metrics["time/epoch_s"])
    return {
        "images_per_s": round(float(metrics["time/images_per_s"]), 1),
        "ms_per_step": round(1e3 * epoch_s / timed, 3),
        "timed_batches": timed,
        "timed_s": round(epoch_s, 3),
        "train_loss": round(float(metrics["train/loss"]), 4),
        **info,
    }


def measure(trainer: Trainer, warmup: int, timed: int) -> dict[str, Any]:
    """One cell: fill, warm up, then the timed pass."""
    fill_s = prepare(trainer, warmup, timed)
    return {**timed_pass(trainer, timed), "warmup_batches": warmup, "fill_s": round(fill_s, 3)}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- summaries
def _cell(cells: list[dict], **key: Any) -> dict | None:
    for c in cells:
        if all(c.get(k) == v for k, v in key.items()) and "images_per_s" in c:
            return c
    return None


def ratios(cells: list[dict]) -> tuple[list[dict], list[dict]]:
    """(IC-KD/KD step time per path and batch, fast/classic images/s per method and batch)."""
    step_ratio, speedup = [], []
    for path in PATHS:
        for batch in sorted({c["batch"] for c in cells}):
            kd, ickd = _cell(cells, method="kd", path=path, batch=batch), _cell(cells, method="ickd", path=path, batch=batch)
            if kd and ickd:
                step_ratio.append({"path": path, "batch": batch, "kd_ms_per_step": kd["ms_per_step"],
                                   "ickd_ms_per_step": ickd["ms_per_step"],
                                   "ratio": round(ickd["ms_per_step"] / kd["ms_per_step"], 3)})
    for method in METHODS:
        for batch in sorted({c["batch"] for c in cells}):
            slow, fast = _cell(cells, method=method, path="classic", batch=batch), _cell(cells, method=method, path="fast", batch=batch)
            if slow and fast:
                speedup.append({"method": method, "batch": batch, "speedup": round(fast["images_per_s"] / slow["images_per_s"], 2)})
    return step_ratio, speedup


def check_targets(cells: list[dict], step_ratio: list[dict], speedup: list[dict], applies: bool) -> list[dict]:
    """Each issue target with its measured value; ``pass`` is None where it does not apply (CPU, smoke)
    or where its cells were not run."""
    fast = {b: _cell(cells, method="ickd", path="fast", batch=b) for b in BATCHES}
    values = {
        "ickd_fast_b64_images_per_s": fast[64]["images_per_s"] if fast[64] else None,
        "ickd_fast_b512_images_per_s": fast[512]["images_per_s"] if fast[512] else None,
        "ickd_b64_fast_vs_classic": next((s["speedup"] for s in speedup if s["method"] == "ickd" and s["batch"] == 64), None),
        "ickd_vs_kd_step_fast_b64": next((r["ratio"] for r in step_ratio if r["path"] == "fast" and r["batch"] == 64), None),
        "ickd_vs_kd_step_fast_b512": next((r["ratio"] for r in step_ratio if r["path"] == "fast" and r["batch"] == 512), None),
    }
    out = []
    for name, what, threshold, op in TARGETS:
        value = values[name]
        ok = None
        if applies and value is not None:
            ok = value >= threshold if op == ">=" else value <= threshold
        out.append({"name": name, "what": what, "value": value, "threshold": threshold, "op": op, "pass": ok})
    return out


def print_tables(summary: dict[str, Any]) -> None:
    cells = summary["cells"]
    setup = summary["setup"]
    env = summary["env"]
    print(f"\n## Training throughput ({'smoke, ' if setup['smoke'] else ''}{env['device']}: {env['device_name']}, torch {env['torch']})\n")
    print(f"`{summary['command']}`\n")
    counts = ", ".join(f"batch {b}: {setup['warmup'][b]} + {setup['timed'][b]}" for b in setup["warmup"])
    print(f"{setup['pair']}, data {setup['data']}, warm-up + timed batches per cell ({counts}), "
          f"classic path with {setup['classic_workers']} workers; images/s through Trainer.train_epoch (data path included).\n")
    batches = sorted({c["batch"] for c in cells})
    print("| method | batch | classic images/s | classic ms/step | fast images/s | fast ms/step | fast step | fast / classic |")
    print("|---|---|---|---|---|---|---|---|")
    speed = {(s["method"], s["batch"]): s["speedup"] for s in summary["speedup_fast_vs_classic"]}
    for method in setup["methods"]:
        for batch in batches:
            row = [method, str(batch)]
            step = ""
            for path in ("classic", "fast"):
                c = next((c for c in cells if c["method"] == method and c["batch"] == batch and c["path"] == path), None)
                if c is None:
                    row += ["-", "-"]
                elif "error" in c:
                    row += ["failed", "-"]
                else:
                    row += [f"{c['images_per_s']:,.0f}", f"{c['ms_per_step']:.2f}"]
                    if path == "fast":
                        step = c["step"] + (f" ({c['graph_replays']}/{c['timed_batches']} replayed)" if "graph_replays" in c else "")
            row += [step, f"{speed[(method, batch)]:.2f}x" if (method, batch) in speed else "-"]
            print("| " + " | ".join(row) + " |")
    if summary["step_time_ickd_vs_kd"]:
        print("\n| path | batch | KD ms/step | IC-KD ms/step | IC-KD / KD step time |\n|---|---|---|---|---|")
        for r in summary["step_time_ickd_vs_kd"]:
            print(f"| {r['path']} | {r['batch']} | {r['kd_ms_per_step']:.2f} | {r['ickd_ms_per_step']:.2f} | {r['ratio']:.3f} |")
    print("\n| target | measured | required | result |\n|---|---|---|---|")
    for t in summary["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:,}"
        result = {True: "pass", False: "FAIL", None: "n/a" + ("" if summary["targets_apply"] else " (CUDA, full mode only)")}[t["pass"]]
        print(f"| {t['what']} | {value} | {t['op']} {t['threshold']:g} | {result} |")
    for c in cells:
        if "error" in c:
            print(f"\nFAILED {c['method']} batch {c['batch']} {c['path']}: {c['error']}")


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny teacher/student and a few batches: the same table on a CPU in < 2 min")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--num-train", type=int, help="training-set (= memory-bank) size; default 50000, smoke 1024")
    p.add_argument("--warmup", type=int, help="warm-up batches per cell (default: 20 at batch <= 128 else 10; smoke 1)")
    p.add_argument("--timed", type=int, help="timed batches per cell (default: 300 at batch <= 128 else 60; smoke 2)")
    p.add_argument("--classic-workers", type=int, help="DataLoader workers of the classic path (default 4, smoke 2)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for every cell, e.g. trainer.nonfinite_check_every=100 (repeatable)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; smoke 1, robust on a busy shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="exit 2 when a target that applies fails")
    p.add_argument("--out", type=Path, help="also write the summary JSON (with all cells) to this file")
    return p.parse_args(argv)


def batch_counts(args: argparse.Namespace, batch: int) -> tuple[int, int]:
    if args.smoke:
        return args.warmup or 1, args.timed or 2
    small = batch <= 128
    return args.warmup or (20 if small else 10), args.timed or (300 if small else 60)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or (1 if args.smoke else None)
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(args.device)
    num_train = args.num_train or (1024 if args.smoke else 50000)
    workers = args.classic_workers if args.classic_workers is not None else (2 if args.smoke else 4)
    pair = SMOKE_PAIR if args.smoke else FULL_PAIR
    common = [*pair, *synthetic_cifar100(num_train), f"trainer.device={device}", "trainer.progress=off", f"seed={args.seed}"]
    cells: list[dict[str, Any]] = []
    distill_cfgs: dict[str, Any] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ickd-bench-") as tmp:
        folder = Path(tmp)
        base = compose([*common, *args.override])
        data = build_data_from_config(base)
        teacher_ckpt = random_teacher_checkpoint(base, data.num_classes, data.in_channels, folder)
        for method in args.methods:
            for batch in args.batches:
                for path in args.paths:
                    warmup, timed = batch_counts(args, batch)
                    cell: dict[str, Any] = {"kind": "cell", "benchmark": "throughput", "method": method, "batch": batch, "path": path}
                    try:
                        config = compose([*common, f"distill={method}", f"teacher.checkpoint={teacher_ckpt}",
                                          f"trainer.batch_size={batch}", *path_overrides(path, workers), *args.override])
                        distill_cfgs[method] = config["distill"]
                        trainer = build_trainer(config, data, device, folder / f"{method}-{batch}-{path}", args.seed)
                        cell.update(measure(trainer, warmup, timed))
                        if path == "classic":
                            cell["num_workers"] = workers
                        del trainer
                    except Exception as exc:  # one failed cell must not hide the others
                        cell["error"] = f"{type(exc).__name__}: {exc}"
                    release(device)
                    cells.append(cell)
                    print(json.dumps(cell), flush=True)
    step_ratio, speedup = ratios(cells)
    applies = device.type == "cuda" and not args.smoke
    targets = check_targets(cells, step_ratio, speedup, applies)
    summary = {
        "kind": "summary", "benchmark": "throughput", "command": command_line(), "env": environment(device),
        "setup": {
            "smoke": args.smoke, "pair": pair_label(base),
            "data": f"synthetic {num_train} x 3x32x32 uint8, 100 classes", "methods": args.methods, "batches": args.batches,
            "paths": {p: PATHS[p] for p in args.paths}, "classic_workers": workers,
            "warmup": {b: batch_counts(args, b)[0] for b in args.batches}, "timed": {b: batch_counts(args, b)[1] for b in args.batches},
            "overrides": args.override, "distill": distill_cfgs,
            "memory": {k: base["memory"][k] for k in ("k", "backend", "feature_dtype", "size")},
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "step_time_ickd_vs_kd": step_ratio, "speedup_fast_vs_classic": speedup,
        "targets_apply": applies, "targets": targets,
        "failed_cells": sum("error" in c for c in cells),
        "cells": cells,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "cells"}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print_tables(summary)
    if summary["failed_cells"]:
        return 1
    if args.strict and any(t["pass"] is False for t in targets):
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as exc:  # a bad option or override: the message says what to change
        sys.exit(f"error: {exc}")
