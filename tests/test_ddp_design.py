"""What the coming torchrun training rests on (docs/architecture.md, "Training under torchrun"),
checked now so that no change breaks it unnoticed: pre-training under ``DistributedDataParallel``
(two CPU processes, gloo), with the fused ops of the default backend and a rank whose batch lacks a
modality altogether.

- every parameter receives a gradient on every rank — zeros for the encoder of a modality no row
  of the rank's batch has — so DDP needs no ``find_unused_parameters`` (a parameter without one
  would stop DDP's second iteration with "Expected to have finished reduction");
- DDP's all-reduce hands every rank the mean of the ranks' own gradients, as computed here in one
  process: the ops give ordinary gradients to the parameters, nothing to synchronise by hand;
- ranks that share a seed draw different masks (``new_rng(seed, rank=r)``).

``train()`` itself still refuses more than one process (``train_config.check_single_process``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from op_testing import TINY_MODEL
from torch import nn

from pyimputmae import _backends, ops
from pyimputmae.data.synthetic import make_cohort
from pyimputmae.model.config import ModelConfig
from pyimputmae.model.mae import ImputeMAE, advance_rng_, new_rng

TINY = ModelConfig.small(**TINY_MODEL)
WORLD = 2
SEED = 3
STEPS = 2  # DDP finds a parameter left without a gradient when the next iteration starts
ROWS = 6


class _Pretrain(nn.Module):
    """DDP runs its synchronisation through the wrapped module's ``forward``: pre-training's is
    ``ImputeMAE.forward_pretrain``."""

    def __init__(self, mae: ImputeMAE) -> None:
        super().__init__()
        self.mae = mae

    def forward(self, batch, rng: torch.Tensor) -> torch.Tensor:
        return self.mae.forward_pretrain(batch, rng, check=False)[0]


def _cohort():
    return make_cohort(n_patients=4 * ROWS, shapes={m.name: m.shape for m in TINY.modalities}, seed=11)


def _rank_batch(cohort, rank: int):
    """Rank 0: rows with every modality the cohort gives them; rank 1: other rows, MRI withheld from all."""
    rows = np.arange(rank * ROWS, (rank + 1) * ROWS)
    return (cohort.withhold("mri") if rank == 1 else cohort).batch(rows)


def _grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in module.named_parameters()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = _Pretrain(ImputeMAE(TINY))
        ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False: the default
        batch = _rank_batch(_cohort(), rank)
        rng = new_rng(SEED, rank=rank)
        steps = []
        for _ in range(STEPS):
            ddp.zero_grad(set_to_none=True)
            loss = ddp(batch, rng)
            loss.backward()
            steps.append({"loss": loss.item(), "grads": _grads(model.mae)})
            advance_rng_(rng)
        torch.save({"steps": steps, "backends": {f: _backends.resolve(f, torch.device("cpu"))
                                                 for f in _backends.FAMILIES}},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous of two spawned processes")
def test_pretraining_under_ddp_averages_each_ranks_own_gradients(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # what each rank computes on its own, in this process: same weights, batch and RNG, no DDP
    torch.manual_seed(0)
    mae = ImputeMAE(TINY)
    cohort = _cohort()
    own = []
    for rank in range(WORLD):
        rng, batch, steps = new_rng(SEED, rank=rank), _rank_batch(cohort, rank), []
        for _ in range(STEPS):
            mae.zero_grad(set_to_none=True)
            loss, _ = mae.forward_pretrain(batch, rng, check=False)
            loss.backward()
            steps.append({"loss": loss.item(), "grads": _grads(mae)})
            advance_rng_(rng)
        own.append(steps)
    assert runs[0]["backends"] == {f: _backends.resolve(f, torch.device("cpu")) for f in _backends.FAMILIES}
    mri = [n for n in own[1][0]["grads"] if n.startswith("encoders.mri.")]
    assert mri and all(not own[1][0]["grads"][n].any() for n in mri)  # rank 1 has no MRI: zero, not None
    for step in range(STEPS):
        losses = [own[r][step]["loss"] for r in range(WORLD)]
        assert [runs[r]["steps"][step]["loss"] for r in range(WORLD)] == pytest.approx(losses, rel=1e-6)
        assert losses[0] != losses[1]
        for name, g0 in own[0][step]["grads"].items():
            g1 = own[1][step]["grads"][name]
            assert g0 is not None and g1 is not None, name  # every parameter has a gradient on every rank
            mean = (g0 + g1) / 2
            for r in range(WORLD):
                got = runs[r]["steps"][step]["grads"][name]
                torch.testing.assert_close(got, mean, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    # ranks that share a seed draw different masks
    present = torch.ones(1, len(mae.names), dtype=torch.bool)
    masks = [ops.random_keep(present, mae.lengths, mae.ratios, new_rng(SEED, rank=r))[1] for r in range(WORLD)]
    assert not torch.equal(masks[0], masks[1])
