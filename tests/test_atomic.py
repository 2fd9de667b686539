"""Files the package reads back (or users do) are replaced whole: a write cut short by a crash
leaves the previous file, with the permissions a plain write gives; the temporaries a killed
writer leaves are removed by the next run."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from pyimputmae._atomic import atomic_write, atomic_write_text, remove_stale_temporaries
from pyimputmae.checkpoint import atomic_save


def test_a_write_cut_short_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, '{"old": 1}')

    def half_then_crash(f):
        f.write(b'{"new": ')
        raise KeyboardInterrupt  # the process stopped while writing

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_models_and_checkpoints_get_the_permissions_of_a_plain_write(tmp_path):
    """tempfile.mkstemp creates owner-only (0o600) files: a model on a shared cluster was unreadable
    by the rest of the group. Now the umask decides, as for any file written with open()."""
    old = os.umask(0o022)
    try:
        atomic_save({"w": torch.ones(2)}, tmp_path / "model.pt")
        atomic_write_text(tmp_path / "config.json", "{}")
        (tmp_path / "plain.txt").write_text("")
    finally:
        os.umask(old)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == 0o644
    for name in ("model.pt", "config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == plain, name


def test_stale_temporaries_of_the_named_files_only_are_removed(tmp_path):
    stale = [".last.pt.4242.0123abcd.tmp", ".last.pt.w4fhio8_.tmp"]  # ours; tempfile.mkstemp's (older versions)
    kept = ["last.pt", ".other.pt.4242.0123abcd.tmp", ".last.pt.notes.txt", "last.pt.4242.0123abcd.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path, ["last.pt"])
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temporaries(tmp_path / "absent", ["last.pt"]) == []


def test_a_missing_folder_is_named_by_the_file_asked_for(tmp_path):
    target = tmp_path / "no" / "such" / "p.csv"
    with pytest.raises(FileNotFoundError) as err:
        atomic_write_text(target, "x")
    assert err.value.filename == str(target) and not (tmp_path / "no").exists()
