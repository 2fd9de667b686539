"""`pyimputmae demo` on a tiny budget: its table, metrics.json and its warnings."""

from __future__ import annotations

import json

import pytest

from pyimputmae.cli import main
from pyimputmae.demo import DEMO_SETTINGS, MIN_PATIENTS, MIN_TEST_EVENTS, render, run_demo

pytest.importorskip("lifelines", reason="the demo's Cox baseline and Kaplan-Meier plot")
pytest.importorskip("matplotlib", reason="the demo's figures")
TINY_RUN = {"progress": False, "pretrain_epochs": 1, "finetune_epochs": 1}


def test_seeds_and_cohort_size_are_checked_first(tmp_path, capsys):
    with pytest.raises(ValueError, match="seeds must be at least 1, got 0"):
        run_demo(tmp_path, seeds=0)
    with pytest.raises(ValueError, match=f"n_patients must be at least {MIN_PATIENTS}, got 12"):
        run_demo(tmp_path, n_patients=12)
    for flag, value, low in (("--seeds", "0", 1), ("--patients", "12", MIN_PATIENTS)):
        with pytest.raises(SystemExit) as exited:  # a usage error: argparse's status 2
            main(["demo", flag, value, "--out", str(tmp_path)])
        assert exited.value.code == 2
        assert f"argument {flag}: must be at least {low}, got {value}" in capsys.readouterr().err


def test_help_states_the_demo_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"pre-training epochs (default: {DEMO_SETTINGS['pretrain_epochs']})" in shown
    assert f"fine-tuning epochs (default: {DEMO_SETTINGS['finetune_epochs']})" in shown
    assert "cuda:N (default: auto)" in shown


def test_one_seed_on_a_tiny_cohort_warns_and_prints_no_spread(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--patients", "30", "--pretrain-epochs", "1",
                 "--finetune-epochs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert printed.startswith("test split, 1 seed\n") and "±" not in printed
    split = saved["test_split"][0]
    assert split["patients"] == 6 and split["events"] < MIN_TEST_EVENTS
    assert (f"warning: the test split of seed 0 has 6 patients and {split['events']} death" in printed
            and "can swing far by chance (run with --patients 300 or more)" in printed)
    assert saved["warnings"] and saved["summary"]["impumae"]["c_index"]["sd"] is None
    assert saved["summary"]["impumae"]["c_index"]["n"] == 1


def test_several_seeds_say_which_numbers_are_which(tmp_path):
    result = run_demo(tmp_path, seeds=2, n_patients=30, **TINY_RUN)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["seed_list"] == [0, 1] and saved["test_seed"] == 0 and set(saved["keys"]) >= {"test", "summary"}
    per_seed = saved["per_seed"]["impumae"]
    assert len(per_seed) == 2 and saved["test"] == per_seed[0]  # the old key: seed 0, and the file says so
    assert saved["baselines"]["coxph_clinical"] == saved["per_seed"]["coxph_clinical"][0]
    mean = (per_seed[0]["c_index"] + per_seed[1]["c_index"]) / 2
    assert saved["summary"]["impumae"]["c_index"]["mean"] == pytest.approx(mean)
    assert render(result).startswith("test split, 2 seeds: mean ± sd")
