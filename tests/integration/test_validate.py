"""osdsim validate: the machinery on tiny models, and pass/fail semantics of reports."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from osdsim.cli import app
from osdsim.validate.compare import MetricRow, exit_code, write_report
from tests.conftest import REPO

runner = CliRunner()


def test_metric_out_of_tolerance_fails_and_is_marked(tmp_path):
    rows = [MetricRow("α, phase a", 0.61, 0.60, 0.05, "abs"),
            MetricRow("verify pass time", 0.030, 0.020, 0.10, unit="s")]
    assert rows[0].passed and not rows[1].passed
    assert exit_code(rows) == 1
    assert exit_code(rows[:1]) == 0
    js, md = write_report(rows, {"title": "t", "suite": "s"}, tmp_path / "r")
    doc = json.loads(js.read_text())
    assert doc["passed"] is False
    assert [m["passed"] for m in doc["metrics"]] == [True, False]
    assert "FAIL" in md.read_text()


def test_bad_suite_exits_2(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nfit: {}\nbogus: 1\n")
    r = runner.invoke(app, ["validate", str(p)])
    assert r.exit_code == 2 and "bogus" in r.output
    r = runner.invoke(app, ["validate", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "not found" in r.output


@pytest.mark.real
def test_cpu_quick_suite_passes(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    monkeypatch.setenv("OSDSIM_CACHE", str(tmp_path / "cache"))
    r = runner.invoke(app, ["validate", str(REPO / "validate" / "cpu-quick.yaml"), "--out", str(tmp_path), "--quiet"])
    assert r.exit_code == 0, r.output
    reports = list(tmp_path.glob("cpu-quick-*.json"))
    doc = json.loads(reports[0].read_text())
    assert doc["passed"] and len(doc["metrics"]) >= 10
    names = [m["name"] for m in doc["metrics"]]
    assert any(n.startswith("α, phase") for n in names) and "verify pass time" in names
    assert "microbenchmark profile: verify pass time" in names  # the side-by-side cost rows
    assert [m["gate"] for m in doc["metrics"] if m["name"].startswith("microbenchmark profile")] == [False] * sum(
        n.startswith("microbenchmark profile") for n in names)
    assert doc["serving_fitted_costs"]["passes"] > 10
    trace = json.loads((tmp_path / "cpu-quick-traces" / "S2-predicted.trace.json").read_text())
    assert any(e["name"] == "iteration" for e in trace["traceEvents"])


@pytest.mark.real
def test_reuse_recorded_runs(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("OSDSIM_CACHE", str(tmp_path / "cache"))
    suite = str(REPO / "validate" / "cpu-quick.yaml")
    assert runner.invoke(app, ["validate", suite, "--out", str(tmp_path), "--quiet"]).exit_code == 0
    s2 = tmp_path / "cpu-quick-work" / "S2" / "requests.csv"
    before = s2.stat().st_mtime_ns
    r = runner.invoke(app, ["validate", suite, "--out", str(tmp_path), "--quiet", "--reuse-runs", "--calibrate", "none"])
    assert r.exit_code == 2 and "profile" in r.output  # calibrate none needs a profile in the suite
    r = runner.invoke(app, ["validate", suite, "--out", str(tmp_path), "--quiet", "--reuse-runs"])
    assert r.exit_code == 0, r.output
    assert s2.stat().st_mtime_ns == before  # the real runs were not repeated
    doc = json.loads(next(tmp_path.glob("cpu-quick-*.json")).read_text())
    assert "reused" in doc["method"]


def test_score_rows_bound_the_statistic_itself():
    from osdsim.validate.compare import MetricRow

    assert MetricRow("ks", 0.2, None, 0.3, "score").passed
    bad = MetricRow("ks", 0.4, None, 0.3, "score")
    assert not bad.passed and bad.error == pytest.approx(0.4)
    assert MetricRow("ks", float("nan"), None, 0.3, "score").error is None


@pytest.mark.real
def test_llamacpp_suite_machinery_prices_publication(tmp_path, monkeypatch):
    """A batch-1 suite served on llama.cpp (tiny models exported to GGUF, training in PyTorch): the
    llama.cpp profile prices it, the twin pauses serving for the fit run's publication time, and the
    report compares it with the held-out run's export + reload."""
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    from osdsim.cost.profile import load_profile
    from osdsim.validate import pipeline
    from osdsim.validate.fingerprint import profile_fingerprint

    prof_path = REPO / "calibration" / "cpu-llamacpp-amd-epyc-zen3.yaml"
    fp = profile_fingerprint(load_profile(prof_path))
    monkeypatch.setattr(pipeline, "device_fingerprint", lambda device, threads: fp)  # "this" device made it
    monkeypatch.setenv("OSDSIM_CACHE", str(tmp_path / "cache"))
    doc = yaml.safe_load((REPO / "validate" / "cpu-quick.yaml").read_text())
    doc.update(name="llq", calibrate="none", profile=str(prof_path))
    doc["fit"]["models"]["backend"] = "llamacpp"
    doc["tolerances"]["publish_rel"] = 100.0
    suite_path = tmp_path / "llq.yaml"
    suite_path.write_text(yaml.safe_dump(doc))
    result = pipeline.run_validation(pipeline.load_suite(suite_path), suite_path, tmp_path / "out")
    rows = {r.name: r for r in result.rows}
    pub = rows["publish per update (GGUF export + reload), median"]
    assert pub.predicted > 0 and pub.measured > 0
    twin = yaml.safe_load((tmp_path / "out" / "llq-work" / "twin-scenario.yaml").read_text())
    assert twin["distill"]["publish_pause_s"] == pytest.approx(pub.predicted, abs=1e-6)
    assert twin["models"]["target"]["dtype"] == "fp32"  # the tiny target is exported in f32
    assert "llama.cpp" in result.meta["profile_choice"] or result.meta["profile"] == str(prof_path)
