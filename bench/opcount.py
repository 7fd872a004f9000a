"""ATen ops dispatched by one fast-path training step, per method, on CPU (issue 12, "kernel diet").

At batch 64 a CIFAR step on a GPU is bound by kernel launches, so the number of ops one step
dispatches is the CPU-measurable proxy for its GPU time. This counts, with a
``TorchDispatchMode``, every ATen op of the step body a CUDA graph captures
(``TrainStep.body``: forward of teacher and student, retrieval, losses, backward, bank write,
epoch meters) under bf16 autocast with the autocast cache off (as under a graph) and channels_last
inputs and weights, plus, separately, the optimiser step that runs after each replay. The counted
step runs as in a capture (``fastpath.simulated_capture``: no per-step host checks) with the
retrieval backend a GPU run picks (``memory.backend=torch``).

Setup: ``experiment=cifar100/res32x4_res8x4`` recipe (SGD, the configs/distill defaults, k = 16) on
CIFAR-100-shaped synthetic data; the bank holds the whole training set (``--num-train``, default
4096). ``--small`` swaps in tiny ResNet8 nets (fewer layers and channels: smaller counts, seconds to run;
for quick before/after checks). One warm-up step runs first (lazy state such as the optimiser's momentum buffers), then
one counted step at ``--epoch`` (default 0; the bank is pass-filled, so epoch 0 is a normal step).

    python bench/opcount.py                      # the table: CE / KD / DKD / IC-KD, batch 64
    python bench/opcount.py --small --methods kd ickd
    python bench/opcount.py --baseline all       # every optimisation of issue 12 switched off
    python bench/opcount.py --baseline meters    # one switched off (see OPTIMISATIONS)

Output: one JSON line per method, one summary JSON line (command, environment, IC-KD/KD ratio),
then a markdown table. ``--by-op`` adds the per-op histogram of each method to its JSON line.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without install

from ickd import fastpath  # noqa: E402
from ickd.config_store import compose_run_config  # noqa: E402
from ickd.distill import build_distiller  # noqa: E402
from ickd.engine.run import build_data_from_config, to_container  # noqa: E402
from ickd.engine.trainer import Trainer, TrainerConfig, seed_everything  # noqa: E402
from ickd.models import create_model  # noqa: E402

METHODS = ("ce", "kd", "dkd", "ickd")
#: Ops that only make a new view of existing storage (no kernel on a GPU).
VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "as_strided", "alias", "detach",
    "squeeze", "unsqueeze", "select", "slice", "split", "unbind", "view_as", "_reshape_alias", "flatten",
    "split_with_sizes", "narrow", "diagonal", "unfold", "numpy_T", "lift_fresh", "_to_copy_noop",
}
SMALL_PAIR = ["teacher=resnet8", "+teacher.kwargs.widths=[8,8,16,32]",
              "student=resnet8", "+student.kwargs.widths=[4,4,8,16]"]


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def totals(self) -> dict[str, int]:
        total = sum(self.ops.values())
        views = sum(n for name, n in self.ops.items() if name in VIEW_OPS)
        return {"ops": total, "view_ops": views, "kernel_ops": total - views}


def build(method: str, args, folder: Path, data, base_overrides: list[str]) -> Trainer:
    config = to_container(compose_run_config([*base_overrides, f"distill={method}", f"teacher.checkpoint={folder / 'teacher.pt'}"]))
    trainer_cfg = TrainerConfig.from_mapping(config["trainer"])
    seed_everything(args.seed, trainer_cfg.deterministic)
    distiller = build_distiller(config, data.num_classes, data.in_channels, data.num_train, torch.device("cpu"))
    trainer = Trainer(distiller, data, trainer_cfg, config["optim"], folder / method, seed=args.seed, run_config=config,
                      device=torch.device("cpu"))
    # What a CUDA graph runs: bf16 autocast with the weight-cast cache off (cached casts would be stale).
    trainer.step.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    trainer.fill_banks()
    return trainer


def count(trainer: Trainer, batch: int, epoch: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, trainer.data.num_classes, (batch,), generator=gen)
    idx = torch.randperm(trainer.data.num_train, generator=gen)[:batch]
    trainer.meters.reset()
    fastpath.prepare_epoch(trainer.distiller, epoch)
    step = trainer.step
    step.zero_grad(True)
    step.body(x, y, idx, epoch)  # warm-up: lazy meters, optimiser state
    step.finish()
    # As at capture: gradients start as None, so the backward writes them (AccumulateGrad keeps the
    # incoming tensor) instead of adding into existing ones (one add_ per parameter).
    step.zero_grad(True)
    # As in a capture: per-step host checks (range checks of the bank's indices on CPU) are off.
    with fastpath.simulated_capture(), OpCounter() as body:
        step.body(x, y, idx, epoch)
    with OpCounter() as opt:
        step.finish()
    return {"body": body, "optimizer": opt}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=4096, help="training-set size = bank entries")
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny ResNet8 pair (same op structure, faster)")
    parser.add_argument("--baseline", nargs="*", default=[], metavar="OPT",
                        help=f"switch optimisations off: any of {', '.join(fastpath.OPTIMISATIONS)} or 'all'")
    parser.add_argument("--by-op", action="store_true", help="add the per-op histogram to each JSON line")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    off = set(fastpath.OPTIMISATIONS) if "all" in args.baseline else set(args.baseline)
    unknown = off - set(fastpath.OPTIMISATIONS)
    if unknown:
        parser.error(f"unknown optimisation(s): {sorted(unknown)}; known: {list(fastpath.OPTIMISATIONS)}")
    fastpath.configure({name: name not in off for name in fastpath.OPTIMISATIONS})

    overrides = ["experiment=cifar100/res32x4_res8x4", *(SMALL_PAIR if args.small else []),
                 "dataset=synthetic", "dataset.kwargs.num_classes=100", f"dataset.kwargs.num_train={args.num_train}",
                 "dataset.kwargs.num_val=64", "dataset.kwargs.image_size=32", "dataset.kwargs.channels=3",
                 "trainer.device=cpu", "trainer.progress=off", "trainer.step=eager", "trainer.amp=bf16",
                 "trainer.channels_last=on", "trainer.pipeline=device", f"trainer.batch_size={args.batch}",
                 # What memory.backend=auto picks on a GPU for a bank below 1M entries (on CPU it
                 # would pick faiss above 2^20 floats).
                 "memory.backend=torch",
                 f"seed={args.seed}", *args.override]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ickd-opcount-") as tmp:
        folder = Path(tmp)
        base = to_container(compose_run_config(overrides))
        data = build_data_from_config(base)
        torch.manual_seed(0)
        spec = base["teacher"]
        net = create_model(str(spec["name"]), data.num_classes, in_channels=data.in_channels, **dict(spec.get("kwargs") or {}))
        torch.save({"model": net.state_dict()}, folder / "teacher.pt")
        for method in args.methods:
            trainer = build(method, args, folder, data, overrides)
            counted = count(trainer, args.batch, args.epoch, args.seed)
            body, opt = counted["body"].totals(), counted["optimizer"].totals()
            row = {"kind": "method", "benchmark": "opcount", "method": method, "body_ops": body["ops"],
                   "body_kernel_ops": body["kernel_ops"], "optimizer_ops": opt["ops"],
                   "step_ops": body["ops"] + opt["ops"]}
            if args.by_op:
                row["by_op"] = dict(counted["body"].ops.most_common())
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {r["method"]: r for r in rows}
    ratio = round(by["ickd"]["body_ops"] / by["kd"]["body_ops"], 3) if "kd" in by and "ickd" in by else None
    kernel_ratio = round(by["ickd"]["body_kernel_ops"] / by["kd"]["body_kernel_ops"], 3) if ratio is not None else None
    summary = {
        "kind": "summary", "benchmark": "opcount", "command": shlex.join([sys.executable, *sys.argv]),
        "torch": torch.__version__, "python": platform.python_version(), "pair": "small" if args.small else "resnet32x4->resnet8x4",
        "batch": args.batch, "bank_entries": args.num_train, "optimisations_off": sorted(off),
        "ickd_over_kd_body_ops": ratio, "ickd_over_kd_body_kernel_ops": kernel_ratio,
        "targets": {"ickd_over_kd<=1.15": None if ratio is None else ratio <= 1.15,
                    "kd_body_ops<357": by["kd"]["body_ops"] < 357 if "kd" in by else None},
    }
    print(json.dumps(summary), flush=True)
    print()
    print(f"| method | body ops (captured step) | body ops w/o views | optimiser ops (eager, CPU foreach) |  off: {sorted(off) or 'none'}")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['body_ops']} | {r['body_kernel_ops']} | {r['optimizer_ops']} |")
    if ratio is not None:
        print(f"\nIC-KD / KD body ops: {ratio} (w/o views: {kernel_ratio})")
    print(f"\nreproduce: {summary['command']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
