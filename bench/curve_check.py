"""Correctness of the fast path: IC-KD trained on the classic and on the fast path gives the same loss curve.

Two runs from the same seed (same student initialisation, same teacher checkpoint, same data, same
batches: both input pipelines execute the same per-epoch plan of order and crop/flip draws) train
S steps of IC-KD through ``Trainer.train_epoch``, in windows of w batches (window j = the first w
batches of epoch j; the trainer reports each window's mean loss). The classic run is the reference:
DataLoader + PIL transforms, eager step, fp32, NCHW. The fast run is the fast path as configured
(``trainer.pipeline=device``, ``step=auto``, ``amp=auto``, ``channels_last=auto``): on a CPU that is
eager fp32 with the device pipeline; on CUDA it is bf16 autocast, channels_last and the CUDA-graph step.

    .venv/bin/python bench/curve_check.py                  # CPU: tiny nets, 12 steps, per-step, fp32
    .venv/bin/python bench/curve_check.py --device cuda    # GPU: ResNet32x4 -> ResNet8x4, 300 steps
    .venv/bin/python bench/curve_check.py --fast-amp bf16  # the bf16 comparison on a CPU

Pass criterion: max over windows of |loss_fast - loss_classic| / |loss_classic| <= tolerance, and the
curve must move (first to last window) by more than ``MIN_MOVE_FACTOR`` x the tolerance, or the
comparison could not tell a broken fast path (say, a graph replaying a stale batch) from a working one.

Tolerances. fp32 on both sides (a CPU): the runs differ only in float rounding of the input
normalisation (~1e-7 relative), which a dozen SGD steps amplify to well under 1e-5, so per-step
(w = 1) rel 1e-4 is tight yet safe. bf16 fast path: bf16 keeps 8 significant bits, so each rounding
is up to 2^-9 ~ 0.2% relative; through the network the logits differ by about 0.5-1%, the loss
by less, and over S steps the two SGD trajectories drift apart a little more. Averaging over windows
of w = 10 steps removes the per-batch noise both runs share, leaving the systematic difference, which
stays under 1%; the tolerance of 2% leaves head-room for that drift while an actual fault (stale
inputs, a skipped optimiser step, a wrong bank or loss weight) moves the curve by far more.

Output: one JSON object (curves, differences, pass/fail, command, environment) and a table; exit
status 0 on pass, 1 on fail. ``--out FILE`` also writes the JSON to FILE.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/throughput.py (shared run builder)

import throughput as tp  # noqa: E402

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 0.02
MIN_MOVE_FACTOR = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--pair", choices=("paper", "tiny"), help="paper = ResNet32x4 -> ResNet8x4 (default on CUDA), tiny (default on CPU)")
    p.add_argument("--fast-amp", default="auto", choices=("auto", "bf16", "off"), help="trainer.amp of the fast run")
    p.add_argument("--steps", type=int, help="training steps per run (default: 300 on CUDA; CPU 12, 60 with bf16)")
    p.add_argument("--window", type=int, help="steps per compared window (default: 1 for fp32, 10 for bf16)")
    p.add_argument("--tolerance", type=float, help=f"max relative window difference (default {FP32_TOLERANCE} fp32, {BF16_TOLERANCE} bf16)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num-train", type=int, help="training-set (= bank) size (default 10000 on CUDA, 1024 on CPU)")
    p.add_argument("--classic-workers", type=int, help="DataLoader workers of the classic run (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1 on a CPU: robust on a busy shared machine)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="extra Hydra override for both runs (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the JSON result to this file")
    return p.parse_args(argv)


def train_curve(config: dict[str, Any], data, device: torch.device, folder: Path, seed: int, windows: int, window: int) -> dict[str, Any]:
    """Train ``windows`` x ``window`` steps; the mean loss (and loss components) of every window."""
    trainer = tp.build_trainer(config, data, device, folder, seed)
    loader = trainer.train_loader
    if window > len(loader):
        raise ValueError(f"--window {window} is larger than an epoch ({len(loader)} batches); lower it or raise --num-train")
    loader.set_epoch(0)
    x, y, idx = next(iter(loader))  # the first batch, to show both pipelines feed the same data
    first_batch = (x.float().cpu(), y.cpu(), idx.cpu())
    trainer.fill_banks()
    losses: list[float] = []
    components: dict[str, list[float]] = {}
    trainer.cfg.max_batches_per_epoch = window
    for epoch in range(windows):
        metrics = trainer.train_epoch(epoch)
        losses.append(float(metrics["train/loss"]))
        for key, value in metrics.items():
            name = key.removeprefix("train/")
            if key.startswith("train/") and name not in ("loss", "top1"):
                components.setdefault(name, []).append(float(value))
    info = tp.step_info(trainer)
    del trainer
    tp.release(device)
    return {"losses": losses, "components": components, "first_batch": first_batch, **info}


def relative_diffs(reference: list[float], other: list[float]) -> list[float]:
    return [abs(b - a) / max(abs(a), 1e-12) for a, b in zip(reference, other)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = tp.resolve_device(args.device)
    cuda = device.type == "cuda"
    threads = args.threads or (None if cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    bf16 = args.fast_amp == "bf16" or (args.fast_amp == "auto" and cuda)
    pair = args.pair or ("paper" if cuda else "tiny")
    window = args.window or (10 if bf16 else 1)
    steps = args.steps or (300 if cuda else (60 if bf16 else 12))
    if steps % window:
        raise SystemExit(f"--steps {steps} must be a multiple of --window {window}")
    tolerance = args.tolerance if args.tolerance is not None else (BF16_TOLERANCE if bf16 else FP32_TOLERANCE)
    num_train = args.num_train or (10000 if cuda else 1024)
    workers = args.classic_workers if args.classic_workers is not None else (4 if cuda else 2)
    common = [
        *(tp.FULL_PAIR if pair == "paper" else tp.SMOKE_PAIR), "distill=ickd",
        *tp.synthetic_cifar100(num_train),
        f"trainer.batch_size={args.batch}", f"trainer.device={device}", "trainer.progress=off", f"seed={args.seed}",
    ]
    started = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ickd-curve-") as tmp:
        folder = Path(tmp)
        base = tp.compose([*common, *args.override])
        data = tp.build_data_from_config(base)
        teacher = tp.random_teacher_checkpoint(base, data.num_classes, data.in_channels, folder)
        for path in ("classic", "fast"):
            overrides = tp.path_overrides(path, workers) + ([f"trainer.amp={args.fast_amp}"] if path == "fast" else [])
            config = tp.compose([*common, f"teacher.checkpoint={teacher}", *overrides, *args.override])
            runs[path] = train_curve(config, data, device, folder / path, args.seed, steps // window, window)
    classic, fast = runs["classic"], runs["fast"]
    (xa, ya, ia), (xb, yb, ib) = classic.pop("first_batch"), fast.pop("first_batch")
    same_batch = bool(torch.equal(ya, yb) and torch.equal(ia, ib))
    input_diff = float((xa - xb).abs().max()) if xa.shape == xb.shape else float("inf")
    diffs = relative_diffs(classic["losses"], fast["losses"])
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    ref = classic["losses"]
    move = abs(ref[-1] - ref[0]) / max(abs(ref[0]), 1e-12)
    failures = []
    if not same_batch:
        failures.append("the two pipelines gave different first batches (labels/indices): they do not follow the same plan")
    if diffs[worst] > tolerance:
        failures.append(f"window {worst} differs by {diffs[worst]:.3g} relative (> {tolerance:g})")
    if move <= MIN_MOVE_FACTOR * tolerance:
        failures.append(f"the reference curve moved only {move:.3g} relative from first to last window (needs > "
                        f"{MIN_MOVE_FACTOR:g} x tolerance to tell the paths apart): train longer (--steps)")
    component_diffs = {
        name: round(max(abs(b - a) for a, b in zip(classic["components"][name], fast["components"].get(name, []))), 6)
        for name in classic["components"] if name in fast["components"]
    }
    env = tp.environment(device)
    result = {
        "kind": "summary", "benchmark": "curve_check", "command": tp.command_line(), "env": env,
        "setup": {"pair": tp.pair_label(base), "method": "ickd", "batch": args.batch, "num_train": num_train,
                  "steps": steps, "window": window, "fast_precision": "bf16" if bf16 else "fp32", "classic_workers": workers,
                  "overrides": args.override},
        "tolerance": tolerance, "max_rel_diff": round(diffs[worst], 8), "worst_window": worst,
        "curve_move": round(move, 6), "same_first_batch": same_batch, "first_batch_max_abs_input_diff": input_diff,
        "component_max_abs_diff": component_diffs,
        "classic": {k: v for k, v in classic.items() if k != "components"},
        "fast": {k: v for k, v in fast.items() if k != "components"},
        "rel_diffs": [round(d, 8) for d in diffs],
        "wall_s": round(time.perf_counter() - started, 1),
        "pass": not failures, "failures": failures,
    }
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n## Loss curve, classic vs fast path ({env['device']}: {env['device_name']}, torch {env['torch']})\n")
    print(f"`{result['command']}`\n")
    print(f"IC-KD, {result['setup']['pair']}, batch {args.batch}, {steps} steps in windows of {window}; "
          f"classic: {classic['pipeline']}/{classic['step']}/{classic['amp']}, fast: {fast['pipeline']}/{fast['step']}/{fast['amp']}"
          f"{'/channels_last' if fast['channels_last'] else ''}; first batch identical: {same_batch} (max input diff {input_diff:.2g}).\n")
    print("| window | classic loss | fast loss | rel diff |\n|---|---|---|---|")
    shown = sorted({0, 1, len(diffs) // 2, worst, len(diffs) - 1})
    for j in shown:
        print(f"| {j} | {classic['losses'][j]:.6f} | {fast['losses'][j]:.6f} | {diffs[j]:.2e} |")
    verdict = "PASS" if result["pass"] else "FAIL: " + "; ".join(failures)
    print(f"\nmax rel diff {diffs[worst]:.3g} (tolerance {tolerance:g}), curve moved {move:.3g}: {verdict}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except tp.ConfigError as exc:  # a bad option or override: the message says what to change
        sys.exit(f"error: {exc}")
