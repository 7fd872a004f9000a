"""The checks of bench/gpu_check.sh that no other benchmark makes, and its one summary table.

Subcommands (each prints JSON lines and a table; exit status 1 when a check fails):

    correctness   on one IC-KD run of the fast path (CUDA graph): sync detection
                  (torch.cuda.set_sync_debug_mode("error")) through graph replays and the eager short
                  last batch; gradient pointers the same across the short batch and the next epoch;
                  graph-vs-eager gradients at fp32 with TF32 off (rel < 1e-3); memory growth over 5
                  forced recaptures (< 64 MB)
    interleave    IC-KD/KD step time on the fast path, KD and IC-KD cells interleaved 3x per batch size
    fit           fit() end-to-end images/s next to the step-only images/s of the same run
    replays       asserts the replay counts of a bench/throughput.py --out file: every fast-path cell
                  on CUDA replayed its graph for every timed batch (a silent eager fallback FAILS)
    table         the one table to paste into the README, from the output folder of gpu_check.sh

    .venv/bin/python bench/gpu_check.py correctness --device cuda --out results/correctness.json
    .venv/bin/python bench/gpu_check.py correctness --device cpu --smoke      # CPU stand-ins, seconds

On a CPU (``--device cpu``, what ``GPU_CHECK_SMOKE=1`` runs) the CUDA-only parts use stand-ins, and
each result says which: the graph is :class:`ickd.engine.cpu_graph.CpuReplayGraphStep` (re-runs the
captured body on the static inputs; the test suite's stand-in too), sync detection only checks that the region
runs (a CPU has no device syncs), and memory growth reports the capture count but no bytes.
Runs are built like bench/throughput.py builds its cells (imported, not copied).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (puts the checkout first on sys.path)

from ickd.engine import trainer as trainer_mod  # noqa: E402
from ickd.engine import step as step_mod  # noqa: E402
from ickd.engine.cpu_graph import CpuReplayGraphStep  # noqa: E402

GRAD_REL_TOL = 1e-3
RECAPTURES = 5
RECAPTURE_GROWTH_MB = 64.0
INTERLEAVE_REPEATS = 3


@contextlib.contextmanager
def graph_step_on(device: torch.device) -> Iterator[None]:
    """trainer.step=graph on CUDA; the stand-in on a CPU (restored afterwards)."""
    if device.type == "cuda":
        yield
        return
    saved = step_mod.CudaGraphStep, trainer_mod.Trainer.resolve_step_mode
    step_mod.CudaGraphStep = CpuReplayGraphStep
    trainer_mod.Trainer.resolve_step_mode = lambda self: "graph" if self.cfg.step != "eager" else "eager"
    try:
        yield
    finally:
        step_mod.CudaGraphStep, trainer_mod.Trainer.resolve_step_mode = saved


@contextlib.contextmanager
def sync_errors(device: torch.device) -> Iterator[None]:
    """Any host-device synchronisation inside raises (CUDA); a no-op on a CPU."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---------------------------------------------------------------------------------- building runs
class Runs:
    """Trainers composed like bench/throughput.py's cells, on synthetic CIFAR-shaped data."""

    def __init__(self, device: torch.device, smoke: bool, num_train: int, folder: Path) -> None:
        self.device, self.folder = device, folder
        pair = tp.SMOKE_PAIR if smoke else tp.FULL_PAIR
        self.common = [*pair, *tp.synthetic_cifar100(num_train, num_val=64), f"trainer.device={device}", "trainer.progress=off", "seed=0"]
        base = tp.compose(self.common)
        self.pair = tp.pair_label(base)
        self.data = tp.build_data_from_config(base)
        self.teacher = tp.random_teacher_checkpoint(base, self.data.num_classes, self.data.in_channels, folder)
        self.count = 0

    def trainer(self, method: str, batch: int, overrides: list[str]) -> trainer_mod.Trainer:
        config = tp.compose([*self.common, f"distill={method}", f"teacher.checkpoint={self.teacher}",
                             f"trainer.batch_size={batch}", *tp.path_overrides("fast", 0), *overrides])
        self.count += 1
        return tp.build_trainer(config, self.data, self.device, self.folder / f"run{self.count}")


def grads(trainer) -> list[torch.Tensor | None]:
    """The gradient tensors the optimiser steps on."""
    return [p.grad for group in trainer.optimizer.param_groups for p in group["params"]]


def pointers(trainer) -> list[int]:
    return [g.data_ptr() if g is not None else 0 for g in grads(trainer)]


def rel_diff(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    num = den = 0.0
    for ga, gb in zip(a, b):
        if ga is None or gb is None:
            return float("inf")
        num += float((ga.double() - gb.double()).pow(2).sum())
        den += float(gb.double().pow(2).sum())
    return (num / max(den, 1e-300)) ** 0.5


def epoch_batches(trainer, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    trainer.distiller.train()
    trainer.train_loader.set_epoch(epoch)
    return list(trainer.train_loader)


def allocated_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) / 2**20


def result(name: str, ok: bool, value: Any, threshold: str, note: str = "") -> dict[str, Any]:
    row = {"kind": "check", "check": name, "pass": bool(ok), "value": value, "threshold": threshold, "note": note}
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------------------------- correctness
def check_correctness(runs: Runs, batch: int) -> list[dict[str, Any]]:
    device, cpu = runs.device, runs.device.type != "cuda"
    stand_in = " (CPU stand-in graph)" if cpu else ""
    rows: list[dict[str, Any]] = []
    with graph_step_on(device):
        # 1. The fast path itself (bf16 + channels_last on CUDA): syncs, pointers, recaptures.
        fast = runs.trainer("ickd", batch, [])
        graph = fast.step.graph
        assert graph is not None, "the fast path did not build a graph step"
        fast.fill_banks()
        batches = epoch_batches(fast, 0)
        full = [b for b in batches if b[0].shape[0] == batch]
        short = [b for b in batches if b[0].shape[0] != batch]
        assert short and len(full) >= graph.warmup_steps + 3, "the data must give a short last batch and enough full ones"
        fast.meters.reset()
        n_warm = graph.warmup_steps + 1  # warm-up steps, then capture + first (verified) replay
        for x, y, idx in full[:n_warm]:
            fast.step(x, y, idx, 0)
        captured = graph.captures == 1 and graph.replays == 1 and graph.fallback is None
        rows.append(result("capture", captured, graph.stats(), "1 capture, 1 replay, no fallback",
                           f"mode {graph.mode}{stand_in}" + (f": {graph.fallback}" if graph.fallback else "")))
        ptr0 = pointers(fast)
        error = ""
        try:
            with sync_errors(device):
                for x, y, idx in full[n_warm:] + short:
                    fast.step(x, y, idx, 0)
        except RuntimeError as exc:
            error = str(exc).strip().splitlines()[0]
        replays = graph.replays
        rows.append(result(
            "no host sync in replays + eager short batch", not error and replays == len(full) - graph.warmup_steps,
            error or f"{replays - 1} replays + {len(short)} short eager, no sync", "set_sync_debug_mode('error') raises nothing",
            "CPU: no device syncs exist, only the region is exercised" if cpu else ""))
        ptr_short = pointers(fast)
        fast.check_finite(0)
        fast.train_epoch(1)  # the next epoch: same signature (IC-KD default: no ramp), no recapture
        ptr_next = pointers(fast)
        stable = ptr0 == ptr_short == ptr_next and 0 not in ptr0 and graph.captures == 1
        rows.append(result("gradient pointers stable (short batch, next epoch)", stable,
                           {"params": len(ptr0), "same_after_short": ptr0 == ptr_short, "same_next_epoch": ptr0 == ptr_next,
                            "captures": graph.captures}, "same tensors, 1 capture", stand_in.strip(" ()")))
        before = allocated_mb(device)
        for _ in range(RECAPTURES):
            graph.release()  # forces a recapture (as a new signature would)
            for x, y, idx in full[:n_warm]:
                fast.step(x, y, idx, 1)
        after = allocated_mb(device)
        growth = None if before is None or after is None else round(after - before, 2)
        ok = graph.captures == 1 + RECAPTURES and (growth is None or growth < RECAPTURE_GROWTH_MB)
        rows.append(result(f"memory growth over {RECAPTURES} recaptures (MB)", ok,
                           growth if growth is not None else f"{graph.captures} captures", f"< {RECAPTURE_GROWTH_MB:g} MB",
                           "CPU: captures counted, no device memory to measure" if cpu else f"allocated {before:.1f} -> {after:.1f} MB"))
        del fast, graph
        tp.release(device)

        # 2. Graph vs eager gradients, fp32 with TF32 off, same seed and batches.
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            fp32 = ["trainer.amp=off", "trainer.channels_last=off"]
            a = runs.trainer("ickd", batch, fp32)
            b = runs.trainer("ickd", batch, [*fp32, "trainer.step=eager"])
            assert a.step.graph is not None and b.step.graph is None
            worst, compared = 0.0, 0
            for t in (a, b):
                t.fill_banks()
                t.meters.reset()
            for (xa, ya, ia), (xb, yb, ib) in zip(epoch_batches(a, 0), epoch_batches(b, 0)):
                a.step(xa, ya, ia, 0)
                b.step(xb, yb, ib, 0)
                if a.step.graph.replays:
                    worst, compared = max(worst, rel_diff(grads(a), grads(b))), compared + 1
            ok = compared > 0 and worst < GRAD_REL_TOL and a.step.graph.fallback is None
            rows.append(result("graph vs eager gradients, fp32, TF32 off (max rel)", ok, f"{worst:.2e} over {compared} steps",
                               f"< {GRAD_REL_TOL:g}", stand_in.strip(" ()")))
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return rows


# ---------------------------------------------------------------------------------- interleave, fit
def check_interleave(runs: Runs, batches: list[int], warmup: int | None, timed: int | None, smoke: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    counts_args = argparse.Namespace(smoke=smoke, warmup=warmup, timed=timed)
    for batch in batches:
        w, t = tp.batch_counts(counts_args, batch)
        ms: dict[str, list[float]] = {"kd": [], "ickd": []}
        for rep in range(INTERLEAVE_REPEATS):
            for method in ("kd", "ickd"):
                trainer = runs.trainer(method, batch, [])
                cell = tp.measure(trainer, w, t)
                ms[method].append(cell["ms_per_step"])
                replays_ok = runs.device.type != "cuda" or (cell.get("graph_replays") == t and cell.get("eager_steps") == 0)
                print(json.dumps({"kind": "cell", "benchmark": "interleave", "rep": rep, "method": method, "batch": batch,
                                  **cell}), flush=True)
                if not replays_ok:
                    rows.append(result(f"interleave b{batch} {method} rep {rep} replays", False, cell.get("graph_replays"),
                                       f"== {t} timed batches, 0 eager"))
                del trainer
                tp.release(runs.device)
        ratios = [i / k for i, k in zip(ms["ickd"], ms["kd"])]
        med = statistics.median(ratios)
        applies = runs.device.type == "cuda" and not smoke
        rows.append(result(f"IC-KD/KD step time b{batch} (median of {INTERLEAVE_REPEATS}, interleaved)",
                           med <= 1.05 or not applies, round(med, 3), "<= 1.05" + ("" if applies else " (not judged on CPU/smoke)"),
                           "ratios " + ", ".join(f"{r:.3f}" for r in ratios) + "; ms kd " + ", ".join(map(str, ms["kd"]))
                           + " / ickd " + ", ".join(map(str, ms["ickd"]))))
    return rows


def check_fit(runs: Runs, batch: int, epochs: int, batches: int) -> list[dict[str, Any]]:
    """fit() end-to-end (epochs of ``batches`` batches, evaluation and checkpoints included) vs the
    step-only images/s (the trainer's own time/images_per_s of the same epochs)."""
    trainer = runs.trainer("ickd", batch, [f"trainer.epochs={epochs}", f"trainer.max_batches_per_epoch={batches}"])
    tp.sync(runs.device)
    t0 = time.perf_counter()
    trainer.fit()
    tp.sync(runs.device)
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (trainer.out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    step = [m["time/images_per_s"] for m in lines if "time/images_per_s" in m]
    images = epochs * batches * batch
    fit_ips = images / wall
    step_ips = statistics.median(step) if step else float("nan")
    modes = sorted({str(m.get("step_mode")) for m in lines if "step_mode" in m})
    ok = runs.device.type != "cuda" or modes == ["graph"]  # fit() on CUDA must not have fallen back to eager
    row = result("fit() overhead: end-to-end vs step-only images/s", ok, round(fit_ips / step_ips, 3),
                 "reported (fit / step); step_mode graph on CUDA", f"fit {fit_ips:.0f} img/s incl. bank fill, eval, checkpoints; "
                 f"step-only {step_ips:.0f} img/s ({epochs} epochs x {batches} batches of {batch}); step_mode {'/'.join(modes) or '-'}")
    del trainer
    tp.release(runs.device)
    return [row]


# ---------------------------------------------------------------------------------- replays, table
def check_replays(path: Path, require_graph: bool) -> list[dict[str, Any]]:
    summary = json.loads(path.read_text())
    rows = []
    for cell in summary.get("cells", []):
        if cell.get("path") != "fast":
            continue
        name = f"throughput {cell['method']} b{cell['batch']} fast: graph replays"
        if "error" in cell:
            rows.append(result(name, False, cell["error"].strip().splitlines()[0], "no error"))
        elif require_graph:
            t = cell["timed_batches"]
            ok = cell.get("step") == "graph" and cell.get("graph_replays") == t and cell.get("eager_steps") == 0
            rows.append(result(name, ok, f"{cell.get('graph_replays')} replays, {cell.get('eager_steps')} eager",
                               f"{t} replays, 0 eager"))
        else:
            rows.append(result(name, True, f"step {cell.get('step')}", "not judged (CPU: no graph)"))
    if not rows:
        rows.append(result("throughput fast cells", False, 0, "at least one"))
    return rows


def table(folder: Path) -> int:
    """One markdown table of every check and target in ``folder`` (gpu_check.sh's output)."""
    env: dict[str, Any] = {}
    rows: list[tuple[str, str, str, str]] = []
    for name in ("correctness", "throughput_replays", "interleave", "fit"):
        f = folder / f"{name}.jsonl"
        for line in f.read_text().splitlines() if f.exists() else []:
            d = json.loads(line)
            if d.get("kind") == "check":
                rows.append((d["check"], "PASS" if d["pass"] else "FAIL", str(d["value"]), d["threshold"]))
            elif d.get("kind") == "summary":
                env = d.get("env", env)
    curve = folder / "curve_check.json"
    if curve.exists():
        c = json.loads(curve.read_text())
        rows.insert(0, ("loss curve, classic vs fast path (max rel diff)", "PASS" if c.get("pass") else "FAIL",
                        str(c.get("max_rel_diff")), f"<= {c.get('tolerance')}"))
    tput = folder / "throughput.json"
    if tput.exists():
        s = json.loads(tput.read_text())
        env = s.get("env", env)
        for c in s.get("cells", []):
            if "images_per_s" in c:
                rows.append((f"{c['method']} b{c['batch']} {c['path']} images/s", "-", f"{c['images_per_s']:.0f}",
                             f"{c.get('graph_replays', '-')} replays"))
        for t in s.get("targets", []):
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t.get("pass")]
            rows.append((t.get("what", t.get("name")), verdict, str(t.get("value")), f"{t.get('op', '')} {t.get('threshold', '')}"))
    for line in ((folder / "retrieval.jsonl").read_text().splitlines() if (folder / "retrieval.jsonl").exists() else []):
        d = json.loads(line)
        if d.get("kind") == "row":
            value = f"{d['ms_median']} ms/batch" if "ms_median" in d else str(d.get("skipped") or d.get("error") or "-")
            rows.append((f"retrieval {d.get('device')} {d.get('backend')} {d.get('bank')} x {d.get('queries')} queries", "-",
                         value, "reported"))
    parts = folder / "parts.txt"  # gpu_check.sh's status line per part ("name: ok (12s)", "name: FAILED ...")
    for i, line in enumerate(parts.read_text().splitlines() if parts.exists() else []):
        name, _, status = line.partition(": ")
        rows.insert(i, (f"part {name}", "PASS" if status.startswith("ok") else "FAIL", status, "ok within its budget"))
    smi = folder / "nvidia-smi.txt"
    driver = re.search(r"Driver Version:\s*(\S+)", smi.read_text()) if smi.exists() else None
    card = env.get("device_name", "?")
    print(f"\n## GPU check: {card} (torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}"
          f"{', driver ' + driver.group(1) if driver else ''}, commit {str(env.get('commit'))[:10]})\n")
    print("| check | result | value | threshold |\n|---|---|---|---|")
    for r in rows:
        cells = [" ".join(x.split()).replace("|", "/") for x in r]
        cells[2] = cells[2] if len(cells[2]) <= 160 else cells[2][:157] + "..."
        print("| " + " | ".join(cells) + " |")
    return 0


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["correctness", "interleave", "fit", "replays", "table"])
    p.add_argument("path", nargs="?", type=Path, help="replays: throughput.py --out file; table: gpu_check.sh's folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny nets and data (the CPU smoke run)")
    p.add_argument("--batches", type=int, nargs="+", help="interleave: batch sizes (default 64 512; smoke 16)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--timed", type=int)
    p.add_argument("--require-graph", action="store_true", help="replays: fast cells must have replayed (CUDA)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.what == "table":
        return table(args.path)
    if args.what == "replays":
        rows = check_replays(args.path, args.require_graph)
    else:
        if args.smoke:
            torch.set_num_threads(1)
        device = tp.resolve_device(args.device)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ickd-gpucheck-") as tmp:
            if args.what == "correctness":
                batch = 16 if args.smoke else 64
                runs = Runs(device, args.smoke, 8 * batch + batch // 2, Path(tmp))  # 8 full batches + a short one
                rows = check_correctness(runs, batch)
            elif args.what == "interleave":
                batches = args.batches or ([16] if args.smoke else list(tp.BATCHES))
                runs = Runs(device, args.smoke, 256 if args.smoke else 50000, Path(tmp))
                rows = check_interleave(runs, batches, args.warmup, args.timed, args.smoke)
            else:
                batch = 16 if args.smoke else 64
                runs = Runs(device, args.smoke, 256 if args.smoke else 50000, Path(tmp))
                rows = check_fit(runs, batch, epochs=2, batches=4 if args.smoke else 200)
        print(json.dumps({"kind": "summary", "benchmark": f"gpu_check {args.what}", "command": tp.command_line(),
                          "env": tp.environment(device), "pair": runs.pair, "wall_s": round(time.perf_counter() - started, 1)}),
              flush=True)
    failed = [r for r in rows if not r["pass"]]
    print("\n| check | result | value | threshold | note |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {'PASS' if r['pass'] else 'FAIL'} | {r['value']} | {r['threshold']} | {r['note']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if failed:
        print(f"\nFAILED: {', '.join(r['check'] for r in failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
