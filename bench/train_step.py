"""Images/s of one training step (forward, backward, SGD update, bank retrieval and update) for
CE, KD and IC-KD on the same teacher/student pair, measured through ``Trainer.train_step``.

    .venv/bin/python bench/train_step.py                                   # the demo pair, CPU
    .venv/bin/python bench/train_step.py --teacher resnet32x4 --student resnet8x4 --size 32 \
        --channels 3 --classes 100 --bank 50000 --batch 64 --device cuda  # the paper's pair

Teachers are randomly initialised (speed does not depend on the weights). Prints JSON and a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from ickd.data import build_data
from ickd.distill.methods import create_method
from ickd.distill.paradigms import OfflineDistiller, RetrievalSpec
from ickd.engine.trainer import Trainer, TrainerConfig
from ickd.memory import MemoryBank
from ickd.models import create_model

METHODS = {
    "ce": {"name": "ce", "ce_weight": 1.0},
    "kd": {"name": "kd", "ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0},
    "ickd": {"name": "ickd", "ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0, "picd_weight": 1.0,
             "nicd_weight": 0.5, "warmup_epochs": 0, "tau_r": 0.1, "picd_weighting": "similarity",
             "picd_aggregate": "logits", "nicd_form": "contrastive", "kappa": 0.1, "nicd_weighting": "similarity"},
}


def run(method: str, args: argparse.Namespace, data) -> dict:
    torch.manual_seed(0)
    student_kw = {"widths": args.student_widths} if args.student_widths else {}
    student = create_model(args.student, args.classes, in_channels=args.channels, **student_kw)
    loss = create_method(METHODS[method])
    teacher = create_model(args.teacher, args.classes, in_channels=args.channels) if loss.needs_teacher else None
    bank = retrieval = None
    if loss.needs_bank:
        bank = MemoryBank(data.num_train, teacher.feature_dim, args.classes, retriever=args.backend, device=args.device)
        retrieval = RetrievalSpec(k=args.k)
    distiller = OfflineDistiller(student, loss, retrieval, teacher=teacher, bank=bank).to(args.device)
    cfg = TrainerConfig(epochs=1, batch_size=args.batch, eval_batch_size=512, device=args.device, progress="off", num_workers=0)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(distiller, data, cfg, {"name": "sgd", "lr": 0.05, "schedule": "constant"}, out)
        trainer.fill_banks()
        distiller.train()
        loader = trainer.train_loader
        loader.set_epoch(0)
        batches = list(loader)[: args.warmup + args.steps]
        for x, y, idx in batches[: args.warmup]:
            trainer.train_step(x, y, idx, 0)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x, y, idx in batches[args.warmup :]:
            trainer.train_step(x, y, idx, 0)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    images = args.batch * (len(batches) - args.warmup)
    return {"method": method, "images_per_s": round(images / elapsed, 1), "ms_per_step": round(1e3 * elapsed / (len(batches) - args.warmup), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="resnet14")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--student-widths", type=int, nargs=4, default=[8, 8, 16, 32])
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--bank", type=int, default=20000, help="training-set size N = bank entries")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--backend", default="torch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=["ce", "kd", "ickd"])
    args = p.parse_args()
    if args.student_widths and not args.student.startswith("resnet"):
        args.student_widths = None
    needed = (args.steps + args.warmup) * args.batch
    data = build_data("synthetic", num_classes=args.classes, num_train=args.bank, num_val=16,
                      image_size=args.size, channels=args.channels)
    if data.num_train < needed:
        sys.exit(f"--bank {args.bank} is smaller than (steps + warmup) x batch = {needed}")
    rows = [run(m, args, data) for m in args.methods]
    base = {r["method"]: r for r in rows}
    for r in rows:
        if "kd" in base:
            r["step_time_vs_kd"] = round(base["kd"]["images_per_s"] / r["images_per_s"], 3)
    report = {"benchmark": "train_step", "command": " ".join(["python", *sys.argv]), "device": args.device,
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "pair": f"{args.teacher}->{args.student}{args.student_widths or ''}", "input": f"{args.channels}x{args.size}x{args.size}",
              "batch": args.batch, "bank": args.bank, "k": args.k, "backend": args.backend, "rows": rows}
    print(json.dumps(report))
    print(f"\n{report['pair']}, input {report['input']}, batch {args.batch}, bank {args.bank}, k {args.k}, {args.device}\n")
    print("| method | images/s | ms/step | step time vs KD |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['images_per_s']} | {r['ms_per_step']} | {r.get('step_time_vs_kd', '')} |")


if __name__ == "__main__":
    main()
