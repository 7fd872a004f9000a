"""Packing several trials on one device: aggregate images/s of N concurrent training processes vs one.

Small CIFAR trials leave a big GPU mostly idle at batch 64 (the step is launch-bound), so a sweep can
run several trials per GPU (``ickd launch`` packed tasks). This measures what that buys: for each N,
N separate processes (``--worker`` mode of this script) each build a real run (the same cell as
``bench/throughput.py``: IC-KD, ResNet32x4 -> ResNet8x4, batch 64, fast path, CIFAR-100-shaped
synthetic data, random teacher), fill their bank and warm up, wait at a barrier, then all train T
batches through ``Trainer.train_epoch`` at the same time. Aggregate images/s = all images / (last end
- first start); speedup = aggregate(N) / aggregate(1), efficiency = speedup / N.

    .venv/bin/python bench/packing.py --smoke      # CPU: N = 1, 2, tiny nets, < 60 s
    .venv/bin/python bench/packing.py              # N = 1, 2, 4 on the default device

Each worker gets cpu_count // N torch CPU threads (as packed tasks do; smoke: 1); on CUDA all workers
share the current GPU. Output: one JSON line per N (``"kind": "trials"``), one summary JSON line, a table.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/throughput.py (shared cell builder)

import throughput as tp  # noqa: E402

READY, GO = "READY", "GO"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke: N = 1, 2, tiny nets, a few batches")
    p.add_argument("--trials", nargs="+", type=int, help="values of N (default 1 2 4; smoke 1 2)")
    p.add_argument("--method", default="ickd", choices=tp.METHODS)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--path", default="fast", choices=list(tp.PATHS))
    p.add_argument("--device", default="auto")
    p.add_argument("--num-train", type=int, help="training-set size per trial (default 50000, smoke 1024)")
    p.add_argument("--warmup", type=int, help="warm-up batches per trial (default 20, smoke 2)")
    p.add_argument("--timed", type=int, help="timed batches per trial (default 300, smoke 4)")
    p.add_argument("--classic-workers", type=int, default=2, help="DataLoader workers per trial on the classic path")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="extra Hydra override (repeatable)")
    p.add_argument("--threads-per-trial", type=int,
                   help="torch CPU threads per trial (default: cpu_count // N; smoke 1, robust on a busy shared CPU)")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds allowed for one N (start-up included)")
    p.add_argument("--out", type=Path, help="also write the summary JSON to this file")
    # worker mode (started by the parent)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--teacher-checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.trials = args.trials or ([1, 2] if args.smoke else [1, 2, 4])
    args.num_train = args.num_train or (1024 if args.smoke else 50000)
    args.warmup = args.warmup or (2 if args.smoke else 20)
    args.timed = args.timed or (4 if args.smoke else 300)
    return args


def trial_config(args: argparse.Namespace, device: torch.device, teacher_ckpt: str | None) -> dict[str, Any]:
    overrides = [
        *(tp.SMOKE_PAIR if args.smoke else tp.FULL_PAIR),
        *tp.synthetic_cifar100(args.num_train),
        f"distill={args.method}", f"trainer.batch_size={args.batch}", f"trainer.device={device}",
        "trainer.progress=off", f"seed={args.seed}", *tp.path_overrides(args.path, args.classic_workers),
    ]
    if teacher_ckpt:
        overrides.append(f"teacher.checkpoint={teacher_ckpt}")
    return tp.compose([*overrides, *args.override])


# ---------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> int:
    """One trial: build, fill, warm up, say READY, wait for GO on stdin, time, print one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = tp.resolve_device(args.device)
    config = trial_config(args, device, args.teacher_checkpoint)
    data = tp.build_data_from_config(config)
    with tempfile.TemporaryDirectory(prefix="ickd-pack-") as tmp:
        trainer = tp.build_trainer(config, data, device, Path(tmp), args.seed)
        tp.prepare(trainer, args.warmup, args.timed)
        print(READY, flush=True)
        if sys.stdin.readline().strip() != GO:
            return 3
        start = time.time()
        result = tp.timed_pass(trainer, args.timed)
        end = time.time()
        result.update(start=start, end=end, images=args.timed * args.batch, threads=torch.get_num_threads())
        if device.type == "cuda":
            result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------- parent
class TrialProcess:
    """One worker process; a thread forwards its stdout lines to a queue (no blocking reads here)."""

    def __init__(self, cmd: list[str], stderr) -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)  # end of output

    def read_line(self, deadline: float) -> str:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"trial process {self.proc.pid} did not answer in time (--timeout)") from None
        if line is None:
            raise RuntimeError(f"trial process {self.proc.pid} exited with status {self.proc.wait()}")
        return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()


def run_trials(n: int, args: argparse.Namespace, teacher_ckpt: str, logs: Path) -> dict[str, Any]:
    cpu_threads = args.threads_per_trial or (1 if args.smoke else max(1, (os.cpu_count() or 1) // n))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--teacher-checkpoint", teacher_ckpt,
           "--threads", str(cpu_threads), "--method", args.method, "--batch", str(args.batch), "--path", args.path,
           "--device", args.device, "--num-train", str(args.num_train), "--warmup", str(args.warmup),
           "--timed", str(args.timed), "--classic-workers", str(args.classic_workers), "--seed", str(args.seed)]
    cmd += ["--smoke"] if args.smoke else []
    for o in args.override:
        cmd += ["--override", o]
    procs: list[TrialProcess] = []
    errs = [open(logs / f"n{n}-trial{i}.stderr", "w") for i in range(n)]
    deadline = time.monotonic() + args.timeout
    try:
        for i in range(n):
            procs.append(TrialProcess(cmd, errs[i]))
        for p in procs:  # barrier: every trial built, filled and warmed up
            line = p.read_line(deadline)
            if line != READY:
                raise RuntimeError(f"trial process {p.proc.pid} said {line!r} instead of {READY}")
        for p in procs:
            p.send(GO)
        results = [json.loads(p.read_line(deadline)) for p in procs]
        for p in procs:
            p.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except Exception as exc:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        for f in errs:
            f.close()
        tails = [(logs / f"n{n}-trial{i}.stderr").read_text()[-2000:] for i in range(len(procs))]
        return {"kind": "trials", "n": n, "error": f"{type(exc).__name__}: {exc}", "stderr_tails": tails}
    for f in errs:
        f.close()
    images = sum(r["images"] for r in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "kind": "trials", "benchmark": "packing", "n": n, "threads_per_trial": results[0]["threads"],
        "aggregate_images_per_s": round(images / span, 1), "span_s": round(span, 3),
        "per_trial_images_per_s": [r["images_per_s"] for r in results],
        "start_skew_s": round(max(r["start"] for r in results) - min(r["start"] for r in results), 3),
        "step": results[0].get("step"), "max_memory_gib": [r.get("max_memory_gib") for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    device = tp.resolve_device(args.device)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ickd-pack-") as tmp:
        folder = Path(tmp)
        config = trial_config(args, device, None)
        teacher = tp.random_teacher_checkpoint(config, 100, 3, folder)
        for n in args.trials:
            row = run_trials(n, args, str(teacher), folder)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["n"] == 1 and "error" not in r), None)
    for r in rows:
        if base and "error" not in r:
            r["speedup_vs_1"] = round(r["aggregate_images_per_s"] / base["aggregate_images_per_s"], 2)
            r["efficiency"] = round(r["speedup_vs_1"] / r["n"], 2)
    summary = {
        "kind": "summary", "benchmark": "packing", "command": tp.command_line(), "env": tp.environment(device),
        "setup": {"smoke": args.smoke, "pair": tp.pair_label(config), "method": args.method, "batch": args.batch,
                  "path": args.path, "num_train": args.num_train, "warmup": args.warmup, "timed": args.timed,
                  "overrides": args.override},
        "wall_s": round(time.perf_counter() - started, 1), "rows": rows,
        "failed": sum("error" in r for r in rows),
    }
    print(json.dumps(summary), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    env = summary["env"]
    print(f"\n## Trials per device ({'smoke, ' if args.smoke else ''}{env['device']}: {env['device_name']}, torch {env['torch']})\n")
    print(f"`{summary['command']}`\n")
    print(f"{summary['setup']['pair']}, {args.method}, batch {args.batch}, {args.path} path, {args.timed} timed batches per trial.\n")
    print("| trials N | aggregate images/s | per-trial images/s | speedup vs 1 | efficiency | threads/trial |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['n']} | failed | - | - | - | - |")
            continue
        per = ", ".join(f"{v:,.0f}" for v in r["per_trial_images_per_s"])
        print(f"| {r['n']} | {r['aggregate_images_per_s']:,.0f} | {per} | {r.get('speedup_vs_1', '-')} | {r.get('efficiency', '-')} | {r['threads_per_trial']} |")
    for r in rows:
        if "error" in r:
            print(f"\nFAILED N={r['n']}: {r['error']}\n" + "\n".join(t for t in r["stderr_tails"] if t))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except tp.ConfigError as exc:  # a bad option or override: the message says what to change
        sys.exit(f"error: {exc}")
