"""Retrieval cost of the memory-bank backends: ms per batch of queries (with self-exclusion).

    .venv/bin/python bench/retrieval.py                 # CPU, the default sizes
    .venv/bin/python bench/retrieval.py --device cuda --sizes 50000x256 1281167x512 --batch 256

Prints one JSON object (machine-readable) and a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from ickd.memory import MemoryBank


def bench_one(backend: str, m: int, d: int, batch: int, k: int, classes: int, device: str, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(m, d, generator=g)
    labels = torch.randint(0, classes, (m,), generator=g)
    logits = torch.randn(m, classes, generator=g)
    bank = MemoryBank(m, d, classes, retriever=backend, device=device)
    for start in range(0, m, 65536):
        idx = torch.arange(start, min(m, start + 65536))
        bank.fill(idx, feats[idx], logits[idx], labels[idx])
    q_idx = torch.randint(0, m, (batch,), generator=g)
    q = feats[q_idx] + 0.1 * torch.randn(batch, d, generator=g)
    q, ql, q_idx = q.to(device), labels[q_idx].to(device), q_idx.to(device)
    for _ in range(3):  # warm-up (IVF training, allocations)
        bank.retrieve(q, k, ql, exclude_indices=q_idx)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        nb = bank.retrieve(q, k, ql, exclude_indices=q_idx)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "backend": backend, "bank": f"{m}x{d}", "batch": batch, "k": k,
        "ms_median": round(times[len(times) // 2], 3), "ms_min": round(times[0], 3),
        "bank_bytes": bank.nbytes, "valid_frac": float(nb.valid.float().mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["20000x64", "50000x256"], help="MxD bank sizes")
    p.add_argument("--backends", nargs="+", default=["torch", "faiss_flat", "faiss_ivf"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    rows = []
    for size in args.sizes:
        m, d = (int(x) for x in size.split("x"))
        for backend in args.backends:
            rows.append(bench_one(backend, m, d, args.batch, args.k, args.classes, args.device, args.repeats))
    report = {
        "benchmark": "retrieval", "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
        "rows": rows,
    }
    print(json.dumps(report))
    print("\n| backend | bank MxD | batch | k | ms/batch (median) | ms (min) | bank MB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['bank']} | {r['batch']} | {r['k']} | {r['ms_median']} | {r['ms_min']} | {r['bank_bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
