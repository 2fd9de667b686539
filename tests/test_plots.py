"""Figures of a run: loss curves from the history (pyimputmae plot), drawn without touching
matplotlib's global state; metrics.jsonl read back, a line cut short by a kill left out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pyimputmae import cli
from pyimputmae.plots import plot_history, plot_risk_groups, read_history

PNG = b"\x89PNG\r\n\x1a\n"


def history(fp16: bool = False) -> list[dict]:
    records = []
    for step in range(1, 6):
        rec = {"stage": "pretrain", "epoch": step - 1, "step": step, "loss": 2.0 / step, "lr": 1e-3 * step / 5,
               "patients_per_s": 100.0, "rna": 1.0 / step, "mri": 1.0 / step}
        records.append({**rec, "loss_scale": 65536.0 / 2 ** (step // 3)} if fp16 else rec)
    for step in range(1, 4):
        rec = {"stage": "finetune", "epoch": 0, "step": step, "loss": 3.0 - step / 2, "lr": 1e-4,
               "patients_per_s": 50.0}
        records.append({**rec, "loss_scale": 32768.0} if fp16 else rec)
    return records


def write_log(folder: Path, records: list[dict], tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return folder


@pytest.mark.parametrize("fp16", [False, True], ids=["bf16", "fp16_loss_scale"])
def test_loss_curves_are_drawn_without_changing_the_users_matplotlib_backend(tmp_path, fp16):
    import matplotlib

    before = matplotlib.get_backend()
    path = plot_history(history(fp16), tmp_path / "curves.png")
    assert path.read_bytes()[:8] == PNG
    assert matplotlib.get_backend() == before  # a notebook's inline backend stays as it was


def test_a_history_without_a_stage_is_refused():
    with pytest.raises(ValueError, match="no record of a training stage"):
        plot_history([], "never.png")


def test_reading_the_log_of_a_killed_run_and_errors_naming_the_file_and_line(tmp_path):
    run = write_log(tmp_path / "run", history(), tail='{"stage": "finetune", "ep')
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl line 9: cut short .* left out"):
        assert len(read_history(run)) == 8
    broken = write_log(tmp_path / "broken", history())
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    lines[2] = "garbage"
    (broken / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"broken/metrics.jsonl line 3: not a JSON record"):
        read_history(broken / "metrics.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/metrics.jsonl: no such file \(a run of pyimputmae.train"):
        read_history(tmp_path / "empty")


def test_the_plot_command_draws_a_runs_curves_and_reports_a_bad_folder_in_one_line(tmp_path, capsys):
    run = write_log(tmp_path / "run", history(fp16=True))
    assert cli.main(["plot", str(run)]) == 0
    assert (run / "training_curves.png").read_bytes()[:8] == PNG
    assert capsys.readouterr().out.strip() == (f"{run / 'training_curves.png'}: 8 records, pretrain up to step 5, "
                                               "finetune up to step 3")
    assert cli.main(["plot", str(run / "metrics.jsonl"), "--out", str(tmp_path / "mine.png")]) == 0
    assert (tmp_path / "mine.png").exists()
    assert cli.main(["plot", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pyimputmae plot: error: {tmp_path / 'nowhere'}: no such run folder or metrics.jsonl file (a "
                   "run of pyimputmae.train writes metrics.jsonl in its out_dir after its first logged step)"]


def test_logs_that_are_empty_binary_or_not_training_records_are_named(tmp_path):
    empty = write_log(tmp_path / "empty", [])
    with pytest.raises(ValueError, match=r"empty/metrics.jsonl: no record yet \(a run writes its first after "
                                         r"log_every optimizer steps\)"):
        read_history(empty)
    (tmp_path / "figure.png").write_bytes(PNG + b"\xff\xfe")
    with pytest.raises(ValueError, match=r"figure.png: not a text file: expected a run's metrics.jsonl"):
        read_history(tmp_path / "figure.png")
    other = write_log(tmp_path / "other", [{"stage": "pretrain", "step": 1}])
    with pytest.raises(ValueError, match=r"line 1: not a training record \(it needs 'stage', 'step' and 'loss'\)"):
        read_history(other)


def test_a_lone_record_per_stage_still_draws(tmp_path):
    one = [{"stage": "pretrain", "epoch": 0, "step": 1, "loss": 1.0, "lr": 1e-3, "rna": 0.5}]
    assert plot_history(one, tmp_path / "one.png").read_bytes()[:8] == PNG


def test_undefined_figures_are_null_in_the_log_and_nan_when_read_back(tmp_path):
    """metrics.jsonl is strict JSON (a diverged loss is null, not Python's NaN that other readers
    refuse); read_history gives NaN back and the curves still draw."""
    from pyimputmae.checkpoint import json_text

    records = history()
    records[2] = {**records[2], "loss": float("nan"), "mri": float("inf")}
    (tmp_path / "metrics.jsonl").write_text("".join(json_text(r) + "\n" for r in records))
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[2]
    assert '"loss": null' in line and '"mri": null' in line and "NaN" not in line
    back = read_history(tmp_path)
    assert np.isnan(back[2]["loss"]) and np.isnan(back[2]["mri"]) and back[3] == records[3]
    assert plot_history(back, tmp_path / "curves.png").read_bytes()[:8] == PNG


class _Cohort:
    def __init__(self, n: int) -> None:
        self.time = torch.linspace(0.5, 5.0, n)
        self.event = (torch.arange(n) % 2).float()


class _Model:
    cuts = torch.tensor([0.0, 1.0, 2.0, 3.0])


def test_risk_groups_split_by_rank_so_ties_leave_no_half_empty(tmp_path, monkeypatch):
    from pyimputmae import inference

    n = 9
    curves = np.ones((n, 4))
    curves[0, 1:] = 0.2  # one patient at high risk, the other eight tied
    monkeypatch.setattr(inference, "predict_survival", lambda model, cohort, idx: curves[idx])
    result = plot_risk_groups(_Model(), _Cohort(n), np.arange(n), tmp_path / "ties.png")
    assert (result["n_high"], result["n_low"]) == (5, 4) and np.isfinite(result["logrank_p"])
    assert (tmp_path / "ties.png").read_bytes()[:8] == PNG
    curves[0, 1:] = 1.0  # everyone the same: nothing to compare, nothing drawn
    result = plot_risk_groups(_Model(), _Cohort(n), np.arange(n), tmp_path / "same.png")
    assert result == {"skipped": "all 9 test patients have the same predicted risk: no groups to compare"}
    assert not (tmp_path / "same.png").exists()


class _Imputer(torch.nn.Module):
    """Stands in for a trained model in the demo's imputation figure: 'imputes' a held-out modality
    as a noisy copy of the truth."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.mae = self

    def impute(self, batch):
        return {k: v + 0.1 * torch.randn_like(v) for k, v in batch.inputs.items()}


def _failing_savefig(self, fname, *args, **kwargs):
    """A kill (here an error) halfway through drawing: part of a PNG is written, then it stops."""
    fname.write(PNG + b"half a figure")
    raise OSError(28, "No space left on device")


def test_a_figure_cut_short_leaves_the_previous_one_and_no_temporary(tmp_path, monkeypatch):
    """A run killed while drawing must not leave a truncated PNG that looks like a result: each
    figure is drawn to a temporary in the same folder and renamed over the old one."""
    from matplotlib.figure import Figure

    from pyimputmae import inference
    from pyimputmae.data.synthetic import make_cohort
    from pyimputmae.demo import plot_imputation

    n = 9
    curves = np.ones((n, 4))
    curves[0, 1:] = 0.2
    monkeypatch.setattr(inference, "predict_survival", lambda model, cohort, idx: curves[idx])
    cohort = make_cohort(n_patients=40, seed=0)
    rows = np.array([i for i, p in enumerate(cohort.present.numpy()) if p.all()][:3])
    draws = {
        "curves.png": lambda path: plot_history(history(), path),
        "risk.png": lambda path: plot_risk_groups(_Model(), _Cohort(n), np.arange(n), path),
        "imputation.png": lambda path: plot_imputation(_Imputer(), cohort, rows, path),
    }
    for name, draw in draws.items():
        draw(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == PNG
    before = {name: (tmp_path / name).read_bytes() for name in draws}
    modes = {name: (tmp_path / name).stat().st_mode for name in draws}
    monkeypatch.setattr(Figure, "savefig", _failing_savefig)
    for name, draw in draws.items():
        with pytest.raises(OSError, match="No space left on device"):
            draw(tmp_path / name)
        assert (tmp_path / name).read_bytes() == before[name]  # the previous figure, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(draws)  # no temporary left behind
    assert {name: (tmp_path / name).stat().st_mode for name in draws} == modes


def test_a_figure_is_written_like_the_runs_other_outputs_and_as_savefig_names_it(tmp_path):
    """The umask decides its permissions (not the owner-only 0o600 of a temporary file: on a shared
    cluster the group can read it); a name without an extension gets .png, as Figure.savefig does."""
    import os

    old = os.umask(0o022)
    try:
        path = plot_history(history(), tmp_path / "curves.png")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert plot_history(history(), tmp_path / "no_extension") == tmp_path / "no_extension.png"
    assert (tmp_path / "no_extension.png").read_bytes()[:8] == PNG
