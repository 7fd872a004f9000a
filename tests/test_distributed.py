"""Data-parallel training (torch.distributed DDP) with real processes: 2 ranks on CPU over gloo.

Each rank is ``python -m tests.test_distributed RANK-ENTRY ...`` (the ``__main__`` block below) with
torch's env variables set the way torchrun sets them; it calls ``ickd.engine.train`` and dumps
what the test compares: its final student weights and banks, the sample indices it trained on,
the callback calls it saw and every file it opened for writing in the run folder (an audit hook).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ickd.data import build_data
from ickd.data.loader import STREAM_ORDER, epoch_generator
from ickd.engine import distributed
from ickd.errors import ConfigError
from tests.helpers import REPO, compose_config

N_TRAIN, N_VAL = 513, 129  # odd on purpose: uneven fill/eval shards, one sample dropped per train epoch
BASE = [
    "distill=ickd",
    f"dataset.kwargs.num_train={N_TRAIN}",
    f"dataset.kwargs.num_val={N_VAL}",
    "trainer.threads=1",           # two ranks on two cores
    "trainer.deterministic=true",
]
WORLD = 2


# --- launching ranks --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, dump: Path, overrides: list[str], spec: dict | None = None, timeout: float = 400.0) -> list[subprocess.CompletedProcess]:
    """Start WORLD ranks of one run and wait for all; a hang fails the test instead of blocking it."""
    port = _free_port()
    dump.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
        args = [sys.executable, "-m", "tests.test_distributed", str(out), str(dump), json.dumps(spec or {}), *overrides]
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    results = []
    for rank, p in enumerate(procs):
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outs = [q.communicate() for q in procs]
            pytest.fail(f"rank {rank} did not finish within {timeout} s; stderr tails:\n" + "\n----\n".join(e[-3000:] for _, e in outs))
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


def _ok(results: list[subprocess.CompletedProcess]) -> None:
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} failed:\n{r.stderr[-4000:]}"


def _dumps(dump: Path) -> list[dict]:
    return [torch.load(dump / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["models"].keys() == b["models"].keys()
    for key in a["models"]:  # student (and peer / EMA copy): parameters and buffers (BN statistics)
        assert torch.equal(a["models"][key], b["models"][key]), key
    assert a["banks"].keys() == b["banks"].keys() and a["banks"]
    for name in a["banks"]:
        for field in ("feats", "logits", "labels", "sample_idx"):
            assert torch.equal(a["banks"][name][field], b["banks"][name][field]), (name, field)


# --- the rank entry (run in the child processes) ----------------------------------------------
def _rank_main(argv: list[str]) -> None:
    from ickd.engine import Callback
    from ickd.engine import run as run_mod

    out, dump, spec = Path(argv[0]).resolve(), Path(argv[1]), json.loads(argv[2])
    overrides = argv[3:]
    rank = int(os.environ["RANK"])
    writes: list[str] = []
    prefix = str(out)

    def audit(event, args):  # every file this process opens for writing (or renames/removes) in the run folder
        path = None
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            path = os.fsdecode(args[0]) if writing else None
        elif event in ("os.rename", "os.remove") and args:
            path = os.fsdecode(args[1] if event == "os.rename" else args[0])
        if path and os.path.abspath(path).startswith(prefix):
            writes.append(os.path.relpath(os.path.abspath(path), prefix))

    sys.addaudithook(audit)

    class Recorder(Callback):
        def __init__(self):
            self.calls: list = []
            self.polls = None  # counts interrupt polls from the start of epoch 2

        def on_run_start(self, run):
            self.calls.append(("run_start", run.start_epoch, run.extra.get("start_batch")))

        def on_epoch_end(self, epoch, metrics):
            self.calls.append(("epoch_end", epoch))
            self.polls = -1 if epoch == 1 else None  # the trainer polls once more at the epoch's end

        def on_checkpoint(self, path, epoch):
            self.calls.append(("checkpoint", epoch))

        def on_run_end(self, summary):
            self.calls.append(("run_end", summary["status"]))

    class Interrupter(Recorder):  # a callback that can interrupt makes the ranks poll every batch
        def interrupt_requested(self):
            if self.polls is None:
                return False
            self.polls += 1
            return self.polls == spec["interrupt_at"]

    recorder = Interrupter() if "interrupt_at" in spec else Recorder()

    class Probe(run_mod.Trainer):
        """Records the batches this rank trains; ``nan_at`` = [rank, step] makes that rank see a NaN loss."""

        trained: list

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.trained = []
            eager = self.step.eager  # DDP runs eagerly; wrap the step owner's eager step

            def probed(x, y, idx, epoch):
                self.trained.append((epoch, idx.tolist()))
                total, losses, stats, logits = eager(x, y, idx, epoch)
                if spec.get("nan_at") == [rank, len(self.trained)]:
                    losses = {k: v * float("nan") for k, v in losses.items()}
                return total, losses, stats, logits

            self.step.eager = probed

        def fit(self):
            summary = None
            try:
                summary = super().fit()
                return summary
            finally:
                banks = {n: {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
                         for n, b in self.distiller.banks.items()}
                models = {k: v.clone() for k, v in self.distiller.state_dict().items() if not k.startswith("teacher.")}
                state = {"models": models, "banks": banks,
                         "trained": getattr(self, "trained", []), "writes": writes, "calls": recorder.calls,
                         "summary": summary, "dist": (self.dist.rank, self.dist.world_size),
                         "bank_types": sorted(type(b).__name__ for b in self.distiller.banks.values())}
                torch.save(state, dump / f"rank{rank}.pt")

    run_mod.Trainer = Probe  # observe the real run; train() builds everything else as usual
    from tests.helpers import compose_config as compose

    run_mod.train(compose(*overrides), out, callbacks=[recorder])


# --- end-to-end tests -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher_dir):
    """One uninterrupted 2-rank IC-KD run (2 epochs) shared by the tests below."""
    root = tmp_path_factory.mktemp("ddp")
    out, dump = root / "run", root / "dump"
    args = [*BASE, f"teacher.checkpoint={teacher_dir}"]
    start = time.perf_counter()
    results = launch(out, dump, args)
    _ok(results)
    return {"out": out, "dumps": _dumps(dump), "args": args, "wall_s": time.perf_counter() - start, "results": results}


@pytest.mark.slow
def test_two_ranks_stay_identical_and_train_disjoint_shards(straight):
    d0, d1 = straight["dumps"]
    assert d0["dist"] == (0, 2) and d1["dist"] == (1, 2)
    assert d0["bank_types"] == d1["bank_types"] == ["GatheredBank"]
    _assert_same_state(d0, d1)
    bank = d0["banks"]["teacher"]
    assert torch.equal(bank["sample_idx"], torch.arange(N_TRAIN))  # the sharded fill pass wrote every sample

    # Per epoch: disjoint equal shards, and rank batches k together are the global batch k of the
    # single-process (seed, epoch) order (its last sample dropped: 513 is odd).
    cfg = compose_config(*straight["args"])
    batch = int(cfg.trainer.batch_size)
    for epoch in range(int(cfg.trainer.epochs)):
        order = torch.randperm(N_TRAIN, generator=epoch_generator(int(cfg.seed), epoch, STREAM_ORDER))[: N_TRAIN - 1]
        mine = [[idx for e, idx in d["trained"] if e == epoch] for d in (d0, d1)]
        assert len(mine[0]) == len(mine[1]) == (N_TRAIN - 1) // batch
        for k, (a, b) in enumerate(zip(*mine)):
            assert len(a) == len(b) == batch // WORLD
            glob = order[k * batch : (k + 1) * batch]
            assert a == glob[0::2].tolist() and b == glob[1::2].tolist()
        flat0 = {i for idx in mine[0] for i in idx}
        flat1 = {i for idx in mine[1] for i in idx}
        assert not flat0 & flat1 and len(flat0) == len(flat1) == (N_TRAIN - 1) // 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        # two banks (each peer's), filled online during epoch 1, and a second DDP-trained network
        ["paradigm=online", "teacher=resnet8"],
        # an EMA teacher (buffers averaged from each rank's BN statistics) and a FIFO bank of M < N
        ["paradigm=teacher_free", "paradigm.bank_source=ema", "memory.size=200", "memory.subset=fifo", "memory.update=momentum"],
    ],
    ids=["online", "teacher_free-fifo"],
)
def test_other_paradigms_keep_ranks_identical(tmp_path, overrides):
    _ok(launch(tmp_path / "run", tmp_path / "dump", [*BASE, "trainer.epochs=1", *overrides]))
    d0, d1 = _dumps(tmp_path / "dump")
    _assert_same_state(d0, d1)
    assert any(k.startswith(("peer.", "ema.")) for k in d0["models"])
    for bank in d0["banks"].values():
        # Filled during the first epoch, which trains all but the odd sample out (513 over 2 ranks).
        assert int((bank["sample_idx"] < 0).sum()) == (1 if bank["sample_idx"].numel() == N_TRAIN else 0)
    assert d0["summary"]["status"] == "completed" and d0["summary"]["last_top1"] > 10.0


@pytest.mark.slow
def test_only_rank_zero_writes_files_and_calls_callbacks(straight):
    out = straight["out"]
    d0, d1 = straight["dumps"]
    assert d1["writes"] == [] and d1["calls"] == []
    written = {Path(p).name for p in d0["writes"]}  # atomic writes show up as renames onto these names
    assert {"config.yaml", "metrics.jsonl", "result.json", "last.pt", "best.pt"} <= written
    assert [c for c in d0["calls"] if c[0] == "epoch_end"] == [("epoch_end", 1), ("epoch_end", 2)]
    assert d0["calls"][0] == ("run_start", 0, 0) and d0["calls"][-1] == ("run_end", "completed")
    metrics = _metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]  # each epoch exactly once
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["epochs_completed"] == 2
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 2
    assert d0["summary"]["best_top1"] == d1["summary"]["best_top1"] == result["best_top1"]


@pytest.mark.slow
def test_metrics_cover_the_whole_val_split_and_accuracy_is_sane(straight):
    last = _metrics(straight["out"])[-1]
    # top1 = 100 * hits / 129 only if both ranks' val shards (65 + 64) were counted.
    for key in ("val/top1", "val/top5"):
        hits = last[key] * N_VAL / 100
        assert abs(hits - round(hits)) < 1e-6, (key, last[key])
    # 10 classes: chance is 10%. A sanity bound, not a target: this 2-epoch run lands near 30 and
    # moves by a few points with fp32 rounding (e.g. the fused PICD/NICD backward of issue 12).
    assert last["val/top1"] > 20.0
    assert last["bank_entries"] == N_TRAIN
    assert last["time/images_per_s"] > 0 and 0.0 <= last["train/pos_frac"] <= 1.0
    assert all(v == v for v in last.values() if isinstance(v, float))


@pytest.mark.slow
def test_interrupted_two_rank_run_resumes_to_the_same_weights(straight, tmp_path):
    """Rank 0's callback asks to stop mid-epoch; both ranks stop at the same batch, rank 0 writes the
    checkpoint, and a new 2-rank launch resumes from it on both ranks and ends bit-identical to the
    uninterrupted run."""
    out = tmp_path / "run"
    _ok(launch(out, tmp_path / "dump1", straight["args"], {"interrupt_at": 4}))
    first = _dumps(tmp_path / "dump1")
    assert first[0]["summary"]["status"] == first[1]["summary"]["status"] == "interrupted"
    assert [len([1 for e, _ in d["trained"] if e == 1]) for d in first] == [4, 4]  # both stopped after batch 4 of epoch 2
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["partial"]["step"] == 4

    _ok(launch(out, tmp_path / "dump2", straight["args"]))
    second = _dumps(tmp_path / "dump2")
    for d in second:
        assert d["summary"]["status"] == "completed" and d["summary"]["resumed_from_epoch"] == 1
        assert d["trained"][0][0] == 1 and len(d["trained"]) == 16 - 4  # continued after batch 4, on every rank
    assert second[0]["calls"][0] == ("run_start", 1, 4)
    _assert_same_state(second[0], second[1])
    _assert_same_state(second[0], straight["dumps"][0])
    assert [m["epoch"] for m in _metrics(out)] == [1, 2]
    assert _metrics(out)[-1]["val/top1"] == _metrics(straight["out"])[-1]["val/top1"]


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_stops_every_rank(tmp_path, teacher_dir):
    out = tmp_path / "run"
    results = launch(out, tmp_path / "dump", [*BASE, f"teacher.checkpoint={teacher_dir}"], {"nan_at": [1, 3]})
    for r in results:
        assert r.returncode != 0 and "NonFiniteLossError" in r.stderr, r.stderr[-3000:]
    assert "on another rank" in results[0].stderr
    dumps = _dumps(tmp_path / "dump")
    assert [len(d["trained"]) for d in dumps] == [3, 3]  # both stopped at the same batch
    assert json.loads((out / "result.json").read_text())["status"] == "nonfinite"
    assert not (out / "checkpoints" / "last.pt").exists()


def test_global_batch_must_split_evenly_over_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    from ickd.engine import train

    with pytest.raises(ConfigError, match=r"trainer.batch_size=33 is the global batch and must be divisible .*WORLD_SIZE=2.*32 or 34"):
        train(compose_config("distill=ce", "trainer.batch_size=33"), tmp_path)
    with pytest.raises(ConfigError, match="trainer.eval_batch_size=127"):
        train(compose_config("distill=ce", "trainer.eval_batch_size=127"), tmp_path)
    assert not torch.distributed.is_initialized()  # refused before joining any process group
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT not set"):
        distributed.init_distributed("cpu")


# --- pure parts -------------------------------------------------------------------------------
def test_from_slurm_env_derives_torch_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08,11]",
           "SLURM_JOB_ID": "123456"}
    got = distributed.from_slurm_env(env, scontrol=None)
    assert got == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": str(15000 + 123456 % 15000)}
    assert all(env[k] == v for k, v in got.items())

    # Values set by torchrun/submitit win; a plain host list; a single task is world size 1.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "node-a,node-b", "SLURM_JOB_ID": "7", "MASTER_PORT": "29500"}
    got = distributed.from_slurm_env(env, scontrol=None)
    assert got["MASTER_ADDR"] == "node-a" and got["MASTER_PORT"] == "29500" and got["WORLD_SIZE"] == "1" and got["LOCAL_RANK"] == "0"
    assert distributed.from_slurm_env({"PATH": "/bin"}) == {}
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        distributed.from_slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"}, scontrol=None)


MINIMAL_SLURM_CONF = "ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1 State=UNKNOWN\nPartitionName=p Nodes=localhost Default=YES\n"


def test_srun_wrapper_exports_the_variables_to_the_command(tmp_path):
    (tmp_path / "slurm.conf").write_text(MINIMAL_SLURM_CONF)  # lets scontrol (if installed) expand host lists
    env = {"PATH": os.environ["PATH"], "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "nodeA", "SLURM_JOB_ID": "42", "PYTHONPATH": str(REPO), "SLURM_CONF": str(tmp_path / "slurm.conf")}
    show = "import os, json; print(json.dumps({k: os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}))"
    out = subprocess.run([sys.executable, "-m", "ickd.engine.distributed", sys.executable, "-c", show],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "nodeA", "MASTER_PORT": "15042"}


@pytest.mark.parametrize("nodelist, first", [("n1", "n1"), ("a,b[1-2]", "a"), ("gpu[003-005,9],cpu1", "gpu003"), ("r[2-3]-ib", "r2-ib")])
def test_slurm_first_host_fallback_parser(nodelist, first):
    assert distributed.slurm_first_host(nodelist, scontrol=None) == first


def test_slurm_first_host_agrees_with_scontrol(tmp_path, monkeypatch):
    import shutil

    if not shutil.which("scontrol"):
        pytest.skip("scontrol is not installed")
    # scontrol wants a configuration even to expand host lists; a minimal one does (no daemons).
    conf = tmp_path / "slurm.conf"
    conf.write_text(MINIMAL_SLURM_CONF)
    monkeypatch.setenv("SLURM_CONF", str(conf))
    for nodelist in ("gpu[003-005,9],cpu1", "n1", "a,b[1-2]"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True)
        assert distributed.slurm_first_host(nodelist) == out.stdout.split()[0] == distributed.slurm_first_host(nodelist, scontrol=None)


def _idx(loader) -> list[list[int]]:
    return [idx.tolist() for _, _, idx in loader]


def test_in_memory_loader_shards_one_shared_order():
    data = build_data("synthetic", num_train=103, num_val=10, seed=2)
    plain = data.train_loader(12)
    plain.set_epoch(3)
    order = torch.cat([torch.tensor(i) for i in _idx(plain)])
    shards = []
    for rank in range(3):
        loader = data.train_loader(4, rank=rank, world_size=3)
        loader.set_epoch(3)
        shards.append(_idx(loader))
        assert len(loader) == len(shards[-1]) == 9 and loader.num_samples == 34  # 102 // 3 each
    for k in range(9):  # rank batch k of every rank together = global batch k (of 12)
        glob = order[:102][k * 12 : (k + 1) * 12].tolist()  # the shuffled order's tail (1 sample) is dropped
        assert sorted(sum((s[k] for s in shards), [])) == sorted(glob)
    flat = [sum(s, []) for s in shards]
    assert not set(flat[0]) & set(flat[1]) and not set(flat[1]) & set(flat[2])
    # Fixed order (evaluation, bank fill): every sample exactly once, shards differ by at most one.
    fixed = [sum(_idx(data.train_loader(5, shuffle=False, rank=r, world_size=3)), []) for r in range(3)]
    assert sorted(sum(fixed, [])) == list(range(103)) and [len(f) for f in fixed] == [35, 34, 34]
    assert fixed[1] == list(range(1, 103, 3))
    vals = [sum(_idx(data.val_loader(4, rank=r, world_size=3)), []) for r in range(3)]
    assert sorted(sum(vals, [])) == list(range(10))
    # Same (seed, epoch, rank): same batches and augmentation; ranks draw different crops.
    a, b = data.train_loader(4, rank=1, world_size=3), data.train_loader(4, rank=1, world_size=3)
    xa, xb = next(iter(a))[0], next(iter(b))[0]
    assert torch.equal(xa, xb)
    with pytest.raises(ConfigError, match="rank=3 and world_size=3"):
        data.train_loader(4, rank=3, world_size=3)


def test_folder_loader_shards(tmp_path):
    from tests.data_files import write_imagenet_folder

    write_imagenet_folder(tmp_path, num_classes=3, train_per_class=5, val_per_class=2)
    data = build_data("imagenet", root=str(tmp_path), image_size=16, num_workers=0)
    plain = sum(_idx(data.train_loader(4, num_workers=0)), [])
    shards = [sum(_idx(data.train_loader(2, num_workers=0, rank=r, world_size=2)), []) for r in range(2)]
    assert shards[0] == plain[0:14:2] and shards[1] == plain[1:14:2]  # 15 samples: the last one dropped
    one = data.train_loader(2, num_workers=0, rank=1, world_size=2)
    assert len(one) == 4 and one.num_samples == 7
    # A sample's augmentation depends on its position only: the same image whatever the sharding.
    x_plain = {i: x for xs, _, idx in data.train_loader(15, num_workers=0) for x, i in zip(xs, idx.tolist())}
    for xs, _, idx in data.train_loader(2, num_workers=0, rank=1, world_size=2):
        for x, i in zip(xs, idx.tolist()):
            assert torch.equal(x, x_plain[i])
    vals = [sum(_idx(data.val_loader(4, num_workers=0, rank=r, world_size=2)), []) for r in range(2)]
    assert vals == [[0, 2, 4], [1, 3, 5]]


def test_single_process_loaders_are_unchanged():
    """world_size=1 is the plain loader: same batches as a loader built without shard arguments."""
    data = build_data("synthetic", num_train=64, num_val=8, seed=1)
    a, b = data.train_loader(16), data.train_loader(16, rank=0, world_size=1)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    assert distributed.DistEnv.current() == distributed.DistEnv()
    assert distributed.init_distributed("cpu") == distributed.DistEnv()  # no WORLD_SIZE: no process group


if __name__ == "__main__":
    _rank_main(sys.argv[1:])
