"""The per-batch machinery of the fast path: device-side epoch meters and the CUDA-graph step.

At the paper's batch size (64) a CIFAR step is bound by kernel-launch overhead, not arithmetic
(performance-anchors.md): a captured CUDA graph replays the whole forward, retrieval, IC-KD losses,
backward, bank write and metric accumulation as one launch. Two rules make that possible:

* Nothing in the captured region talks to the host. Epoch metrics and the NaN/inf watch therefore
  live in device tensors (:class:`EpochMeters`) that the step updates in place; the host reads them
  only every ``nonfinite_check_every`` batches and at the end of the epoch.
* Python values baked into a graph must not change under it. The distiller names everything
  epoch-dependent it uses (loss ramps, fill-vs-update of online banks) in ``step_signature(epoch)``;
  a new signature or batch shape means a fresh capture. Steps a graph cannot hold (a bank still
  filling, a backend that searches on the host, a short last batch) run eagerly, on the same
  parameters and the same gradient tensors.

The optimiser step stays outside the graph: it is a couple of fused multi-tensor kernels, and keeping
it eager lets the learning-rate schedule change without recapturing.
"""
from __future__ import annotations

import logging
import contextlib
import copy
from typing import Any, Callable, Hashable, Mapping

import torch

from ickd import fastpath

log = logging.getLogger(__name__)

StepResult = tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]

#: Eager steps on a side stream before a capture (lazy initialisation, cuDNN autotuning and
#: AccumulateGrad's first-call allocations must happen before, not during, capture).
WARMUP_STEPS = 3


class EpochMeters:
    """Sums of the step's losses and statistics, top-1 hits, and the first non-finite batch, kept
    on the device and updated in place (so a captured step can update them).

    Fast layout (``ickd.fastpath`` switch ``meters``, on by default): the hit count and every sum
    live in one float vector ``[correct, loss, *losses, *stats]`` (``sums[key]`` and ``correct`` are
    views into it), so a step adds all of them with one ``stack`` and one ``add_`` and checks the
    loss components for non-finite values with two kernels, instead of a few ops per key. The layout
    is fixed by the first step (eager: warm-up steps precede a capture); a step with other keys
    re-lays it out, keeping the sums, and is refused during a capture."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self._keys: tuple[str, ...] = ()
        self._vec = torch.zeros(1, device=device)
        self.correct = self._vec[0]
        self.step = torch.zeros((), dtype=torch.long, device=device)  # batch index in the epoch
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite batch
        self.loss_names: list[str] = []
        self.bad_components = torch.zeros(0, dtype=torch.bool, device=device)

    def reset(self, partial: Mapping[str, Any] | None = None) -> None:
        """Start an epoch (in place: captured graphs keep pointing at these tensors)."""
        for value in self.sums.values():
            value.zero_()
        for key, value in (partial or {}).get("sums", {}).items():
            self._sum(key).fill_(float(value))
        self.correct.fill_(float(partial["correct"]) if partial else 0.0)
        self.step.fill_(int(partial["step"]) if partial else 0)
        self.first_bad.fill_(-1)
        self.bad_components.zero_()

    def _capturing(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def _layout(self, keys: tuple[str, ...]) -> None:
        """Lay the vector out as ``[correct, *keys, *other known keys]``, keeping every sum."""
        if self._capturing():  # a new allocation inside the graph would be replayed into nothing
            raise RuntimeError(f"meters {list(keys)} first appeared during CUDA-graph capture; run an eager step first")
        order = keys + tuple(k for k in self._keys if k not in keys)
        old = self._vec
        vec = torch.zeros(1 + len(order), device=self.device)
        vec[0] = old[0]
        for i, key in enumerate(order, start=1):
            if key in self.sums:
                vec[i] = self.sums[key]
        self._vec, self._keys = vec, order
        self.correct = vec[0]
        self.sums = {key: vec[i] for i, key in enumerate(order, start=1)}

    def _sum(self, key: str) -> torch.Tensor:
        if key not in self.sums:
            if self._capturing():  # a fill inside the graph would rerun every replay
                raise RuntimeError(f"meter {key!r} first appeared during CUDA-graph capture; run an eager step first")
            if fastpath.enabled("meters"):
                self._layout(self._keys + (key,))
            else:
                self.sums[key] = torch.zeros((), device=self.device)
        return self.sums[key]

    def _check_names(self, names: list[str]) -> None:
        if names != self.loss_names:
            if self._capturing():
                raise RuntimeError("the loss components changed during CUDA-graph capture")
            self.loss_names = names
            self.bad_components = torch.zeros(len(names), dtype=torch.bool, device=self.device)

    def add(self, total: torch.Tensor, losses: Mapping[str, torch.Tensor], stats: Mapping[str, torch.Tensor],
            logits: torch.Tensor, labels: torch.Tensor) -> None:
        if not fastpath.enabled("meters"):
            return self._add_per_key(total, losses, stats, logits, labels)
        keys = ("loss", *losses, *stats)
        if self._keys[: len(keys)] != keys:
            self._layout(keys)
        names = list(losses)
        self._check_names(names)
        with torch.no_grad():  # instead of a detach (a dispatched op) per value
            values = [v if v.dtype == torch.float32 else v.float() for v in (total, *losses.values(), *stats.values())]
            stacked = torch.stack(values)
            self._vec[1 : 1 + len(keys)].add_(stacked)
            self.correct.add_((logits.argmax(dim=1) == labels).sum())
            if names:
                comp = stacked[1 : 1 + len(names)]
                bad = (comp - comp).ne(0)  # x - x is 0 for finite x, NaN for inf and NaN
            else:
                bad = self.bad_components
            self._end_batch(bad)

    def _add_per_key(self, total, losses, stats, logits, labels) -> None:
        """The per-key update (``fastpath`` switch ``meters`` off): a few ops per key."""
        for key, value in {"loss": total, **losses, **stats}.items():
            self._sum(key).add_(value.detach().float())
        self.correct.add_((logits.argmax(dim=1) == labels).sum())
        names = list(losses)
        self._check_names(names)
        bad = torch.stack([~torch.isfinite(v.detach().float()).all() for v in losses.values()]) if names else self.bad_components
        self._end_batch(bad)

    def _end_batch(self, bad: torch.Tensor) -> None:
        """Record the batch's non-finite components if it is the epoch's first bad batch; count it."""
        first = (self.first_bad < 0) & bad.any()
        self.bad_components.copy_(torch.where(first, bad, self.bad_components))
        self.first_bad.copy_(torch.where(first, self.step, self.first_bad))
        self.step.add_(1)

    def nonfinite(self) -> tuple[int, list[str]] | None:
        """(batch index, loss names) of the first non-finite batch of the epoch so far (syncs)."""
        first = int(self.first_bad.item())
        if first < 0:
            return None
        flags = self.bad_components.tolist()
        return first, [name for name, flag in zip(self.loss_names, flags) if flag]


class CudaGraphStep:
    """Runs training steps through captured CUDA graphs where it can (see the module docstring).

    ``body(x, y, idx, epoch)`` is the forward + backward + meters update of one batch (no optimiser);
    ``finish()`` the optimiser step and whatever follows it. ``eager(x, y, idx, epoch)`` is the plain
    step, used for every batch a graph cannot take. Gradients: a capture starts from ``grad=None`` so
    the captured backward *writes* each gradient into memory the graph owns; afterwards eager steps
    zero those tensors in place instead of dropping them, so the graph and the optimiser keep
    sharing them.

    A capture or first replay that raises ends graph use for the run, not the run: one warning
    with the cause, the half-made graph and its gradients dropped, the meters and the distiller's
    state (BN statistics, banks) restored from ``snapshot()`` taken before the capture, and that
    batch and all later ones run eagerly (``mode`` becomes ``eager-fallback``, ``fallback`` the cause).
    """

    def __init__(self, owner: "TrainStep", batch_size: int, warmup_steps: int = WARMUP_STEPS) -> None:
        # The step it captures, and the eager path for whatever a graph cannot take, are the owner's.
        self.body, self.finish, self.eager, self.zero_grad = owner.body, owner.finish, owner.eager, owner.zero_grad
        self.snapshot = owner.snapshot  # returns a closure restoring meters and distiller state (see _fall_back)
        self.batch_size = batch_size
        self.warmup_steps = warmup_steps
        self.graph: Any = None
        self.signature: Hashable = None
        self.static: tuple[torch.Tensor, ...] = ()
        self.outputs: StepResult | None = None
        self.warm = 0
        self.captures = 0
        self.replays = 0
        self.eager_steps = 0
        self._blocked: str | None = None
        self._side_stream: Any = None
        #: Why capture or the first replay of a graph failed (None: it has not); from then on every
        #: step runs eagerly (:meth:`_fall_back`).
        self.fallback: str | None = None
        self._verified = False  # whether the current graph has replayed once without raising

    @property
    def holds_grads(self) -> bool:
        """Whether the parameters' gradient tensors belong to a live graph (never drop them then)."""
        return self.graph is not None

    @property
    def mode(self) -> str:
        """``graph``, or ``eager-fallback`` once a capture failed (the reason is in ``fallback``)."""
        return "graph" if self.fallback is None else "eager-fallback"

    def release(self) -> None:
        self.graph, self.static, self.outputs, self.signature, self.warm = None, (), None, None, 0
        self._verified = False

    def _copy_inputs(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        for static, value in zip(self.static, (x, y, idx)):
            static.copy_(value, non_blocking=True)

    def _snapshot(self) -> Callable[[], None]:
        """A way back to the meters and the distiller's state as they are now (a first replay that
        failed part-way may have updated them). Parameters and optimiser state need none: the
        optimiser step runs after the replay."""
        return self.snapshot() if self.snapshot is not None else (lambda: None)

    def _fall_back(self, exc: BaseException, restore: Callable[[], None], x, y, idx, epoch) -> StepResult:
        """Capture or the first replay raised: drop the half-made graph and everything it owns
        (its gradient tensors included: the next eager step allocates fresh ones), put the meters
        and the distiller's state back as they were before, and run this batch and every later one
        eagerly."""
        self.fallback = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
        log.warning("CUDA graph capture failed (%s); training continues with the eager step", self.fallback)
        self.release()
        self.zero_grad(True)
        restore()
        self.eager_steps += 1
        return self.eager(x, y, idx, epoch)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int,
                 signature: Hashable, blocker: str | None) -> tuple[StepResult, bool]:
        """One training step; returns its result and whether the meters were already updated
        (graph and warm-up steps run ``body``, which updates them; plain eager steps do not)."""
        if self.fallback is not None:
            self.eager_steps += 1
            return self.eager(x, y, idx, epoch), False
        if blocker is not None or x.shape[0] != self.batch_size:
            if blocker is not None and blocker != self._blocked:
                log.info("CUDA graph step paused: %s; running eagerly", blocker)
            self._blocked = blocker
            self.eager_steps += 1
            return self.eager(x, y, idx, epoch), False
        self._blocked = None
        key = (signature, tuple(x.shape), tuple(y.shape), tuple(idx.shape))
        if key != self.signature:
            if self.graph is not None:
                log.info("recapturing the CUDA graph step (its constants changed: %s)", signature)
            self.release()
            self.signature = key
        if self.graph is None and self.warm < self.warmup_steps:
            self.warm += 1
            self.eager_steps += 1
            return self._warmup(x, y, idx, epoch), True
        if self.graph is None or not self._verified:
            # Capture and the first replay may raise (an op capture does not support, a driver that
            # cannot instantiate the graph): the run must not end there (:meth:`_fall_back`).
            snapshot = self._snapshot()
            try:
                if self.graph is None:
                    self._capture(x, y, idx, epoch)
                else:
                    self._copy_inputs(x, y, idx)
                self.graph.replay()
                self._sync()
            except Exception as exc:  # noqa: BLE001 - any failure here means: train eagerly
                return self._fall_back(exc, snapshot, x, y, idx, epoch), False
            self._verified = True
        else:
            self._copy_inputs(x, y, idx)
            self.graph.replay()
        self.replays += 1
        self.finish()
        assert self.outputs is not None
        return self.outputs, True

    # --- CUDA specifics (kept small so the state machine above is testable) -------------------
    def _warmup(self, x, y, idx, epoch) -> StepResult:
        current = torch.cuda.current_stream()
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        self._side_stream.wait_stream(current)
        with torch.cuda.stream(self._side_stream):
            self.zero_grad(True)
            out = self.body(x, y, idx, epoch)
            self.finish()
        current.wait_stream(self._side_stream)
        return out

    def _capture(self, x, y, idx, epoch) -> None:
        self.static = (x.clone(), y.clone(), idx.clone())
        self.zero_grad(True)  # the captured backward allocates (and then rewrites) the gradients
        graph = torch.cuda.CUDAGraph()
        # thread_local: DataLoader pin-memory threads may use CUDA while this thread captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.outputs = self.body(*self.static, epoch)
        self.graph = graph
        self.captures += 1
        log.info("captured the training step in a CUDA graph (batch %d, capture %d)", self.batch_size, self.captures)

    def _sync(self) -> None:
        """Wait for the first replay, so an error it raises on the device surfaces here."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.current_stream().synchronize()

    def stats(self) -> dict[str, int]:
        return {"graph_captures": self.captures, "graph_replays": self.replays, "eager_steps": self.eager_steps}


def _clone_tensors(value: Any) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) cloned."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, _clone_tensors(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tensors(v) for v in value)
    return value


class TrainStep:
    """The one owner of a training step, graph or eager: ``step(x, y, idx, epoch)`` runs forward,
    backward, the optimiser step and the epoch meters of one batch and returns the detached
    ``(total, losses, stats, logits)``. The trainer asks it for steps and nothing else.

    ``mode="graph"`` (CUDA, one process) runs batches through a :class:`CudaGraphStep` where it can;
    ``"eager"`` runs :meth:`eager`. ``forward`` is what runs the distiller's training forward (the
    distiller's ``forward_train``, or its DDP wrapper). Public pieces for benchmarks and tests:
    :meth:`body` (what a graph captures), :meth:`finish` (the optimiser step), :meth:`zero_grad`,
    :meth:`autocast`, :attr:`graph`, :meth:`metrics`.
    """

    def __init__(self, distiller: Any, optimizer: torch.optim.Optimizer, meters: EpochMeters, *,
                 forward: Callable[..., Any], device: torch.device, autocast_dtype: torch.dtype | None,
                 channels_last: bool, mode: str, batch_size: int) -> None:
        self.distiller, self.optimizer, self.meters = distiller, optimizer, meters
        self.forward, self.device = forward, device
        self.autocast_dtype, self.channels_last = autocast_dtype, channels_last
        self.graph: CudaGraphStep | None = CudaGraphStep(self, batch_size) if mode == "graph" else None

    # --- the pieces ----------------------------------------------------------------------------
    def autocast(self) -> Any:
        """The networks' autocast context (none without mixed precision)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # Graph capture needs the cast weights recomputed in every replay, not cached from capture time.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype,
                              cache_enabled=self.graph is None or self.graph.fallback is not None)

    def zero_grad(self, set_to_none: bool) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def body(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int, meters: bool = True) -> StepResult:
        """Forward, backward and (by default) the epoch meters of one batch; no optimiser step and no
        host synchronisation, so a CUDA graph can capture it whole."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self.forward(x, y, idx, epoch)
        total = sum(v.float() for v in out.losses.values())
        total.backward()
        result = total.detach(), {k: v.detach() for k, v in out.losses.items()}, out.stats, out.logits.detach()
        if meters:
            self.meters.add(*result, y)
        return result

    def finish(self) -> None:
        """The optimiser step and what follows it (EMA updates)."""
        self.optimizer.step()
        self.distiller.after_step()

    def eager(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int) -> StepResult:
        """One eager step (forward, backward, update) without the meters."""
        # A live CUDA graph owns the gradient tensors: zero them in place rather than dropping them.
        self.zero_grad(set_to_none=self.graph is None or not self.graph.holds_grads)
        result = self.body(x, y, idx, epoch, meters=False)
        self.finish()
        return result

    def snapshot(self) -> Callable[[], None]:
        """A closure putting the epoch meters and the distiller's training state (BN statistics,
        banks) back as they are now: a CUDA graph's fallback (:meth:`CudaGraphStep._fall_back`)
        after a first replay that raised part-way. Taken once per capture (a copy of the banks
        then, briefly), never per step."""
        meters = self.meters
        state = _clone_tensors(self.distiller.training_state())
        # A deep copy keeps views as views (the meters' sums may be views into one vector); the
        # graph is dropped on a fallback, so the restored meters need not be the same tensors.
        saved = copy.deepcopy(vars(meters))

        def restore() -> None:
            vars(meters).clear()
            vars(meters).update(saved)
            self.distiller.load_training_state(state)

        return restore

    # --- the step --------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int) -> StepResult:
        """One training step, graph or eager; the meters include it when it returns."""
        if self.graph is None:
            result, counted = self.eager(x, y, idx, epoch), False
        else:
            result, counted = self.graph(x, y, idx, epoch, self.distiller.step_signature(epoch),
                                         self.distiller.capture_blocker(epoch))
        if not counted:
            self.meters.add(*result, y)
        return result

    @property
    def mode(self) -> str:
        """``graph``, ``eager``, or ``eager-fallback`` after a failed capture."""
        return "eager" if self.graph is None else self.graph.mode

    def metrics(self) -> dict[str, Any]:
        """``step_mode`` (graph | eager | eager-fallback) and, after a fallback, its reason
        (``step_fallback``), plus the graph's counters: recorded per epoch in metrics.jsonl."""
        if self.graph is None:
            return {"step_mode": "eager"}
        out: dict[str, Any] = {"step_mode": self.graph.mode, **{f"step/{k}": v for k, v in self.graph.stats().items()}}
        out["step/fallback"] = int(self.graph.fallback is not None)  # numeric: W&B logs numbers only
        if self.graph.fallback is not None:
            out["step_fallback"] = self.graph.fallback
        return out
