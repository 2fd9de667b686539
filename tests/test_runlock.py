"""One writer per training out_dir and per preprocessing store (pyimputmae._runlock)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyimputmae import _runlock
from pyimputmae._runlock import InUseError, exclusive_use

pytestmark = pytest.mark.skipif(_runlock.fcntl is None, reason="no flock on this platform")


def hold(lock: Path, *argv: str) -> subprocess.Popen:
    """Another process that takes the lock and keeps it until it is killed."""
    code = f"""
        import sys, time
        from pyimputmae._runlock import exclusive_use
        with exclusive_use({str(lock)!r}, "the thing", "advice"):
            print("locked", flush=True)
            time.sleep(120)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *argv], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_naming_the_first_and_a_killed_one_leaves_no_stale_lock(tmp_path: Path):
    lock = tmp_path / "out" / ".pyimputmae.lock"
    first = hold(lock, "--config", "run.yaml")
    try:
        with pytest.raises(InUseError) as err, exclusive_use(lock, f"out_dir {lock.parent}", "Choose another."):
            pass
        msg = str(err.value)
        assert f"out_dir {lock.parent} is being written by another run (process {first.pid} on " \
               f"{socket.gethostname()}, since " in msg
        assert "-c --config run.yaml" in msg and str(lock) in msg and msg.endswith("Choose another.")
    finally:
        first.send_signal(signal.SIGKILL)  # no clean-up at all, like the OOM killer
        first.wait()
    assert lock.exists()  # left behind, but not locked: the next run takes it
    with exclusive_use(lock, "x", "y"):
        assert str(os.getpid()) in lock.read_text()
    assert not lock.exists()  # removed by a run that ends normally


def test_the_lock_is_per_open_file_so_one_process_cannot_take_it_twice(tmp_path: Path):
    lock = tmp_path / "a.lock"
    with exclusive_use(lock, "the store s.zarr", "Wait."):
        with pytest.raises(InUseError, match=rf"the store s.zarr is being written by another run \(process "
                                             rf"{os.getpid()} "):
            with exclusive_use(lock, "the store s.zarr", "Wait."):
                pass
    with exclusive_use(lock, "the store s.zarr", "Wait."):  # free again
        pass


def test_without_lock_support_the_run_goes_ahead_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_runlock.fcntl, "flock", no_locks)
    ran = []
    with pytest.warns(RuntimeWarning, match="does not support locks.*nothing stops a second run from writing out_dir"):
        with exclusive_use(tmp_path / "l", "out_dir o", "a"):
            ran.append(1)
    assert ran == [1]


def test_train_refuses_an_out_dir_another_run_is_writing_before_writing_anything(tmp_path: Path, capsys):
    from pyimputmae.cli import main
    from pyimputmae.data.synthetic import make_cohort
    from pyimputmae.model.config import ModelConfig
    from pyimputmae.training import train

    tiny = ModelConfig.small(dim=32, heads=2, mlp=64, decoder_dim=32, decoder_heads=2, decoder_mlp=64, freeze="none")
    cohort = make_cohort(n_patients=32, shapes={m.name: m.shape for m in tiny.modalities}, seed=3)
    out = tmp_path / "run"
    first = hold(out / ".pyimputmae.lock")
    try:
        with pytest.raises(InUseError, match=rf"out_dir {out} is being written by another run \(process {first.pid}"
                                             r".*Wait for it to end \(or stop it\), or choose another out_dir"):
            train(cohort=cohort, model=tiny, out_dir=str(out), pretrain_epochs=1, finetune_epochs=1,
                  progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".pyimputmae.lock"]  # no config.json, no checkpoint
        # the command line: one line on stderr, exit status 1
        assert main(["train", "--out", str(out), "--set", "progress=false", "synthetic.n_patients=48"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"pyimputmae train: error: out_dir {out} is being written by another run")
        assert "Traceback" not in err
    finally:
        first.kill()
        first.wait()
