#!/usr/bin/env python3
"""Issue 6's performance targets, judged from the files of one GPU run (``tools/gpu_check.sh``).

    python tools/gpu_targets.py OUTDIR [--json targets.json]

Reads ``OUTDIR/bench_large.json`` (``tools/bench.py --size large``) and ``OUTDIR/e2e.json``
(``tools/e2e_step.py``) and prints one Markdown table row per target: what was measured, the
threshold, and the verdict. Every ratio is taken within one file, i.e. one run on one card, as
the issue asks; nothing is combined across runs.

A verdict is ``met``, ``missed`` or ``not measured`` (with the reason: a file or record missing,
records of another size than ``large``, no backend whose correctness guard passed or a best
backend whose guard did not run (``--no-check``), a reference mode that did not finish, or a card
other than an H100/H200, none named, or ours and the reference's on different cards). The
end-to-end target counts as measured only when every default mode of the reference script
(eager fp32, eager bf16, compile bf16) finished in the same call, at the
authors' configuration, batch 96, bf16: the target is against its best mode, and a mode that did
not finish may be the best (but a speed-up under 2× against the modes that did is a miss: the
missing ones can only raise the bar). A target whose every timed backend of ours failed its
correctness guard is missed.

Exit status: 0 when every target was measured and met, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # beside e2e_step.py, also when loaded by path
from e2e_step import ANCHOR_DECODER_MLP, REFERENCE_MODES  # the reference's default modes: its best is among them

#: the cards the issue's targets are set for
TARGET_CARDS = ("H100", "H200")
#: the bench size the kernel targets are set at (DESIGN.md section 5)
BENCH_SIZE = "large"
#: the end-to-end target's setting: the authors' configuration, batch 96, bf16 (tools/e2e_step.py's defaults)
E2E_SETTINGS = {"config": "paper", "batch": 96, "dtype": "bf16"}
#: allowance over the gradient for "no memory beyond the gradient" (the per-program partial losses)
MSE_EXTRA_SLACK_MB = 1.0


@dataclass
class Verdict:
    target: str
    measured: str
    threshold: str
    verdict: str  # "met", "missed" or "not measured: <why>"


def _fmt_x(v: float) -> str:
    return f"{v:.2f}×"


class BenchRun:
    """The records of one ``bench.py --json`` file."""

    def __init__(self, path: Path) -> None:
        data = json.loads(path.read_text())
        self.meta = data.get("meta", {})
        self.records = data.get("records", [])

    def card_problem(self) -> str | None:
        device = str(self.meta.get("device", ""))
        if self.meta.get("device_type", "cuda") != "cuda":
            return f"run on {self.meta.get('device_type')} ({device}), not a GPU"
        if not any(card in device for card in TARGET_CARDS):
            return f"run on {device or 'an unnamed device'}, not an H100 or H200"
        return None

    def summary(self, op: str, pass_: str, dtype: str) -> dict | None:
        """The summary of ``op``/``pass_``/``dtype`` at :data:`BENCH_SIZE` (a record of another size
        is not the target's measurement)."""
        for r in self.records:
            if r.get("summary") and (r.get("op"), r.get("pass"), r.get("dtype"), r.get("size")) == (
                    op, pass_, dtype, BENCH_SIZE):
                return r
        return None

    def ours(self, op: str, pass_: str, dtype: str) -> list[dict]:
        """The records of our backends (not baselines, not summaries) for ``op``/``pass_``/``dtype``
        at :data:`BENCH_SIZE`."""
        return [r for r in self.records if not r.get("summary") and r.get("baseline") is None
                and (r.get("op"), r.get("pass"), r.get("dtype"), r.get("size")) == (op, pass_, dtype, BENCH_SIZE)]

    def backend(self, op: str, pass_: str, dtype: str, backend: str) -> dict | None:
        return next((r for r in self.ours(op, pass_, dtype) if r.get("backend") == backend), None)

    def no_best_reason(self, op: str, pass_: str, dtype: str) -> str:
        """The verdict when no backend of ours is the best: ``missed`` when some were timed and every
        one failed its correctness guard (a result that is wrong is no result), else ``not measured``."""
        timed = [r for r in self.ours(op, pass_, dtype) if r.get("median_ms")]
        if timed:
            failed = ", ".join(f"{r['backend']} ({str(r.get('check'))[:60]})" for r in timed)
            return f"missed: every timed backend of ours failed its correctness guard: {failed}"
        return "not measured: no backend of ours was timed"


def _best(run: BenchRun, op: str, pass_: str, dtype: str, target: str,
          threshold: str) -> tuple[dict, None] | tuple[None, Verdict]:
    """The summary record of ``op``/``pass_``/``dtype`` when one of our backends is its best and its
    correctness guard passed, else the verdict."""
    s = run.summary(op, pass_, dtype)
    if s is None:
        why = f"not measured: no {op} {pass_} {dtype} record at size {BENCH_SIZE}"
        return None, Verdict(target, "-", threshold, why)
    if not s.get("best_backend"):
        return None, Verdict(target, "-", threshold, run.no_best_reason(op, pass_, dtype))
    # bench.py's summary also takes a backend whose guard did not run (--no-check): not a result here
    r = run.backend(op, pass_, dtype, s["best_backend"])
    check = str(r.get("check")) if r and r.get("check") is not None else "no check recorded"
    if not check.startswith("ok"):
        return None, Verdict(target, "-", threshold,
                             f"not measured: the best backend, {s['best_backend']}, has no passed correctness guard "
                             f"({check[:60]}); run tools/bench.py without --no-check")
    return s, None


def _ratio_target(run: BenchRun, op: str, pass_: str, dtype: str, baseline: str, at_least: float,
                  label: str) -> Verdict:
    threshold = f"≥ {at_least:g}× {label}"
    target = f"`{op}` {dtype} {pass_}: speed-up over {label}"
    s, verdict = _best(run, op, pass_, dtype, target, threshold)
    if s is None:
        return verdict
    value = s.get(f"speedup_vs_{baseline}")
    if value is None:
        return Verdict(target, "-", threshold, f"not measured: the {label} baseline has no time")
    measured = f"{_fmt_x(value)} ({s['best_backend']} {s['best_ms']:.4g} ms)"
    return Verdict(target, measured, threshold, "met" if value >= at_least else "missed")


def _roofline_target(run: BenchRun, op: str, pass_: str, dtype: str, at_least: float) -> Verdict:
    threshold = f"≥ {at_least:.0%} of the copy bandwidth"
    target = f"`{op}` {dtype} {pass_}: memory roofline"
    s, verdict = _best(run, op, pass_, dtype, target, threshold)
    if s is None:
        return verdict
    r = run.backend(op, pass_, dtype, s["best_backend"])
    frac = r.get("roofline_frac") if r else None
    if frac is None:
        return Verdict(target, "-", threshold, "not measured: no roofline fraction recorded")
    measured = f"{frac:.1%} ({r['gbps']:.0f} GB/s, {s['best_backend']})"
    return Verdict(target, measured, threshold, "met" if frac >= at_least else "missed")


def _mse_memory_target(run: BenchRun) -> Verdict:
    op, pass_, dtype = "masked_mse", "fwd+bwd", "fp32"
    target = f"`{op}` {dtype} {pass_}: memory beyond the gradient"
    s, verdict = _best(run, op, pass_, dtype, target, "≤ the gradient")
    if s is None:
        return verdict
    r = run.backend(op, pass_, dtype, s["best_backend"])
    if r is None or r.get("peak_extra_mb") is None or "pred" not in (r.get("shape") or {}):
        return Verdict(target, "-", "≤ the gradient", "not measured: no peak-memory record of the best backend")
    numel = 1
    for n in r["shape"]["pred"]:
        numel *= n
    grad_mb = numel * 4 / 2**20
    extra = r["peak_extra_mb"]
    measured = f"{extra:.1f} MB peak beyond the inputs; gradient {grad_mb:.1f} MB ({s['best_backend']})"
    threshold = f"≤ {grad_mb:.1f} + {MSE_EXTRA_SLACK_MB:g} MB"
    return Verdict(target, measured, threshold, "met" if extra <= grad_mb + MSE_EXTRA_SLACK_MB else "missed")


def bench_verdicts(path: Path) -> list[Verdict]:
    if not path.exists():
        why = f"not measured: {path.name} is missing"
        names = ["masked_mse", "masking_fill", "patch_embed3d", "patch_embed3d_keep50"]
        return [Verdict(f"`{n}` (every target)", "-", "-", why) for n in names]
    run = BenchRun(path)
    verdicts = [
        _roofline_target(run, "masked_mse", "fwd+bwd", "fp32", 0.70),
        _ratio_target(run, "masked_mse", "fwd+bwd", "fp32", "eager", 4.0, "eager"),
        _ratio_target(run, "masked_mse", "fwd+bwd", "fp32", "compile", 4.0, "torch.compile"),
        _mse_memory_target(run),
        _roofline_target(run, "masking_fill", "fwd+bwd", "fp32", 0.60),
        _ratio_target(run, "masking_fill", "fwd+bwd", "fp32", "eager", 3.0, "eager"),
    ]
    for pass_ in ("fwd", "fwd+bwd"):
        verdicts += [
            _ratio_target(run, "patch_embed3d", pass_, "bf16", "compile", 1.2, "compiled reshape + F.linear"),
            _ratio_target(run, "patch_embed3d", pass_, "bf16", "conv", 10.0, "nn.Conv3d"),
            _ratio_target(run, "patch_embed3d_keep50", pass_, "bf16", "compile", 2.0,
                          "compiled reshape + F.linear over all patches"),
        ]
    problem = run.card_problem()
    if problem:
        for v in verdicts:
            if v.verdict in ("met", "missed"):
                v.verdict = f"not measured: {problem} (would be {v.verdict})"
    return verdicts


def e2e_verdict(path: Path, like_for_like: bool = False) -> Verdict:
    """The whole-step target from ``e2e.json``: our fastest mode at the authors' configuration against
    the reference's best. like_for_like: our modes with the anchor's decoder MLP instead (the same work
    per patient as the anchor; reported beside the issue's measurement, not part of it)."""
    target = "whole pre-training step (batch 96, bf16): patients/s and peak memory against the reference's best mode"
    suffix = f"-mlp{ANCHOR_DECODER_MLP}"
    if like_for_like:
        target += (f"; ours with the anchor's decoder MLP ({ANCHOR_DECODER_MLP}, the authors' is 512): like for "
                   "like, beside the issue's measurement")
    threshold = "≥ 2× its patients/s, lower peak memory"
    if not path.exists():
        return Verdict(target, "-", threshold, f"not measured: {path.name} is missing")
    data = json.loads(path.read_text())
    ours = {k: v for k, v in (data.get("ours") or {}).items()
            if isinstance(v, dict) and "patients_per_s" in v and k.endswith(suffix) == like_for_like}
    ref = data.get("reference") or {}
    refs = {k: v for k, v in ref.items() if isinstance(v, dict) and "patients_per_s" in v}
    if not ours:
        return Verdict(target, "-", threshold, "not measured: no mode of ours finished")
    settings = {"config": data.get("config"), "batch": data.get("batch"), "dtype": data.get("dtype")}
    if settings != E2E_SETTINGS:
        return Verdict(target, "-", threshold, f"not measured: run with {settings}, the target is {E2E_SETTINGS}")
    best = max(ours, key=lambda k: ours[k]["patients_per_s"])
    missing = [m for m in REFERENCE_MODES if m not in refs]
    if not refs:
        return Verdict(target, f"ours {best}: {ours[best]['patients_per_s']:.0f} patients/s", threshold,
                       "not measured: the reference script gave no result")
    best_ref = max(refs, key=lambda k: refs[k]["patients_per_s"])
    speedup = ours[best]["patients_per_s"] / refs[best_ref]["patients_per_s"]
    peak, ref_peak = ours[best].get("peak_GB"), refs[best_ref].get("peak_GB")
    measured = (f"ours {best}: {ours[best]['patients_per_s']:.0f} patients/s, {_fmt_gb(peak)}; reference {best_ref}: "
                f"{refs[best_ref]['patients_per_s']:.0f} patients/s, {_fmt_gb(ref_peak)} → {_fmt_x(speedup)}")
    met = speedup >= 2.0 and peak is not None and ref_peak is not None and peak < ref_peak
    if missing:
        unfinished = f"the reference's {', '.join(missing)} did not finish ({ref.get('error', 'no result')})"
        if speedup >= 2.0:
            return Verdict(target, measured, threshold, f"not measured: {unfinished}; against the modes that did "
                           f"it would be {'met' if met else 'missed'}")
        verdict = f"missed (even before {unfinished})"  # a mode that did not finish can only raise the bar
    else:
        verdict = "met" if met else "missed"
    problem = _e2e_card_problem(data, ref)
    if problem:
        verdict = f"not measured: {problem} (would be {verdict})"
    return Verdict(target, measured, threshold, verdict)


def _fmt_gb(v: float | None) -> str:
    return f"{v:.2f} GB" if v is not None else "peak not recorded"


def _e2e_card_problem(data: dict, ref: dict) -> str | None:
    """Why the e2e call is not the issue's measurement card-wise: a card other than an H100/H200,
    none named, or ours and the reference on different cards; None when it is."""
    devices = list(dict.fromkeys(str(d) for d in (data.get("device"), ref.get("device")) if d))
    if not devices:
        return "run on an unnamed device, not an H100 or H200"
    off = [d for d in devices if not any(card in d for card in TARGET_CARDS)]
    if off:
        return f"run on {', '.join(off)}, not an H100 or H200"
    if len(devices) > 1:
        return f"ours ran on {devices[0]}, the reference on {devices[1]}: not one card"
    return None


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table (cells as given: no escaping)."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(verdicts: list[Verdict]) -> str:
    return "\n".join(table(["target", "measured", "threshold", "verdict"],
                           [[str(v.target), str(v.measured), str(v.threshold), str(v.verdict)] for v in verdicts]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path, help="the folder tools/gpu_check.sh wrote (or its unpacked bundle)")
    p.add_argument("--json", type=Path, default=None, help="also write the verdicts here")
    args = p.parse_args(argv)
    if not args.outdir.is_dir():
        p.error(f"{args.outdir} is not a folder")
    verdicts = [*bench_verdicts(args.outdir / "bench_large.json"), e2e_verdict(args.outdir / "e2e.json")]
    alike = e2e_verdict(args.outdir / "e2e.json", like_for_like=True)  # shown, not part of the exit status
    print(markdown([*verdicts, alike]))
    if args.json:
        args.json.write_text(json.dumps([asdict(v) for v in [*verdicts, alike]], indent=1))
    return 0 if all(v.verdict == "met" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
