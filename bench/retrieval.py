"""Memory-bank retrieval cost per backend: ms per batch of queries, plus recall@k against exact search.

Every measurement goes through ``MemoryBank.retrieve`` with self-exclusion and top-k (default 16), so
it measures what a training step runs: the similarity search, the eligibility mask, the gather of
the neighbours' logits and labels. Features are synthetic but class-structured (one random centre
per class plus noise, L2-normalised), so nearest neighbours mean something and IVF recall is not
that of uniform noise; each query is a bank entry plus a small perturbation (an augmented view of a
training image) and excludes its own entry.

    .venv/bin/python bench/retrieval.py --smoke           # small sizes, < 60 s on 2 CPU cores
    .venv/bin/python bench/retrieval.py                   # paper sizes: 50,000x256 (64 and 512
                                                          # queries), 1,281,167x512 (256 queries)
    .venv/bin/python bench/retrieval.py --devices cpu --sizes 50000x256:64 --backends torch faiss_flat

Devices: ``cpu`` always, ``cuda`` too when a CUDA device is present (``--devices`` to choose). On
CUDA the torch backend uses an fp16 bank (the fast path); the faiss backends run on the GPU
(``use_gpu=True``, float32 bank) when faiss was built with GPUs, else their rows are skipped with
the reason.

Columns: ``ms_median``/``ms_min`` per retrieval of one query batch, each preceded (untimed, reported
as ``update_ms``) by the write-back of that batch as a training step does, so stateful backends pay
their per-write upkeep (IVF list updates) inside the timed retrieval. ``first_ms`` is the first
retrieval of a fresh bank: it includes the IVF k-means training, which the default
``retrain_every`` = M repeats about once per epoch; ``ms_incl_retrain`` (IVF) spreads it over the
M / queries batches of an epoch. ``recall_at_k`` is the mean fraction of the exact float32 top-k
(same self-exclusion) that a backend returns; ``exact_purity`` the fraction of that exact top-k
sharing the query's label (how hard the synthetic data is). ``load_avg_1min``: other processes on
the machine (timings under load are slower and noisier).

Output: one JSON line per row (``"kind": "row"``), then one summary JSON line (``"kind": "summary"``:
command, device names, versions, threads, fastest exact backend per case), then a markdown table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ickd.memory import MemoryBank  # noqa: E402

BACKENDS = ("torch", "faiss_flat", "faiss_ivf")
SMOKE_CASES = ("20000x256:64", "100000x128:256")
FULL_CASES = ("50000x256:64", "50000x256:512", "1281167x512:256")
QUERY_NOISE = 0.1  # perturbation of a query relative to its bank entry (an augmented view)
# Noise norm relative to the class centre's at D = 256, scaled by (D / 256) ** 0.25 so that the
# neighbour structure is about as hard at every D (the class gap grows like D, the noise in distances
# like noise**2 * sqrt(D)). At 2.75, about 70% of the exact top-16 share the query's label at 50,000 x
# 256 with 100 classes, roughly a CIFAR-100 teacher's k-NN accuracy. Each row reports it (exact_purity).
WITHIN_CLASS_NOISE = 2.75


@dataclass(frozen=True)
class Case:
    """One benchmark geometry: bank of M entries of dimension D, searched by a batch of queries."""

    m: int
    d: int
    queries: int

    @property
    def label(self) -> str:
        return f"{self.m}x{self.d}"

    @classmethod
    def parse(cls, text: str) -> "Case":
        try:
            shape, queries = text.split(":") if ":" in text else (text, "256")
            m, d = (int(x) for x in shape.lower().split("x"))
            case = cls(m, d, int(queries))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not MxD[:QUERIES], e.g. 50000x256:64") from None
        if min(case.m, case.d, case.queries) <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: M, D and QUERIES must be positive")
        return case


# ---------------------------------------------------------------------------------------- data
def synthetic_bank(case: Case, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, D) float32 L2-normalised class-structured features and their (M,) labels, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (case.m,), generator=g)
    centres = torch.randn(classes, case.d, generator=g)
    feats = torch.empty(case.m, case.d)
    scale = WITHIN_CLASS_NOISE * (case.d / 256) ** 0.25
    for start in range(0, case.m, 65536):  # chunks: no second (M, D) temporary
        stop = min(case.m, start + 65536)
        noise = torch.randn(stop - start, case.d, generator=g) * scale
        feats[start:stop] = F.normalize(centres[labels[start:stop]] + noise, dim=1)
    return feats, labels


def synthetic_queries(feats: torch.Tensor, labels: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """n queries: bank entries plus a small perturbation; returns (queries, labels, sample indices)."""
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, feats.shape[0], (n,), generator=g)
    noise = torch.randn(n, feats.shape[1], generator=g) / feats.shape[1] ** 0.5
    return F.normalize(feats[idx] + QUERY_NOISE * noise, dim=1), labels[idx], idx


def exact_reference(feats: torch.Tensor, q: torch.Tensor, q_idx: torch.Tensor, k: int, device: str) -> torch.Tensor:
    """(B, k) sample indices of the exact float32 top-k with self-exclusion, chunked over the bank.

    Independent of the bank's code (no MemoryBank, no backend), so recall checks the backends."""
    qd = q.to(device)
    best_sims = torch.full((q.shape[0], k), float("-inf"), device=device)
    best_idx = torch.full((q.shape[0], k), -1, dtype=torch.long, device=device)
    own = q_idx.to(device).unsqueeze(1)
    for start in range(0, feats.shape[0], 131072):
        block = feats[start:start + 131072].to(device)
        sims = qd @ block.T
        cols = torch.arange(start, start + block.shape[0], device=device)
        sims.masked_fill_(cols.unsqueeze(0) == own, float("-inf"))
        merged_sims = torch.cat([best_sims, sims], dim=1)
        merged_idx = torch.cat([best_idx, cols.expand(q.shape[0], -1)], dim=1)
        best_sims, pos = merged_sims.topk(k, dim=1)
        best_idx = merged_idx.gather(1, pos)
    return best_idx.cpu()


def recall_at_k(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over rows of |got_row & ref_row| / k (sample indices; -1 never matches)."""
    hits = ((got.unsqueeze(2) == ref.unsqueeze(1)) & (got >= 0).unsqueeze(2)).any(dim=2).sum(dim=1)
    return float((hits.float() / ref.shape[1]).mean())


# ---------------------------------------------------------------------------------------- timing
def import_faiss() -> Any:
    """The faiss module, or None when it is not installed (its rows are then skipped)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_skip_reason(device: str) -> str | None:
    """None when the faiss backends can be measured on ``device``, else why not."""
    faiss = import_faiss()
    if faiss is None:
        return "faiss is not installed (pip install 'ickd[faiss-cpu]', or 'ickd[faiss-gpu]' for GPU search)"
    if device != "cuda":
        return None
    if not hasattr(faiss, "StandardGpuResources"):
        return f"faiss {faiss.__version__} has no GPU support (faiss-cpu); install 'ickd[faiss-gpu]' instead to measure faiss on GPU"
    if faiss.get_num_gpus() == 0:
        return "faiss sees no GPU"
    return None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    case: Case, backend: str, device: str, data: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """Build a bank on ``device`` with ``backend``, fill it, time ``retrieve``; one result row."""
    row: dict[str, Any] = {
        "kind": "row", "device": device, "backend": backend, "bank": case.label, "m": case.m,
        "d": case.d, "queries": case.queries, "k": args.k,
    }
    kwargs: dict[str, Any] = {}
    dtype = torch.float32
    if backend != "torch":
        reason = faiss_skip_reason(device)
        if reason:
            return {**row, "skipped": reason}
        if device == "cuda":
            kwargs["use_gpu"] = True
    elif device == "cuda":
        dtype = torch.float16
    if backend == "faiss_ivf":
        kwargs.update({key: v for key, v in (("nlist", args.nlist), ("nprobe", args.nprobe)) if v is not None})
    row["bank_dtype"] = str(dtype).removeprefix("torch.")

    feats, labels = data["feats"], data["labels"]
    bank = MemoryBank(case.m, case.d, args.classes, retriever=backend, retriever_kwargs=kwargs,
                      feature_dtype=dtype, device=device)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed + 2)
    for start in range(0, case.m, 65536):
        idx = torch.arange(start, min(case.m, start + 65536))
        logits = torch.randn(idx.shape[0], args.classes, generator=g)
        bank.fill(idx, feats[idx], logits, labels[idx])
    sync(device)
    row["fill_s"] = round(time.perf_counter() - t0, 3)
    q, ql, qi = (data[key].to(device) for key in ("q", "q_labels", "q_idx"))

    # Each step of training writes its batch back before the next retrieval (update=overwrite); the
    # same vectors are written here so the exact reference stays valid, but stateful backends (IVF
    # lists, host mirrors) still pay their per-write upkeep inside the timed retrieval.
    write_idx = data["q_idx"].to(device)
    write_feats, write_labels = feats[data["q_idx"]].to(device), ql
    write_logits = torch.randn(case.queries, args.classes, generator=g).to(device)

    def once(write: bool) -> tuple[float, float, Any]:
        sync(device)
        start = time.perf_counter()
        if write:
            bank.update(write_idx, write_feats, write_logits, write_labels)
        sync(device)
        mid = time.perf_counter()
        nb = bank.retrieve(q, args.k, ql, exclude_indices=qi)
        sync(device)
        return (time.perf_counter() - mid) * 1e3, (mid - start) * 1e3, nb

    row["first_ms"], _, nb = once(write=False)  # IVF k-means training, host mirror, allocator warm-up
    once(write=True)
    times: list[float] = []
    update_times: list[float] = []
    began = time.perf_counter()
    # Stop before M writes: the k-means re-training they trigger is accounted for by ms_incl_retrain.
    reps = min(args.repeats, max(3, case.m // case.queries - 2))
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - began < args.max_seconds):
        ms, update_ms, nb = once(write=True)
        times.append(ms)
        update_times.append(update_ms)
    times.sort()
    update_times.sort()
    row.update({
        "ms_median": round(times[len(times) // 2], 3),
        "ms_min": round(times[0], 3),
        "us_per_query": round(1e3 * times[len(times) // 2] / case.queries, 2),
        "update_ms": round(update_times[len(update_times) // 2], 3),
        "first_ms": round(row["first_ms"], 3),
        "reps": len(times),
        "recall_at_k": round(recall_at_k(nb.sample_indices.cpu(), data["reference"]), 4),
        "valid_frac": round(float(nb.valid.float().mean()), 4),
        "exact_purity": round(data["purity"], 3),
        "bank_mb": round(bank.nbytes / 2**20, 1),
        "load_avg_1min": round(os.getloadavg()[0], 2),  # other processes on the machine
    })
    if backend == "faiss_ivf":
        row["nlist"], row["nprobe"] = bank.retriever.nlist, bank.retriever.nprobe
        # k-means re-training every retrain_every (= M) writes, i.e. once per epoch of M queries.
        row["ms_incl_retrain"] = round(row["ms_median"] + row["first_ms"] * case.queries / case.m, 3)
    return row


# ---------------------------------------------------------------------------------------- report
def environment(devices: list[str]) -> dict[str, Any]:
    faiss = import_faiss()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    names = {"cpu": f"{cpu} ({os.cpu_count()} logical cores)"}
    if "cuda" in devices:
        names["cuda"] = torch.cuda.get_device_name()
    return {
        "device_names": names,
        "torch": torch.__version__,
        "faiss": faiss.__version__ if faiss else None,
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads() if faiss else None,
        "python": platform.python_version(),
        # Other processes share the cores: timings taken under load are slower and noisier.
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def command_line() -> str:
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    return shlex.join([python, *sys.argv])


def fastest_exact(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (device, bank, queries): the fastest exact backend and its ms."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r["backend"] == "faiss_ivf" or "ms_median" not in r:
            continue
        key = (r["device"], r["bank"], r["queries"])
        if key not in best or r["ms_median"] < best[key]["ms_median"]:
            best[key] = {"device": r["device"], "bank": r["bank"], "queries": r["queries"],
                         "backend": r["backend"], "ms_median": r["ms_median"]}
    return list(best.values())


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    env = summary["environment"]
    lines = [
        f"Command: `{summary['command']}`",
        "Devices: " + "; ".join(f"{k} = {v}" for k, v in env["device_names"].items()),
        f"torch {env['torch']} ({env['torch_threads']} threads), faiss {env['faiss']} "
        f"({env['faiss_threads']} threads), k = {summary['k']}, {summary['classes']} classes; "
        "recall@k is against exact float32 search; label purity of the exact top-k: "
        + ", ".join(sorted({f"{r['bank']}:{r['queries']} {r['exact_purity']}" for r in rows if "exact_purity" in r})),
        "",
        "| device | backend | bank MxD | dtype | queries | ms/batch (median) | ms (min) | us/query "
        "| first call ms | ms incl. retrain | update ms | recall@k | bank MB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['device']} | {r['backend']} | {r['bank']} | - | {r['queries']} | - | - | - | - | - | - | - | - "
                         f"| skipped: {r['skipped']} |")
            continue
        note = f"nlist={r['nlist']} nprobe={r['nprobe']}" if "nlist" in r else ""
        lines.append(
            f"| {r['device']} | {r['backend']} | {r['bank']} | {r['bank_dtype']} | {r['queries']} | {r['ms_median']} "
            f"| {r['ms_min']} | {r['us_per_query']} | {r['first_ms']:.1f} | {r.get('ms_incl_retrain', '-')} "
            f"| {r['update_ms']} | {r['recall_at_k']:.4f} "
            f"| {r['bank_mb']} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help=f"small sizes ({', '.join(SMOKE_CASES)}), few repeats")
    p.add_argument("--sizes", nargs="+", type=Case.parse, metavar="MxD[:Q]",
                   help=f"bank sizes and query batch (default {' '.join(FULL_CASES)})")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--devices", nargs="+", choices=("cpu", "cuda"),
                   help="default: cpu, plus cuda when a CUDA device is present")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--nlist", type=int, help="faiss_ivf nlist (default: the backend's, about 4 sqrt(M))")
    p.add_argument("--nprobe", type=int, help="faiss_ivf nprobe (default: the backend's, nlist // 8)")
    p.add_argument("--repeats", type=int, help="timed retrievals per row (default 20, smoke 5)")
    p.add_argument("--max-seconds", type=float, help="stop repeating a row after this long (default 10, smoke 1)")
    p.add_argument("--threads", type=int, help="torch and faiss CPU threads (default: as configured)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    cases: list[Case] = args.sizes or [Case.parse(c) for c in (SMOKE_CASES if args.smoke else FULL_CASES)]
    args.repeats = args.repeats or (5 if args.smoke else 20)
    args.max_seconds = args.max_seconds if args.max_seconds is not None else (1.0 if args.smoke else 10.0)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--devices cuda needs a CUDA device, and torch sees none")
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss = import_faiss()
        if faiss is not None:
            faiss.omp_set_num_threads(args.threads)

    rows: list[dict[str, Any]] = []
    datasets: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for case in cases:
        if (case.m, case.d) not in datasets:
            datasets.clear()  # one (M, D) feature set in memory at a time
            datasets[(case.m, case.d)] = synthetic_bank(case, args.classes, args.seed)
        feats, labels = datasets[(case.m, case.d)]
        q, q_labels, q_idx = synthetic_queries(feats, labels, case.queries, args.seed)
        for device in devices:
            reference = exact_reference(feats, q, q_idx, args.k, device)
            data = {"feats": feats, "labels": labels, "q": q, "q_labels": q_labels, "q_idx": q_idx,
                    "reference": reference, "purity": float((labels[reference] == q_labels[:, None]).float().mean())}
            for backend in args.backends:
                row = measure(case, backend, device, data, args)
                gc.collect()  # the row's bank is garbage now: free it before building the next
                if device == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)

    summary = {
        "kind": "summary", "benchmark": "retrieval", "command": command_line(), "smoke": args.smoke,
        "k": args.k, "classes": args.classes, "environment": environment(devices),
        "rows": len(rows), "fastest_exact": fastest_exact(rows),
    }
    print(json.dumps(summary), flush=True)
    print()
    print(markdown(rows, summary))


if __name__ == "__main__":
    main()
