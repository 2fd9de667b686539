"""Pre-training's whole step in one CUDA graph (``TrainConfig.cuda_graph``).

The step — forward under autocast, backward, gradient clipping, the fused AdamW step and the
masking RNG's advance — is captured once and replayed for every batch, so the GPU runs it without
waiting for Python between its ~1,000 kernel launches (``tools/e2e_step.py``'s ``train-graph``
mode times this step). What a captured step needs, and how each need is met here:

- **static inputs**: every batch is written into buffers of ``batch_size`` rows (gathered from the
  cohort straight into them by :meth:`GraphedStep.step_rows`, as ``train()`` does). A shorter last
  batch is padded with rows that have no modality (``present`` False, inputs 0). They add nothing
  to the loss or to any gradient: ``masked_mse`` counts only the rows that have the modality, each
  row is masked and encoded on its own, and the loss is a sum over modalities;
- **no state created during capture**: AdamW creates its moments and step counts at its first
  step, which a capture would record as "set to zero" at every replay. They are created before
  the capture by a step at learning rate 0 on zero gradients, which leaves every parameter as it
  is (weight decay multiplies by ``1 - 0·wd = 1``, the update is ``0``), and the step counts are
  set back to 0, as a fresh optimizer's. A resumed run's loaded state is used as it is;
- **a learning rate that changes between replays**: the optimizer reads it from one device tensor
  per parameter group while capturing; before every replay each tensor is set to its group's
  rate, which the scheduler keeps as a Python float as always;
- **lazy initialisation outside the capture**: one forward and backward on a side stream first
  (cuBLAS, Triton's compiled kernels), without an optimizer step or an RNG advance, so the run's
  numbers are those of a run without the graph (up to the padded last batch's float rounding).

fp16 (its loss scaler synchronises with the host) and gradient accumulation are not captured:
with ``cuda_graph=True``, :meth:`pyimputmae.train_config.TrainConfig.validate` refuses
``amp="fp16"`` and ``grad_accum > 1``, and ``train()`` refuses ``amp="auto"`` on a GPU without
bf16 (where it means fp16).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from .data.cohort import Batch, Cohort
from .model.mae import advance_rng_

#: one pre-training step's loss and its per-modality parts (0-d tensors)
StepOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


def init_optimizer_state(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> bool:
    """Create ``opt``'s state for the parameters that have none, as a fresh optimizer's first step
    would find it (moments 0, step counts 0), without changing a parameter and leaving the state
    others already have (loaded from a checkpoint) as it is; True when it created any."""
    fresh = [p for p in params if not opt.state.get(p)]
    if not fresh:
        return False
    rates = [group["lr"] for group in opt.param_groups]
    grads = [p.grad for p in params]
    for group in opt.param_groups:
        group["lr"] = 0.0
    new = {id(p) for p in fresh}
    for p in params:  # a parameter without a gradient is skipped by the step
        p.grad = torch.zeros_like(p) if id(p) in new else None
    try:
        with warnings.catch_warnings():
            # a capturable optimizer stepped outside a graph warns that this is slower; it is once
            warnings.filterwarnings("ignore", message=r".*capturable=True.*")
            opt.step()
    finally:
        for group, lr in zip(opt.param_groups, rates):
            group["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad
    for p in fresh:
        for value in opt.state[p].values():
            if torch.is_tensor(value):
                value.zero_()  # the step count (the moments are 0 already: β·0 + (1 - β)·0)
    return True


class GraphedStep:
    """Pre-training's step for one stage: ``step(batch) -> (loss, parts)``, the step applied.

    opt, params: the stage's AdamW (fused; ``capturable=True`` on CUDA: ``training.make_optimizer``,
    or after a resume ``training.set_optimizer_mode``) and the parameters it trains; its state is
    made here where a parameter has none; ``step_loss(batch) -> (loss, parts)``: the forward; rng: the masking RNG
    ``(2,)`` int64; amp: the autocast dtype or None; clip: the gradient-norm bound or None;
    batch_size: the rows of the static buffers; device: the training device. Off CUDA it runs the
    same step without a graph (everything else as with one: padding, state creation, learning-rate
    tensors), which is how the CPU tests check it.

    The returned tensors are the graph's outputs, overwritten by the next step: read them (or
    accumulate them on the device) before calling it again.
    """

    def __init__(self, opt: torch.optim.Optimizer, params: list[nn.Parameter],
                 step_loss: Callable[[Batch], StepOutput], rng: torch.Tensor, amp: torch.dtype | None,
                 clip: float | None, batch_size: int, device: torch.device) -> None:
        self.opt, self.params, self.step_loss = opt, params, step_loss
        self.rng, self.amp, self.clip, self.rows, self.device = rng, amp, clip, batch_size, device
        self.capture = device.type == "cuda"
        init_optimizer_state(opt, params)  # before a capture, which would record "set to 0" otherwise
        self.static: Batch | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: StepOutput | None = None
        self.rates = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in opt.param_groups]

    def __call__(self, batch: Batch) -> StepOutput:
        """Apply one step to ``batch`` (at most ``batch_size`` rows, on any device), copied into the
        static buffers."""
        n = self._rows_fit(batch.present.shape[0])
        s = self._buffers(batch)
        pairs = [(s.inputs[k], v) for k, v in batch.inputs.items()]
        pairs += [(s.present, batch.present), (s.clinical, batch.clinical), (s.time, batch.time),
                  (s.event, batch.event)]
        for dst, src in pairs:
            dst[:n].copy_(src, non_blocking=True)
        return self._run(n)

    def step_rows(self, cohort: Cohort, rows: np.ndarray) -> StepOutput:
        """Apply one step to rows ``rows`` of ``cohort`` (at most ``batch_size``), gathered straight
        into the static buffers (:meth:`Cohort.batch` with ``out``): no batch-sized copy on the
        device besides them, where ``self(cohort.batch(rows).to(device))`` would hold two."""
        n = self._rows_fit(len(rows))
        cohort.batch(rows, out=self._buffers(cohort))
        return self._run(n)

    def release(self) -> None:
        """End of the stage: the graph, its buffers and its gradients go (the parameters' ``.grad``
        point into the graph's memory; left there, the next stage's first backward would add to
        this stage's last gradients)."""
        self.opt.zero_grad(set_to_none=True)
        self.graph, self.static, self.out = None, None, None

    # ---------------------------------------------------------------- internals
    def _rows_fit(self, n: int) -> int:
        if n > self.rows:
            raise ValueError(f"a batch of {n} rows does not fit the captured step's {self.rows}")
        return n

    def _buffers(self, like: Batch | Cohort) -> Batch:
        """The static inputs, made at the first step with ``like``'s row shapes and dtypes (a batch's
        or a cohort's: the same fields)."""
        if self.static is None:
            def buffer(t: torch.Tensor) -> torch.Tensor:
                return torch.zeros((self.rows, *t.shape[1:]), dtype=t.dtype, device=self.device)

            self.static = Batch({k: buffer(v) for k, v in like.inputs.items()}, buffer(like.present),
                                buffer(like.clinical), buffer(like.time), buffer(like.event),
                                tuple(like.modalities))  # (no ids: the step does not read them)
        return self.static

    def _run(self, n: int) -> StepOutput:
        """The step on the static buffers, whose first ``n`` rows hold this batch."""
        s = self.static
        if n < self.rows:  # rows without any modality (present False): they add nothing
            for t in (*s.inputs.values(), s.present, s.clinical, s.time, s.event):
                t[n:].zero_()
        for rate, group in zip(self.rates, self.opt.param_groups):
            rate.fill_(group["lr"])  # the scheduler's rate for this step (a float: no host sync)
        if not self.capture:
            # as a replay does: this step's gradients replace the last ones and stay on the parameters
            self.opt.zero_grad(set_to_none=True)
            with self._rates_in_optimizer():
                return self._step()
        with torch.cuda.device(self.device):  # the graph's device, whichever is current
            if self.graph is None:
                self._capture()
            self.graph.replay()
        return self.out

    @contextmanager
    def _rates_in_optimizer(self) -> Iterator[None]:
        """The optimizer reads each group's rate from its device tensor (what the graph records)."""
        floats = [group["lr"] for group in self.opt.param_groups]
        for group, rate in zip(self.opt.param_groups, self.rates):
            group["lr"] = rate
        try:
            yield
        finally:
            for group, lr in zip(self.opt.param_groups, floats):
                group["lr"] = lr

    def _forward(self) -> StepOutput:
        with torch.autocast(self.device.type, self.amp, enabled=self.amp is not None,
                            cache_enabled=False):  # autocast's weight cache cannot live across replays
            return self.step_loss(self.static)

    def _step(self) -> StepOutput:
        loss, parts = self._forward()
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        advance_rng_(self.rng)
        return loss.detach(), {k: v.detach() for k, v in parts.items()}

    def _capture(self) -> None:
        """Warm up and capture on one side stream of the training device (the docs' whole-network
        pattern); an empty graph — nothing recorded, which torch only warns about — is an error."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # lazy initialisation; no optimizer step, no RNG advance
            self._forward()[0].backward()  # (its graph, holding masked_mse's saved gradients, goes now)
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # no gradients while capturing: the captured backward writes them (into the graph's memory)
        # instead of adding to them, so each replay's gradients are that batch's alone
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=r".*CUDA Graph is empty.*")
                with self._rates_in_optimizer(), torch.cuda.graph(graph, stream=side):
                    self.out = self._step()
        except Exception as err:
            raise RuntimeError(f"cuda_graph=True: capturing the pre-training step in a CUDA graph on {self.device} "
                               f"failed ({type(err).__name__}: {err}); train with cuda_graph=False") from err
        self.graph = graph
