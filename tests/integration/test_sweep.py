"""osdsim sweep: pool vs Ray give identical tables; resume; failed points do not stop a sweep."""

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from osdsim.cli import app
from osdsim.sweep.runner import LOG, read_log
from tests.conftest import BASE, merge

runner = CliRunner()


def sweep_file(tmp_path, axes, **extra):
    base = merge(BASE, {"workload": {"num_requests": 40}})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "t", "base": "base.yaml", "axes": axes, "strategies": ["no-spec", "static"], **extra}
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_pool_and_serial_give_identical_tables(tmp_path):
    p = sweep_file(tmp_path, {"workload.rate_per_s": [2, 8], "speculation.k": [2, 4]}, repeats=2)
    assert run("sweep", p, "--out", tmp_path / "a", "--workers", "1", "--quiet").exit_code == 0
    assert run("sweep", p, "--out", tmp_path / "b", "--workers", "2", "--quiet").exit_code == 0
    a = pd.read_parquet(tmp_path / "a" / "results.parquet")
    b = pd.read_parquet(tmp_path / "b" / "results.parquet")
    assert len(a) == 8 and (a["status"] == "ok").all()
    pd.testing.assert_frame_equal(a, b)
    assert (a["static.speedup_e2e_mean"] > 1).all()


def test_ray_gives_the_same_table_as_the_pool(tmp_path):
    pytest.importorskip("ray")
    p = sweep_file(tmp_path, {"workload.rate_per_s": [2, 8], "speculation.k": [2, 4]})
    assert run("sweep", p, "--out", tmp_path / "pool", "--workers", "2", "--quiet").exit_code == 0
    r = run("sweep", p, "--out", tmp_path / "ray", "--workers", "2", "--backend", "ray", "--quiet")
    assert r.exit_code == 0, r.output
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "pool" / "results.parquet"),
                                  pd.read_parquet(tmp_path / "ray" / "results.parquet"))


def test_resume_runs_only_missing_points(tmp_path):
    p = sweep_file(tmp_path, {"workload.rate_per_s": [2, 4, 8]})
    out = tmp_path / "o"
    assert run("sweep", p, "--out", out, "--workers", "1", "--quiet").exit_code == 0
    # Simulate an interrupted sweep: keep the first finished point and a torn last line.
    lines = (out / LOG).read_text().splitlines()
    (out / LOG).write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    first_id = json.loads(lines[0])["point_id"]
    r = run("sweep", p, "--out", out, "--workers", "1", "--resume")
    assert r.exit_code == 0 and "2 run now, 1 already done" in r.output
    rows = read_log(out)
    assert [row["point_id"] for row in rows].count(first_id) == 1
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 3 and (table["status"] == "ok").all()
    # Without --resume an existing sweep directory is refused.
    r = run("sweep", p, "--out", out, "--quiet")
    assert r.exit_code == 2 and "--resume" in r.output


def test_invalid_point_is_recorded_and_others_finish(tmp_path):
    p = sweep_file(tmp_path, {"workload.rate_per_s": [2, -1, 8]})
    out = tmp_path / "o"
    r = run("sweep", p, "--out", out, "--workers", "2")
    assert r.exit_code == 0
    table = pd.read_parquet(out / "results.parquet")
    assert list(table["status"]) == ["ok", "failed", "ok"]
    assert "workload.rate_per_s" in table["error"].iloc[1] and "greater than 0" in table["error"].iloc[1]
    assert "failed point 1" in r.output


def test_random_sweep_and_plot(tmp_path):
    p = sweep_file(tmp_path, {}, mode="random", samples=3,
                   random_axes={"workload.rate_per_s": {"low": 1, "high": 10, "log": True}})
    out = tmp_path / "o"
    assert run("sweep", p, "--out", out, "--workers", "1", "--quiet").exit_code == 0
    table = pd.read_parquet(out / "results.parquet")
    assert table["workload.rate_per_s"].between(1, 10).all() and table["workload.rate_per_s"].nunique() == 3
    r = run("plot", out)
    assert r.exit_code == 0 and (out / "plots" / "speedup_vs_load.png").exists()


def test_bad_sweep_files(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"base": "nope.yaml", "axes": {"seed": [1]}}))
    r = run("sweep", p, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "nope.yaml" in r.output and "not found" in r.output
    p.write_text(yaml.safe_dump({"base": "nope.yaml", "axes": {}}))
    r = run("sweep", p)
    assert r.exit_code == 2 and "axes" in r.output
    r = run("plot", tmp_path)
    assert r.exit_code == 2 and "results.parquet" in r.output
