"""A CPU stand-in for the two CUDA calls of :class:`ickd.engine.step.CudaGraphStep` (capture and
replay), for the test suite and ``bench/gpu_check.py``'s smoke mode, where CUDA graphs cannot exist.

The replay re-runs the captured body on the static inputs as under a capture
(:func:`ickd.fastpath.simulated_capture`), overwriting the gradients as a replayed backward does.
Everything around it (warm-up, recapture on a new signature, eager short batches, fallbacks,
gradient ownership, in-graph meters) is the real state machine. The real capture is checked by
``bench/gpu_check.sh`` on a GPU.
"""
from __future__ import annotations

from ickd import fastpath
from ickd.engine.step import CudaGraphStep


class ReplayGraph:
    """What :meth:`CpuReplayGraphStep._capture` keeps instead of a ``torch.cuda.CUDAGraph``."""

    def __init__(self, step: "CpuReplayGraphStep", epoch: int) -> None:
        self.step, self.epoch = step, epoch

    def replay(self) -> None:
        self.step.zero_grad(False)  # a replayed backward writes the gradients, it does not add to them
        with fastpath.simulated_capture():  # the body reads per-epoch device values, as a graph does
            self.step.outputs = self.step.body(*self.step.static, self.epoch)


class CpuReplayGraphStep(CudaGraphStep):
    """CudaGraphStep with its CUDA warm-up and capture replaced (see the module docstring)."""

    def _warmup(self, x, y, idx, epoch):
        self.zero_grad(True)
        out = self.body(x, y, idx, epoch)
        self.finish()
        return out

    def _capture(self, x, y, idx, epoch):
        self.static = (x.clone(), y.clone(), idx.clone())
        self.zero_grad(True)
        self.graph = ReplayGraph(self, epoch)
        self.captures += 1
