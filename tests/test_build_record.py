"""The build record (pyimputmae/_build_config.json): setup.py writes it where the build belongs,
and ``pyimputmae info`` says when the record cannot describe the extension that loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from op_testing import setup_module

from pyimputmae import _extension
from pyimputmae.info import collect, render

ROOT = Path(__file__).resolve().parents[1]
PURE = {"python": "3.11", "extension": False, "reason": "PYIMPUTMAE_NO_EXT=1"}


@pytest.fixture
def setup_py(tmp_path, monkeypatch):
    """setup.py as a module (its build runs only as __main__), with a scratch source tree."""
    module = setup_module()
    monkeypatch.setattr(module, "ROOT", str(tmp_path / "src"))
    return module


def _run_build_py(setup_py, build_lib: Path, editable: bool) -> None:
    from setuptools import Distribution

    cmd = setup_py.command_classes(PURE, with_extension=False)["build_py"](Distribution({"packages": []}))
    cmd.build_lib, cmd.editable_mode = str(build_lib), editable
    cmd.ensure_finalized()
    cmd.run()


def test_a_wheel_build_records_into_its_build_folder_only(setup_py, tmp_path):
    """`PYIMPUTMAE_NO_EXT=1 pip wheel .` must not rewrite the record of the checkout's editable install."""
    src_record = tmp_path / "src" / "pyimputmae" / "_build_config.json"
    src_record.parent.mkdir(parents=True)
    src_record.write_text(json.dumps({"extension": True}))
    _run_build_py(setup_py, tmp_path / "build", editable=False)
    assert json.loads((tmp_path / "build" / "pyimputmae" / "_build_config.json").read_text()) == PURE
    assert json.loads(src_record.read_text()) == {"extension": True}


def test_an_editable_build_records_into_the_source_tree_it_imports_from(setup_py, tmp_path):
    _run_build_py(setup_py, tmp_path / "build", editable=True)
    assert json.loads((tmp_path / "src" / "pyimputmae" / "_build_config.json").read_text()) == PURE
    assert setup_py.record_dirs("b", in_place=False) == [str(Path("b") / "pyimputmae")]


def test_info_calls_a_record_of_another_build_stale(monkeypatch):
    monkeypatch.setattr(_extension, "build_config", lambda: dict(PURE))
    info = collect()
    text = render(info)
    if not _extension.load():  # a pure-Python install: the record is right
        assert info["build_record_stale"] is None and "build: pure Python install" in text
        return
    assert "extension pyimputmae._C: loaded" in text
    assert "build: pure Python install" not in text  # the contradiction the audit found
    assert "build record (stale): pure Python install (PYIMPUTMAE_NO_EXT=1)" in text
    assert "the record was left by another build" in info["build_record_stale"]
    assert "_C" in info["build_record_stale"] and "pip install --no-build-isolation -e ." in text


def test_info_trusts_a_record_that_matches_the_loaded_extension():
    info = collect()
    if _extension.load() and _extension.build_config().get("extension"):
        assert info["build_record_stale"] is None
        assert "stale" not in render(info)
