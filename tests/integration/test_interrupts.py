"""Ctrl-C (SIGINT) stops cleanly: earlier results stay intact, no partial files, resume works."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import BASE, REPO, merge

CLI = [sys.executable, "-c", "from osdsim.cli import main; main()"]


def _interrupt_after(args, seconds, cwd, when=None):
    """Run the CLI and send SIGINT after `seconds`, or as soon as `when()` holds (polled, `seconds`
    at most): a fixed delay outlives a sweep on a fast host."""
    # A shell that starts jobs in the background hands them SIGINT ignored, and Python then never
    # raises KeyboardInterrupt: restore the default disposition in the child.
    proc = subprocess.Popen([*CLI, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None and not (when is not None and when()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def test_sigint_during_run_keeps_previous_results(tmp_path):
    out = tmp_path / "out"
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(merge(BASE, {"workload": {"num_requests": 30}})))
    ok = subprocess.run([*CLI, "run", str(small), "--out", str(out), "--no-plots", "--quiet"], capture_output=True)
    assert ok.returncode == 0
    before = (out / "summary.json").read_text()
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump(merge(BASE, {"workload": {"num_requests": 300_000, "rate_per_s": 50.0}})))
    rc, text = _interrupt_after(["run", big, "--out", out, "--no-plots", "--quiet"], 4.0, REPO)
    assert rc == 130, text
    assert "interrupted" in text and "Traceback" not in text
    assert (out / "summary.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_sigint_during_sweep_keeps_finished_points_and_resumes(tmp_path):
    base = merge(BASE, {"workload": {"num_requests": 3000}})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sw.yaml").write_text(yaml.safe_dump(
        {"base": "base.yaml", "axes": {"workload.rate_per_s": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]},
         "strategies": ["static"]}))
    out = tmp_path / "o"
    points = out / "points.jsonl"
    # Interrupt once the first point is on disk (the sweep's 12 points took under 6 s in all here).
    rc, text = _interrupt_after(["sweep", tmp_path / "sw.yaml", "--out", out, "--workers", "1", "--quiet"], 60.0,
                                tmp_path, when=lambda: points.exists() and points.read_text().strip() != "")
    assert rc == 130, text
    assert "interrupted" in text and "--resume" in text and "Traceback" not in text
    lines = [json.loads(x) for x in points.read_text().splitlines() if x.strip()]
    assert 0 < len(lines) < 12
    assert (out / "results.csv").exists()
    done = subprocess.run([*CLI, "sweep", str(tmp_path / "sw.yaml"), "--out", str(out), "--resume", "--workers", "1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{12 - len(lines)} run now, {len(lines)} already done" in done.stdout


@pytest.mark.parametrize("mode", ["unwritable"])
def test_unwritable_output_dir_is_a_clear_error(tmp_path, mode):
    if os.geteuid() == 0:
        target = Path("/proc/osdsim-cannot-write-here")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "out"
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(merge(BASE, {"workload": {"num_requests": 10}})))
    r = subprocess.run([*CLI, "run", str(small), "--out", str(target), "--no-plots", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2 and "--out" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.real
def test_sigint_during_calibrate_writes_no_profile(tmp_path):
    pytest.importorskip("torch")
    target = tmp_path / "cpu.yaml"
    rc, text = _interrupt_after(["calibrate", "--gpu", "cpu", "--quick", "--out", target], 6.0, REPO)
    assert rc in (2, 130), text
    assert "interrupted" in text and "Traceback" not in text
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.real
def test_sigint_during_validate_writes_no_report(tmp_path):
    pytest.importorskip("torch")
    env_cache = tmp_path / "cache"
    os.environ["OSDSIM_CACHE"] = str(env_cache)
    try:
        rc, text = _interrupt_after(["validate", REPO / "validate" / "cpu-quick.yaml", "--out", tmp_path], 8.0, REPO)
    finally:
        os.environ.pop("OSDSIM_CACHE", None)
    assert rc == 130, text
    assert "interrupted" in text and "Traceback" not in text
    assert not list(tmp_path.glob("cpu-quick-*.json")) and not list(tmp_path.glob("cpu-quick-*.md"))
