#!/usr/bin/env python3
"""One GPU run's results as a section for docs/benchmarks.md; with ``--apply``, the run archived and
the backends it validated written into ``pyimputmae/_backends.py``.

    python tools/gpu_report.py OUTDIR            # writes OUTDIR/report.md (--report PATH) and prints it
    python tools/gpu_report.py OUTDIR --apply [--runs-dir docs/gpu-runs]

OUTDIR is what ``tools/gpu_check.sh OUTDIR`` left (``gpu_check.tar.gz`` and copies of its key files
beside it, the last written: they win) or a folder holding the unpacked bundle. The report gives
the card, driver, torch / triton versions, date, commit and command (``env.txt``, ``summary.tsv``),
each step's status and seconds, the kernel tables of ``bench_large.json`` and ``bench_paper.json``,
the end-to-end table of ``e2e.json``, the patch-embedding tile sweep
(``patch_embed_sweep.json``), issue 6's verdicts (``tools/gpu_targets.py``) and the
validated pairs and CUDA order (``tools/gpu_validated.py``). What the run did not measure (a file
missing, a step that timed out) is said so, with the reason; it never gets a number.

``--apply`` (in the git checkout holding this file, or ``--repo``) is refused, exit status 2, when
the run's commit (``env.txt``'s; ``--commit`` when it names none) is not an ancestor of HEAD, when
HEAD or the working tree differs from it in ``csrc/``, ``kernels/``, ``pyimputmae/ops/`` or
``pyimputmae/reference/`` (the run validated other kernels), or when the run's folder,
``<runs-dir>/<YYYY-MM-DD>-<card>/`` (or ``--name``), exists and is not empty. Otherwise every file
of the run and ``report.md`` go into that folder, and the statements ``GPU_VALIDATED``, ``GPU_VALIDATED_FP16`` and
``CUDA_ORDER`` of ``pyimputmae/_backends.py`` are rewritten with the run's values (left as they are
when the op tests left no verdicts); each is written aside and renamed into place, and the change
is printed. It does not edit docs/benchmarks.md (paste the report into its Results section) nor
decide ``cuda_graph``'s default.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other tools, also when loaded by path
import gpu_targets
import gpu_validated
from bench_config import BASELINES
from bench_config import OUR_BACKENDS as OURS
from e2e_step import REFERENCE_MODES  # (puts the checkout on sys.path)

from pyimputmae._atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = "gpu_check.tar.gz"
#: gpu_check.sh's summary.tsv step → its stage (a step named like its stage is left out)
STEP_STAGE = {"build-python-only": "build", "prebuilt": "build", "prebuilt-install": "build", "info": "build",
              "kernel-check": "test", "test-triton-only": "test", "bench-large": "bench", "ref-step": "e2e",
              "activations": "e2e", "bench-paper": "paper"}
STAGES = ("env", "build", "test", "bench", "e2e", "sweep", "train", "test16", "paper", "sanitize")
#: the result files of a run → the summary.tsv steps that write them
FILE_STEPS = {"env.txt": ("env",), "stage1_kernel_check.log": ("kernel-check",),
              "junit_ops.xml": ("test", "test-triton-only"), "bench_large.json": ("bench-large",),
              "e2e.json": ("e2e",), "ref_step.json": ("ref-step", "e2e"), "patch_embed_sweep.json": ("sweep",),
              "junit_train.xml": ("train",), "junit_ops_fp16.xml": ("test16",), "bench_paper.json": ("bench-paper",)}
#: where a run's validation would stop holding: a change here after the run's commit
KERNEL_PATHS = ("csrc", "kernels", "pyimputmae/ops", "pyimputmae/reference")
#: the statements of pyimputmae/_backends.py that --apply rewrites, as they begin there
HEADS = {"GPU_VALIDATED": "GPU_VALIDATED", "GPU_VALIDATED_FP16": "GPU_VALIDATED_FP16: frozenset[tuple[str, str]]",
         "CUDA_ORDER": "CUDA_ORDER: dict[str, tuple[str, ...]]"}
LINE_LENGTH = 120  # ruff's, pyproject.toml


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _cell(text: object, limit: int = 0) -> str:
    """Text for a Markdown table cell: one line, no column breaks, at most ``limit`` characters."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s[:limit - 1] + "…" if limit and len(s) > limit else s


# --------------------------------------------------------------------------------------- the run
class Run:
    """The files of one ``gpu_check.sh`` call, unpacked in ``folder``."""

    def __init__(self, folder: Path, problems: list[str] | None = None) -> None:
        self.dir = folder
        self.problems = problems or []  # what could not be read, for the report
        self.env = _parse_env(folder / "env.txt")
        summary = folder / "summary.tsv"
        rows = summary.read_text(encoding="utf-8", errors="replace").splitlines()[1:] if summary.exists() else []
        self.steps = [[*f, "", ""][:3] for f in (r.split("\t") for r in rows) if f and f[0]]
        lines: list[str] = []
        self.validation = gpu_validated.validate(folder, lines.append)
        self.validation_lines = [ln.replace(f"{folder}{os.sep}", "") for ln in lines]

    def status(self, *steps: str) -> tuple[str, str, str] | None:
        """summary.tsv's last row of any of ``steps``: (step, status, seconds)."""
        rows = [r for r in self.steps if r[0] in steps]
        return tuple(rows[-1]) if rows else None

    def why_missing(self, name: str) -> str:
        steps = FILE_STEPS.get(name, ())
        if name == "env.txt":
            return "env.txt is missing: the env stage did not run in this call"
        if name == "summary.tsv":
            return "summary.tsv is missing: is this a folder tools/gpu_check.sh wrote?"
        if not (self.dir / "summary.tsv").exists():
            return f"{name} is missing, and so is summary.tsv: no step's outcome is known"
        row = self.status(*steps)
        if row is None:
            stage = STEP_STAGE.get(steps[0], steps[0]) if steps else "?"
            return f"{name} is missing: its stage ({stage}) did not run in this call (not in summary.tsv)"
        return f"{name} is missing; summary.tsv: {row[0]} {row[1]} ({row[2]} s)"

    def unfinished(self, step: str) -> str | None:
        """A note when ``step`` did not end well: its file holds only what it wrote before."""
        row = self.status(step)
        if row and row[1] != "ok":
            return (f"Step {row[0]}: {row[1]} ({row[2]} s): the figures above are what it wrote before it "
                    "stopped; what it did not reach is not measured.")
        return None

    def stages(self) -> list[str]:
        """The stages of the call, in order, as summary.tsv shows them (env: its file)."""
        out = ["env"] if (self.dir / "env.txt").exists() else []
        for step, _, _ in self.steps:
            stage = STEP_STAGE.get(step, step)
            stage = "bench" if step.startswith("overhead-") else "sanitize" if step.startswith("sanitize-") else stage
            if stage in STAGES and stage not in out:
                out.append(stage)
        return out

    def card(self) -> str | None:
        if "gpu" in self.env:
            return self.env["gpu"].split(" | ")[0].strip()
        for name in ("bench_large.json", "e2e.json"):
            if (self.dir / name).exists():
                data = json.loads((self.dir / name).read_text(encoding="utf-8"))
                device = (data.get("meta") or {}).get("device") or data.get("device")
                if device and device != "cpu":
                    return str(device)
        return None

    def date(self) -> str | None:
        match = re.match(r"\d{4}-\d\d-\d\d", self.env.get("date", ""))
        return match.group(0) if match else None

    def e2e_modes(self) -> list[str] | None:
        """Our end-to-end modes asked for (the e2e step's command line in its log)."""
        log = self.dir / "stage3_e2e.log"
        match = log.exists() and re.search(r"--modes (\S+)", log.read_text(encoding="utf-8", errors="replace"))
        return match.group(1).split(",") if match else None


#: env.txt (gpu_check.sh's env stage) → the fields the report names
ENV_FIELDS = {"date": r"^date: (\S+)", "commit": r"\bcommit: (\S+)", "gpu": r"^gpu (?!check:)(.+)$",
              "driver": r"Driver Version: (\S+)", "cuda_driver": r"CUDA Version: (\S+)",
              "torch": r"^torch:? (.+)$", "triton": r"^triton:? (.+)$", "python": r"^python (\S+)"}


def _parse_env(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    found = {key: re.search(pattern, text, re.MULTILINE) for key, pattern in ENV_FIELDS.items()}
    return {key: m.group(1).strip() for key, m in found.items() if m}


def unpack(outdir: Path, work: Path) -> Run:
    """The run in ``outdir``: its bundle unpacked into ``work`` with the files beside it copied over
    (the key files, copied after the last bundle), or ``outdir`` itself when it holds no bundle."""
    bundle = outdir / BUNDLE
    if not bundle.exists():
        return Run(outdir)
    problems = []
    try:
        with tarfile.open(bundle) as tar:
            members = tar.getmembers()
            bad = [m.name for m in members if Path(m.name).is_absolute() or ".." in Path(m.name).parts]
            if bad:
                raise tarfile.TarError(f"members outside the folder: {', '.join(bad[:3])}")
            safe = [m for m in members if m.isfile() or m.isdir()]
            tar.extractall(work, members=safe, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"{bundle.name} could not be read ({err}): only the files beside it are reported")
    for f in outdir.iterdir():
        if f.is_file() and f.name not in (BUNDLE, "report.md"):
            shutil.copyfile(f, work / f.name)
    return Run(work, problems)


# ------------------------------------------------------------------------------------ the report
def header(run: Run, archive: str | None) -> list[str]:
    e, card, date = run.env, run.card() or "an unnamed card", run.date() or "an unknown date"
    lines = [f"#### {card}, {date}, commit `{e.get('commit', 'unknown')[:12]}` — `tools/gpu_check.sh`", ""]
    if not e:
        lines.append(f"Card, driver, versions, date and commit: not measured: {run.why_missing('env.txt')}.")
    else:
        gpu = e.get("gpu", "no GPU named in env.txt").split(" | ")
        text = f"Card: {gpu[0]}" + (f" ({', '.join(gpu[1:])})" if len(gpu) > 1 else "")
        if "driver" in e:
            text += f", driver {e['driver']}" + (f" (CUDA {e['cuda_driver']})" if "cuda_driver" in e else "")
        text += (f"; torch {e.get('torch', 'unknown').split(' | ')[0]}, triton {e.get('triton', 'unknown')}, "
                 f"python {e.get('python', 'unknown')}. Date {e.get('date', 'unknown')}, commit "
                 f"`{e.get('commit', 'unknown')}`.")
        lines.append(text)
    stages = run.stages()
    command = f"`bash tools/gpu_check.sh $OUT {' '.join(stages)}`" if run.steps else "unknown (no summary.tsv)"
    lines += ["", f"Command: {command} (the stages as summary.tsv lists them)."]
    if archive:
        lines.append(f"Every file of the run: `{archive}/`.")
    return lines


def stage_section(run: Run) -> list[str]:
    lines = ["*Steps* (`summary.tsv`):", ""]
    if not run.steps:
        return [*lines, f"Not measured: {run.why_missing('summary.tsv')}."]
    return lines + gpu_targets.table(["step", "status", "seconds"], [[s, _cell(st), sec] for s, st, sec in run.steps])


def _bench_row_key(r: dict) -> tuple[str, str, str]:
    return r["op"], r["pass"], r["dtype"]


def _time_cell(r: dict | None) -> str:
    """A bench record's median ms, or why it has none ("—": no record)."""
    if r is None:
        return "—"
    return f"{r['median_ms']:.3f}" if r.get("median_ms") else "skipped" if "skipped" in r else "error"


def bench_section(run: Run, name: str, step: str) -> list[str]:
    """One table row per op/pass/dtype of ``name`` (a tools/bench.py --json file)."""
    lines = [f"*Kernels* (`{name}`):", ""]
    path = run.dir / name
    if not path.exists():
        return [*lines, f"Not measured: {run.why_missing(name)}."]
    data = json.loads(path.read_text(encoding="utf-8"))
    meta, records = data.get("meta") or {}, data.get("records") or []
    timed = [r for r in records if r.get("op") and r.get("pass") and not r.get("summary") and not r.get("header")]
    summaries = [r for r in records if r.get("summary")]
    best_of = {_bench_row_key(s): s for s in summaries}
    groups: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in timed:
        groups.setdefault(_bench_row_key(r), {})[r.get("baseline") or r.get("backend")] = r
    ours = [b for b in OURS if any(b in g for g in groups.values())]
    bases = [b for b in BASELINES if any(b in g for g in groups.values())]
    quick = " (quick)" if meta.get("quick") else ""
    tflops = ", ".join(f"{k} {v:.0f}" for k, v in (meta.get("matmul_tflops") or {}).items()) or "not measured"
    lines += [f"{meta.get('device', 'device not named')}, size {meta.get('size', '?')}{quick}, copy bandwidth "
              f"{_num(meta.get('copy_gbps'), '.0f', ' GB/s')}, matmul TFLOP/s {tflops}; torch {meta.get('torch')}, "
              f"triton {meta.get('triton')}; commit `{meta.get('git_commit')}`; timer: {meta.get('timer')}; "
              f"`{meta.get('command', 'command not recorded')}`.", ""]
    head = ["op", "pass", "dtype", *(f"{b} ms" for b in (*ours, *bases)), "best of ours", *(f"× {b}" for b in bases),
            "% roofline", "TFLOP/s", "peak MB (best / eager)", "check"]
    rows, notes = [], {}
    for key, g in groups.items():
        s = best_of.get(key, {})
        best = g.get(s.get("best_backend"))
        row = [f"`{key[0]}`", key[1], key[2]]
        for impl in (*ours, *bases):
            r = g.get(impl)
            row.append(_time_cell(r))
            if r is not None and not r.get("median_ms"):
                why = r.get("skipped") or r.get("error") or "no time recorded"
                notes.setdefault((impl, row[-1], why), []).append(" ".join(key))
        timed_ours = [b for b in ours if g.get(b, {}).get("median_ms")]
        row.append(s["best_backend"] if best else "none (check failed)" if timed_ours else "none timed")
        row += [_num(s.get(f"speedup_vs_{b}"), ".2f", "×") for b in bases]
        roof = best.get("roofline_frac") if best else None
        row.append(_num(roof * 100 if roof is not None else None, ".1f", "%"))
        row.append(_num(best.get("tflops"), ".1f") if best and key[0].startswith("patch_embed") else "")
        eager_peak = g.get("eager", {}).get("peak_extra_mb")
        row.append(f"{_num(best.get('peak_extra_mb') if best else None, '.1f')} / {_num(eager_peak, '.1f')}")
        checks = [(b, str(g[b]["check"])) for b in ours if b in g and g[b].get("check") is not None]
        row.append("ok" if checks and all(c.startswith("ok") for _, c in checks) else
                   "; ".join(f"{b} {_cell(c, 50)}" for b, c in checks) or "—")
        rows.append(row)
    lines += gpu_targets.table(head, rows)
    lines += ["", "— : no record (not reached, or no such baseline for the op). ms: median; × baseline: its ms / the "
              "best of ours; % roofline and TFLOP/s: the best of ours; peak MB: memory beyond the inputs."]
    if str(meta.get("git_commit", "")).endswith("-dirty"):
        lines.append("- the checkout had uncommitted changes to tracked files (`-dirty`): its commit alone does not "
                     "say what was measured")
    for (impl, kind, why), where in notes.items():
        place = "every row" if len(where) == len(groups) else ", ".join(where[:3]) + (
            f" and {len(where) - 3} more" if len(where) > 3 else "")
        lines.append(f"- {impl} {kind} ({place}): {_cell(why, 200)}")
    note = run.unfinished(step)
    return [*lines, *(["", note] if note else [])]


def e2e_section(run: Run) -> list[str]:
    lines = ["*Whole pre-training step* (`e2e.json`):", ""]
    path = run.dir / "e2e.json"
    if not path.exists():
        return [*lines, f"Not measured: {run.why_missing('e2e.json')}."]
    data = json.loads(path.read_text(encoding="utf-8"))
    ours = data.get("ours") or {}
    ref_data = data.get("reference")
    ref = ref_data if isinstance(ref_data, dict) else {}
    refs = {k: v for k, v in ref.items() if isinstance(v, dict) and v.get("patients_per_s")}
    best_ref = max(refs, key=lambda k: refs[k]["patients_per_s"], default=None)
    asked = run.e2e_modes()
    lines += [f"{data.get('device', 'device not named')}, config {data.get('config')}, batch {data.get('batch')}, "
              f"{data.get('dtype')}, {data.get('steps')} timed steps, torch {data.get('torch')}; our modes asked for: "
              f"{', '.join(asked) if asked else 'unknown (no stage3_e2e.log)'}. Ratios against the reference's best "
              f"mode in this file: {f'`{best_ref}`' if best_ref else 'none finished, so no ratio'}.", ""]
    rows = []
    best = refs.get(best_ref, {})
    for mode, r in ours.items():
        if r.get("patients_per_s"):
            pps_x = r["patients_per_s"] / best["patients_per_s"] if best else None
            peak_x = r["peak_GB"] / best["peak_GB"] if best.get("peak_GB") and r.get("peak_GB") else None
            backends = ", ".join(f"{f}={b}" for f, b in (r.get("backends") or {}).items())
            rows.append([f"ours `{mode}`", _num(r.get("step_ms"), ".1f"), _num(r["patients_per_s"], ",.0f"),
                         _num(r.get("peak_GB"), ".2f"), _num(pps_x, ".2f", "×"), _num(peak_x, ".2f", "×"),
                         backends or "—"])
    for mode, r in refs.items():
        rows.append([f"reference `{mode}`" + (" (best)" if mode == best_ref else ""), _num(r.get("step_ms"), ".1f"),
                     _num(r["patients_per_s"], ",.0f"), _num(r.get("peak_GB"), ".2f"), "", "", ""])
    if rows:
        lines += gpu_targets.table(["mode", "ms / step", "patients/s", "peak GB", "patients/s × ref. best",
                         "peak × ref. best", "our backends"], rows)
    else:
        lines.append("No mode finished.")
    unfinished = []
    for mode, r in ours.items():
        if not r.get("patients_per_s"):
            tail = [ln for ln in str(r.get("log_tail", "")).splitlines() if ln.strip()]
            unfinished.append(f"ours `{mode}`: {r.get('error', 'no result')}"
                              + (f"; last output: {_cell(tail[-1], 160)}" if tail else ""))
    row = run.status("e2e")
    step = f"step e2e: {row[1]} ({row[2]} s)" if row else "the e2e step is not in summary.tsv"
    unfinished += [f"ours `{m}`: did not run ({step})" for m in asked or () if m not in ours]
    if ref_data is None:
        unfinished.append("the reference script: did not run (no result in e2e.json: --no-ref, or the anchor "
                          "script was not found)")
    else:
        unfinished += [f"reference `{m}`: did not finish ({_cell(ref.get('error', 'no result'), 160)})"
                       for m in REFERENCE_MODES if m not in refs]
    if unfinished:
        lines += ["", "Not measured:", *(f"- {u}" for u in unfinished)]
    return lines


#: the sweep's cases (tools/patch_embed_sweep.py) → what each times
SWEEP_CASES = {"all": "forward, every patch", "grad_weight": "grad_weight, every patch",
               "keep50": "forward, a random half of the patches (`keep`)"}


def sweep_section(run: Run) -> list[str]:
    """``patch_embed_sweep.json`` as one table per case: the eager anchor and each tile configuration
    (ms, TFLOP/s, the anchor's ms over its ms), the library's fixed choices marked — the sweep lists
    each kernel's fixed configuration first — and the fastest, for the choice step 4 of the plan leaves
    to the run (``_tma_plan``'s and ``_forward_config``'s defaults, or the TMA kernels' use at all)."""
    from patch_embed_sweep import label

    lines = ["*Patch-embedding tiles* (`patch_embed_sweep.json`, `tools/patch_embed_sweep.py`):", ""]
    path = run.dir / "patch_embed_sweep.json"
    if not path.exists():
        return [*lines, f"Not measured: {run.why_missing('patch_embed_sweep.json')}."]
    data = json.loads(path.read_text(encoding="utf-8"))
    lines += [f"{data.get('device', 'device not named')}, shape {data.get('shape')}, {data.get('dtype')}.", ""]
    records = data.get("records") or []
    for case in [*SWEEP_CASES, *sorted({r.get("case") for r in records} - set(SWEEP_CASES) - {None})]:
        recs = [r for r in records if r.get("case") == case]
        if not recs:
            continue
        anchor = next((r for r in recs if "config" not in r and r.get("median_ms")), None)
        rows, failed, seen_kind = [], [], set()
        timed = [r for r in recs if "config" in r and r.get("median_ms")]
        fastest = min(timed, key=lambda r: r["median_ms"], default=None)
        fixed = []
        for r in recs:
            if "config" not in r:
                rows.append([_cell(r.get("impl")), _num(r.get("median_ms"), ".3f"), _num(r.get("tflops"), ".1f"),
                             "1.00×" if r.get("median_ms") else "—", "anchor"])
                continue
            kind = "TMA" if r["config"].get("TMA") else "gather"
            notes = []
            if kind not in seen_kind:
                seen_kind.add(kind)
                notes.append(f"the fixed choice ({kind})")
                fixed.append(r)
            if r is fastest:
                notes.append("fastest")
            if r.get("median_ms"):
                speedup = anchor["median_ms"] / r["median_ms"] if anchor else None
                rows.append([f"`{label(r['config'])}`", _num(r["median_ms"], ".3f"), _num(r.get("tflops"), ".1f"),
                             _num(speedup, ".2f", "×"), ", ".join(notes)])
            else:
                failed.append(f"`{label(r['config'])}`: {_cell(r.get('error', 'no result'), 200)}")
                rows.append([f"`{label(r['config'])}`", "error", "—", "—", ", ".join(notes)])
        lines += [f"Case `{case}`: {SWEEP_CASES.get(case, case)}.", "",
                  *gpu_targets.table(["implementation", "ms", "TFLOP/s", "× anchor", "note"], rows), ""]
        if fastest is not None:
            for r in fixed:
                if r.get("median_ms") and r is not fastest:
                    lines.append(f"- `{label(fastest['config'])}` is {r['median_ms'] / fastest['median_ms']:.2f}× as "
                                 f"fast as the fixed choice `{label(r['config'])}` ({fastest['median_ms']:.3f} against "
                                 f"{r['median_ms']:.3f} ms).")
        lines += [f"- did not run: {f}" for f in failed]
        if lines[-1]:
            lines.append("")
    if note := run.unfinished("sweep"):
        lines.append(note)
    while not lines[-1]:
        lines.pop()
    return lines


def targets_section(run: Run) -> list[str]:
    verdicts = [*gpu_targets.bench_verdicts(run.dir / "bench_large.json"),
                gpu_targets.e2e_verdict(run.dir / "e2e.json")]
    alike = gpu_targets.e2e_verdict(run.dir / "e2e.json", like_for_like=True)
    met = sum(v.verdict == "met" for v in verdicts)
    return [f"*Issue 6's targets* (`tools/gpu_targets.py`): {met} of {len(verdicts)} met; the last row (like for "
            "like) is shown beside them, not counted.", "", gpu_targets.markdown([*verdicts, alike])]


def _pairs_statement(head: str, pairs: list[tuple[str, str]]) -> str:
    items = [f'("{b}", "{f}")' for b, f in pairs]
    one = f"{head} = frozenset({{{', '.join(items)}}})" if items else f"{head} = frozenset()"
    return one if len(one) <= LINE_LENGTH else f"{head} = frozenset({{\n" + "".join(f"    {i},\n" for i in items) + "})"


def _order_statement(head: str, order: dict[str, tuple[str, ...]]) -> str:
    tuples = {f: ", ".join(f'"{b}"' for b in o) + ("," if len(o) == 1 else "") for f, o in order.items()}
    items = [f'"{f}": ({t})' for f, t in tuples.items()]
    one = f"{head} = {{{', '.join(items)}}}"
    return one if len(one) <= LINE_LENGTH else f"{head} = {{\n" + "".join(f"    {i},\n" for i in items) + "}"


def statements(run: Run, heads: dict[str, str] = HEADS) -> dict[str, str]:
    """The three statements of pyimputmae/_backends.py with this run's values."""
    v = run.validation
    return {"GPU_VALIDATED": _pairs_statement(heads["GPU_VALIDATED"], v.validated),
            "GPU_VALIDATED_FP16": _pairs_statement(heads["GPU_VALIDATED_FP16"], v.validated16),
            "CUDA_ORDER": _order_statement(heads["CUDA_ORDER"], v.order)}


def validation_section(run: Run) -> list[str]:
    v = run.validation
    lines = ["*Validated backends* (`tools/gpu_validated.py`):", "", "```", *run.validation_lines, "```", ""]
    if not v.tested:
        return [*lines, f"Not measured: the op tests left no verdicts ({run.why_missing('junit_ops.xml')}): "
                "GPU_VALIDATED, GPU_VALIDATED_FP16 and CUDA_ORDER stay as they are."]
    lines += ["For `pyimputmae/_backends.py` (`--apply` writes them):", "", "```python",
              *statements(run).values(), "```"]
    if not v.tested16:
        lines += ["", f"The float16 cases left no verdicts ({run.why_missing('junit_ops_fp16.xml')}): no pair is "
                  "validated for float16 by this run."]
    if not v.timed:
        lines += ["", f"CUDA_ORDER is not measured ({run.why_missing('bench_large.json')}): the default order "
                  "among the validated pairs."]
    return lines


def files_section(run: Run) -> list[str]:
    lines = []
    train = run.dir / "junit_train.xml"
    if train.exists():
        cases = list(ET.parse(train).getroot().iter("testcase"))
        tags = [{c.tag for c in case} for case in cases]
        failed = sum(bool(t & {"failure", "error"}) for t in tags)
        skipped = sum("skipped" in t and not t & {"failure", "error"} for t in tags)
        lines += [f"*train()* on the GPU (`junit_train.xml`): {len(cases) - failed - skipped} passed, {failed} "
                  f"failed, {skipped} skipped.", ""]
    missing = [run.why_missing(name) for name in FILE_STEPS if not (run.dir / name).exists()]
    if missing or run.problems:
        lines += ["*Not in this run*:", "", *(f"- {m}" for m in [*run.problems, *missing])]
    return lines


def report(run: Run, archive: str | None = None) -> str:
    sections = [header(run, archive), stage_section(run), bench_section(run, "bench_large.json", "bench-large"),
                bench_section(run, "bench_paper.json", "bench-paper"), e2e_section(run), sweep_section(run),
                targets_section(run),
                validation_section(run), files_section(run)]
    return "\n\n".join("\n".join(s) for s in sections if s).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ --apply
def rewrite_backends(text: str, run: Run) -> str:
    """``text`` (pyimputmae/_backends.py) with its three statements replaced by this run's, found by
    their line numbers; the lines around them (their comments) are kept."""
    spans: dict[str, tuple[int, int, str]] = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, head = node.targets[0].id, node.targets[0].id
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name = node.target.id
            head = f"{name}: {ast.get_source_segment(text, node.annotation)}"
        else:
            continue
        if name in HEADS:
            if name in spans:
                raise ValueError(f"pyimputmae/_backends.py assigns {name} twice (lines {spans[name][0]} and "
                                 f"{node.lineno}): leave one")
            spans[name] = (node.lineno, node.end_lineno or node.lineno, head)
    missing = [n for n in HEADS if n not in spans]
    if missing:
        raise ValueError(f"pyimputmae/_backends.py has no module-level assignment of {', '.join(missing)}")
    new = statements(run, {name: head for name, (_, _, head) in spans.items()})
    lines = text.splitlines(keepends=True)
    for name, (start, end, _) in sorted(spans.items(), key=lambda kv: -kv[1][0]):
        lines[start - 1:end] = [new[name] + "\n"]
    return "".join(lines)


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)


class Refused(Exception):
    """--apply will not run: the message says why."""


def apply(run: Run, repo: Path, runs_dir: Path, commit: str | None, name: str | None = None) -> str:
    """Archive the run in the checkout ``repo`` and write its values into pyimputmae/_backends.py;
    returns what was done. Raises :class:`Refused`."""
    commit = commit or run.env.get("commit")
    if not commit or commit == "unknown":
        raise Refused(f"env.txt names no commit ({run.why_missing('env.txt') if not run.env else 'commit: unknown'})"
                      "; pass --commit SHA, the commit the device call sent, if you know it")
    top = _git(repo, "rev-parse", "--show-toplevel")
    if top.returncode:
        raise Refused(f"{repo} is not a git checkout: {top.stderr.strip()}")
    repo = Path(top.stdout.strip())
    ancestor = _git(repo, "merge-base", "--is-ancestor", commit, "HEAD")
    if ancestor.returncode == 1:
        raise Refused(f"the run's commit {commit} is not an ancestor of HEAD: it measured code this branch does not "
                      "hold; apply it on a branch that contains that commit")
    if ancestor.returncode:
        raise Refused(f"the run's commit {commit} is not in {repo}: {ancestor.stderr.strip()}")
    changed = sorted({*_git(repo, "diff", "--name-only", commit, "HEAD", "--", *KERNEL_PATHS).stdout.splitlines(),
                      *_git(repo, "diff", "--name-only", commit, "--", *KERNEL_PATHS).stdout.splitlines()})
    if changed:
        raise Refused(f"the kernels differ from the run's commit {commit[:12]} (git diff {commit[:12]} HEAD, or the "
                      f"working tree): {', '.join(changed)}; the run validated other kernels than these: measure "
                      "this code on a GPU again")
    if name is None:
        date, card = run.date(), run.card()
        if not date or not card:
            raise Refused(f"the run names no {'date' if not date else 'card'} (env.txt): pass --name for its folder")
        slug = next((w for w in card.replace("NVIDIA", "").split() if re.search(r"\d", w)), card.split()[0])
        name = f"{date}-{re.sub(r'[^a-z0-9]+', '-', slug.split('-')[0].lower()).strip('-')}"
    if Path(name).name != name or name in (".", ".."):
        raise Refused(f"--name {name!r}: one folder name, not a path")
    dest = repo / runs_dir / name
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise Refused(f"{dest} exists and is not empty: is this run archived already? A second call of the same day "
                      f"and card: pass --name {name}-2")
    backends = repo / "pyimputmae" / "_backends.py"
    old = backends.read_text(encoding="utf-8")
    try:
        new = rewrite_backends(old, run) if run.validation.tested else old
    except ValueError as err:
        raise Refused(str(err)) from err
    compile(new, str(backends), "exec")  # a broken statement must never reach the file
    text = report(run, os.path.relpath(dest, repo))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for f in run.dir.rglob("*"):
            if f.is_file() and f.relative_to(run.dir) != Path("report.md"):
                (tmp / f.relative_to(run.dir)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, tmp / f.relative_to(run.dir))
        (tmp / "report.md").write_text(text, encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp's is 0o700
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = [text, f"archived the run in {dest} (report.md there)"]
    if not run.validation.tested:
        done.append(f"{backends}: left as it is (the op tests left no verdicts in this run)")
    elif new == old:
        done.append(f"{backends}: unchanged (the run's values are already there)")
    else:
        atomic_write_text(backends, new)
        done += [f"{backends}:", *difflib.unified_diff(old.splitlines(), new.splitlines(), "before", "after",
                                                       lineterm="", n=0)]
    return "\n".join(done)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path, help="the folder tools/gpu_check.sh wrote (or its unpacked bundle)")
    p.add_argument("--apply", action="store_true", help="archive the run and write its values into _backends.py")
    p.add_argument("--runs-dir", type=Path, default=Path("docs/gpu-runs"), help="under the checkout (--apply)")
    p.add_argument("--repo", type=Path, default=ROOT, help="the checkout --apply writes into (default: this one)")
    p.add_argument("--name", default=None, help="the run's folder under --runs-dir (default <YYYY-MM-DD>-<card>)")
    p.add_argument("--commit", default=None, help="the run's commit, when env.txt names none (--apply)")
    p.add_argument("--report", type=Path, default=None,
                   help="where the report goes without --apply (default OUTDIR/report.md; a temporary folder when "
                        "OUTDIR is read-only)")
    args = p.parse_args(argv)
    if not args.outdir.is_dir():
        p.error(f"{args.outdir} is not a folder: pass the OUTDIR tools/gpu_check.sh wrote")
    with tempfile.TemporaryDirectory(prefix="gpu_report.") as work:
        run = unpack(args.outdir, Path(work))
        if args.apply:
            try:
                print(apply(run, args.repo, args.runs_dir, args.commit, args.name))
            except Refused as err:
                print(f"gpu_report.py --apply: refused: {err}", file=sys.stderr)
                return 2
            return 0
        text = report(run)
    dest = args.report or (args.outdir / "report.md" if os.access(args.outdir, os.W_OK)
                           else Path(tempfile.mkdtemp(prefix="gpu_report.")) / "report.md")
    atomic_write_text(dest, text)
    print(text)
    print(f"wrote {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
