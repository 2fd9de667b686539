"""Discrete-time survival: interval cuts, the logistic-hazard likelihood, hazards → survival curves.

The model predicts one logit per time interval (Kvamme & Borgan's *logistic hazard*, pycox's
``LogisticHazard``); this module turns continuous ``(time, event)`` labels into interval indices,
scores logits against them, and turns logits back into survival curves on the time grid.

Layout: ``n`` intervals need ``n + 1`` cut points ``0 = c_0 < c_1 < … < c_n = t_max``.
Logit ``j`` is the hazard of interval ``j = (c_j, c_{j+1}]`` (interval 0 also holds time 0),
i.e. ``P(death in interval j | alive at c_j) = sigmoid(logit_j)``, and the survival curve
lives on the cuts: ``S(c_0) = 1``, ``S(c_{j+1}) = Π_{i≤j} (1 − h_i)``.

Relation to pycox: ``LogisticHazard.label_transform(n + 1)`` has the same ``n + 1`` cuts but
one output per *cut*, the first of which is the hazard "at time 0" (it only ever sees the rare
events at exactly 0). Our interval ``j`` is pycox's output ``j + 1`` and our labels are pycox's
labels minus one, so nothing is lost except that extra output — see :meth:`IntervalCuts.transform`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IntervalCuts", "hazards_to_survival", "nll_logistic_hazard", "survival_at"]


class IntervalCuts:
    """Equidistant discretisation of follow-up time, fitted on the training split.

    ``IntervalCuts.fit(times_train, n_bins=20)`` → cuts ``linspace(0, max(times_train), n_bins + 1)``
    (pycox's "equidistant" scheme); ``IntervalCuts(cuts)`` rebuilds it from known cuts. ``cuts``:
    ``(n_bins + 1,)`` float64 numpy. The cuts travel with the model (:meth:`to_dict` /
    :meth:`from_dict`) so that test labels and predicted curves use the training grid.
    """

    def __init__(self, cuts: np.ndarray | torch.Tensor | list[float]) -> None:
        c = _to_numpy(cuts).astype(np.float64).reshape(-1)
        if c.size < 2:
            raise ValueError(f"cuts must hold at least 2 points, got {c.size}")
        if not np.all(np.isfinite(c)) or not np.all(np.diff(c) > 0):
            raise ValueError(f"cuts must be finite and strictly increasing, got {c.tolist()}")
        self.cuts: np.ndarray = c

    @classmethod
    def fit(cls, times_train: np.ndarray | torch.Tensor, n_bins: int = 20) -> IntervalCuts:
        """``n_bins`` equal intervals from 0 to the largest training time.

        times_train: ``(N,)`` follow-up times (events and censorings alike), in the data's unit.
        """
        times = _to_numpy(times_train).astype(np.float64).reshape(-1)
        if n_bins < 1:
            raise ValueError(f"n_bins must be at least 1, got {n_bins}")
        if times.size == 0 or not np.all(np.isfinite(times)) or times.min() < 0:
            raise ValueError("times_train must be a non-empty array of finite, non-negative times")
        if times.max() <= 0:
            raise ValueError(f"times_train must contain a positive time to place the cuts, max is {times.max()}")
        return cls(np.linspace(0.0, times.max(), n_bins + 1))

    @property
    def n_bins(self) -> int:
        """Number of intervals = number of logits the model outputs."""
        return self.cuts.size - 1

    def transform(
        self, time: np.ndarray | torch.Tensor, event: np.ndarray | torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor]:
        """Labels for :func:`nll_logistic_hazard`.

        time, event: ``(N,)`` (numpy or torch; the result has the same kind and device) →
        ``idx_duration`` ``(N,)`` int64 and ``event`` ``(N,)`` float32.

        Exactly pycox's ``LabTransDiscreteTime`` (``IdxDiscUnknownC``) mapping, shifted by one:

        - an event at ``t`` goes to the interval that holds it, ``(c_j, c_{j+1}] → j``
          (right-closed, so an event on a cut belongs to the interval that ends there); an event
          at time 0 falls in interval 0;
        - a censoring at ``t`` moves *left* to the cut ``c_k ≤ t < c_{k+1}``: the patient is
          known to have survived intervals ``0 … k − 1``, so ``idx = k − 1``. A patient censored
          before ``c_1`` carries no information and gets ``idx = −1`` (no term in the loss),
          where pycox spends its extra "time 0" output on them;
        - a time beyond the last cut (test data) is censored at ``c_n``: ``idx = n − 1``, event 0.
        """
        cuts = self.cuts
        as_torch = isinstance(time, torch.Tensor)
        device = time.device if as_torch else None
        t = torch.as_tensor(_to_numpy(time), dtype=torch.float64).reshape(-1)
        e = torch.as_tensor(_to_numpy(event)).reshape(-1).to(torch.float64)
        if t.shape != e.shape:
            raise ValueError(f"time and event must have the same length, got {t.numel()} and {e.numel()}")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError("times must be finite and non-negative")
        c = torch.as_tensor(cuts, dtype=torch.float64)
        beyond = t > c[-1]
        t = torch.where(beyond, c[-1], t)
        is_event = (e != 0) & ~beyond
        idx_event = (torch.searchsorted(c, t, right=False) - 1).clamp_min(0)
        idx_censor = torch.searchsorted(c, t, right=True) - 2
        idx = torch.where(is_event, idx_event, idx_censor).to(torch.int64)
        ev = is_event.to(torch.float32)
        if as_torch:
            return idx.to(device), ev.to(device)
        return idx.numpy(), ev.numpy()

    def to_dict(self) -> dict:
        """JSON-friendly state: ``{"cuts": [...], "n_bins": n}``."""
        return {"cuts": [float(c) for c in self.cuts], "n_bins": self.n_bins}

    @classmethod
    def from_dict(cls, state: dict) -> IntervalCuts:
        return cls(state["cuts"])

    def __repr__(self) -> str:
        return f"IntervalCuts(n_bins={self.n_bins}, t_max={self.cuts[-1]:.4g})"


def nll_logistic_hazard(
    logits: torch.Tensor, idx_durations: torch.Tensor, events: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Negative log-likelihood of the logistic-hazard model (pycox ``nll_logistic_hazard``).

    logits: ``(B, n)`` (any float dtype; computed in fp32), idx_durations: ``(B,)`` int64 in
    ``[−1, n)``, events: ``(B,)`` 0/1 (float or bool) → loss ``()`` for ``"mean"``/``"sum"``,
    ``(B,)`` for ``"none"``; fp32 (fp64 for fp64 logits).

    Row ``b`` scores every interval up to and including ``idx_durations[b]`` with a binary
    cross-entropy on the logit: target 1 at its index if it is an event, 0 everywhere else
    (survived that interval), and sums them. An index of −1 (censored before the first cut)
    contributes 0. BCE-with-logits keeps it finite for any finite logit.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, n_bins), got shape {tuple(logits.shape)}")
    phi = logits.double() if logits.dtype == torch.float64 else logits.float()
    n = phi.shape[1]
    idx = idx_durations.reshape(-1, 1).to(device=phi.device, dtype=torch.int64)
    if idx.shape[0] != phi.shape[0]:
        raise ValueError(f"idx_durations has {idx.shape[0]} rows for {phi.shape[0]} rows of logits")
    # Range check only where it costs no device sync and does not break a compiled graph.
    if idx.device.type == "cpu" and not torch.compiler.is_compiling() and idx.numel() > 0:
        lo, hi = int(idx.min()), int(idx.max())
        if hi >= n or lo < -1:
            raise ValueError(f"idx_durations must lie in [-1, {n}) for {n} logits, got [{lo}, {hi}]")
    ev = events.reshape(-1, 1).to(device=phi.device, dtype=phi.dtype)
    grid = torch.arange(n, device=phi.device).unsqueeze(0)
    target = (grid == idx).to(phi.dtype) * ev
    bce = F.binary_cross_entropy_with_logits(phi, target, reduction="none")
    loss = torch.where(grid <= idx, bce, torch.zeros_like(bce)).sum(1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def hazards_to_survival(logits: torch.Tensor) -> torch.Tensor:
    """Survival curves at the cuts from interval logits.

    logits: ``(B, n)`` → ``(B, n + 1)`` fp32 (fp64 for fp64 logits) with ``S[:, 0] = 1`` and
    ``S[:, j + 1] = Π_{i≤j} (1 − sigmoid(logits[:, i]))``, computed as ``exp(cumsum(logsigmoid(−x)))``
    (exact where pycox adds ``1e-7`` inside the log).
    """
    phi = logits.double() if logits.dtype == torch.float64 else logits.float()
    log_surv = torch.cumsum(F.logsigmoid(-phi), dim=1)
    ones = torch.zeros_like(log_surv[:, :1])
    return torch.exp(torch.cat([ones, log_surv], dim=1))


def survival_at(
    surv: np.ndarray | torch.Tensor, cuts: np.ndarray | torch.Tensor, times: np.ndarray | torch.Tensor
) -> np.ndarray | torch.Tensor:
    """Step-wise survival ``S(t)`` between the cuts, as pycox's ``EvalSurv`` (``steps="post"``).

    surv: ``(B, T)`` curves at ``cuts`` ``(T,)`` (increasing), times: ``(K,)`` → ``(B, K)``:
    ``S(t) = surv[:, k]`` with ``c_k ≤ t < c_{k+1}``; a time before the first cut reads
    ``surv[:, 0]``, one beyond the last ``surv[:, -1]``. Returns torch when ``surv`` is torch.
    """
    if isinstance(surv, torch.Tensor):
        c = torch.as_tensor(cuts, device=surv.device, dtype=torch.float64).reshape(-1)
        t = torch.as_tensor(times, device=surv.device, dtype=torch.float64).reshape(-1)
        idx = (torch.searchsorted(c, t, right=True) - 1).clamp(0, c.numel() - 1)
        return surv.index_select(-1, idx)
    c = np.asarray(cuts, dtype=np.float64).reshape(-1)
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    idx = np.clip(np.searchsorted(c, t, side="right") - 1, 0, c.size - 1)
    return np.asarray(surv)[..., idx]


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
