"""The command line: shipped scenarios run; bad input exits 2 with one line naming the field."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from osdsim.cli import app
from tests.conftest import BASE, REPO

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def write(tmp_path: Path, data, name="s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


SHIPPED = sorted(p for p in (REPO / "scenarios").glob("*.yaml") if not p.name.startswith("real-"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_scenarios_run(tmp_path, path):
    # Shortened (fewer requests) so the suite stays fast; the full runs are in benchmarks/.
    data = yaml.safe_load(path.read_text())
    w = data["workload"]
    over = []
    if w.get("shift") is None and w.get("num_requests", 0) > 300:
        over = ["--set", "workload.num_requests=300"]
    if w.get("duration_s"):
        over = ["--set", "workload.duration_s=60"]
    if w.get("shift") is not None:  # the full shift.yaml run is covered by the golden test
        over = ["--set", "compare=[osd]"]
    r = invoke("run", path, "--out", tmp_path / "out", "--no-plots", "--quiet", *over)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert doc["variants"]


def test_run_json_and_outputs(tmp_path):
    p = write(tmp_path, BASE)
    r = invoke("run", p, "--json", "--out", tmp_path / "o", "--compare", "spec=off,on", "--format", "csv")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc["variants"]) == {"spec=off", "spec=on"}
    speedups = {v["variant"]: v["speedup_e2e_mean"] for v in doc["comparison"]["variants"]}
    assert speedups["spec=off"] == 1.0
    assert (tmp_path / "o" / "spec=on" / "requests.csv").exists()
    assert (tmp_path / "o" / "plots" / "latency_cdf.png").exists()
    assert (tmp_path / "o" / "report.md").exists()


def test_compare_any_field(tmp_path):
    p = write(tmp_path, BASE)
    r = invoke("run", p, "--json", "--no-write", "--compare", "speculation.k=2,6")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert list(doc["variants"]) == ["speculation.k=2", "speculation.k=6"]


def bad(update):
    from tests.conftest import merge

    return merge(BASE, update)


BAD_CASES = [
    ({"workload": {"bogus": 1}}, "workload.bogus", "unknown field"),
    ({"workload": {"rate_per_s": -3}}, "workload.rate_per_s", "greater than 0"),
    ({"workload": {"rate_per_s": "fast"}}, "workload.rate_per_s", "number"),
    ({"speculation": {"k": 0}}, "speculation.k", ">= 1"),
    ({"hardware": {"profile": "tpu-v9"}}, "hardware.profile", "shipped profiles"),
    ({"workload": {"arrival": "trace", "trace_file": "nope.csv"}}, "trace_file", "not found"),
    ({"models": {"target": "llama-2-70b"}}, "models.target", "tensor_parallel"),
    ({"models": {"target": "gpt-9"}}, "models.target", "unknown model preset"),
    ({"router": "fastest"}, "router", "round-robin"),
]


@pytest.mark.parametrize("update,field,message", BAD_CASES, ids=[c[1] for c in BAD_CASES])
def test_bad_input_exits_2_with_one_line(tmp_path, update, field, message):
    p = write(tmp_path, bad(update))
    r = invoke("run", p, "--no-write", "--quiet")
    assert r.exit_code == 2
    out = r.output.strip()
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1, out
    assert field in out and message in out, out


def test_missing_and_broken_files(tmp_path):
    r = invoke("run", tmp_path / "missing.yaml")
    assert r.exit_code == 2 and "not found" in r.output
    r = invoke("run", write(tmp_path, "a: [1, 2\n", "broken.yaml"))
    assert r.exit_code == 2 and "not valid YAML" in r.output
    r = invoke("run", write(tmp_path, "", "empty.yaml"))
    assert r.exit_code == 2 and "empty" in r.output
    r = invoke("run", write(tmp_path, BASE), "--set", "workload.rate_per_s")
    assert r.exit_code == 2 and "FIELD.PATH=VALUE" in r.output


def test_failed_write_keeps_earlier_results(tmp_path, monkeypatch):
    p = write(tmp_path, BASE)
    out = tmp_path / "out"
    assert invoke("run", p, "--out", out, "--no-plots", "--quiet").exit_code == 0
    before = (out / "summary.json").read_text()

    import osdsim.report.plots as plots

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "write_plots", boom)
    r = invoke("run", p, "--out", out, "--quiet", "--set", "seed=9")
    assert r.exit_code == 2 and "nothing was replaced" in r.output
    assert (out / "summary.json").read_text() == before
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".out.")]


def test_profile_show_and_diff():
    r = invoke("profile", "show", "a100-80g")
    assert r.exit_code == 0 and "datasheet" in r.output
    r = invoke("profile", "diff", "a100-80g", "h100")
    assert r.exit_code == 0 and "memory_bandwidth" in r.output
    r = invoke("profile", "show", "nope")
    assert r.exit_code == 2


def test_future_schema_version_is_refused(tmp_path):
    prof = yaml.safe_load((REPO / "calibration" / "a100-80g.yaml").read_text())
    prof["schema_version"] = 99
    pp = write(tmp_path, prof, "future.yaml")
    r = invoke("run", write(tmp_path, bad({"hardware": {"profile": str(pp)}})), "--no-write")
    assert r.exit_code == 2 and "newer osdsim" in r.output


SHIFT_BAD = [
    ({"workload": {"mix": {"a": 0.7, "b": 0.7}}}, "workload.mix", "sum to 1"),
    ({"workload": {"shift": {"phases": [{"start": 0, "end": 100, "mix": {"a": 1.0}},
                                        {"start": 50, "end": 200, "mix": {"b": 1.0}}]}}},
     "workload.shift", "overlaps"),
    ({"workload": {"shift": {"phases": [{"start": 0, "end": 100, "mix": {"a": 0.5}}]}}},
     "workload.shift.phases.0", "sum to 1"),
    ({"acceptance": {"domains": {"a": {"alpha_0": 1.3}}}}, "acceptance.domains.a.alpha_0", "less than or equal to 1"),
    ({"acceptance": {"domains": {"a": {"alpha_0": 0.6, "alpha_inf": 0.4}}}}, "acceptance", "alpha_inf"),
    ({"distill": {"update_interval_requests": 0}}, "distill.update_interval_requests", "greater than or equal to 1"),
    ({"workload": {"shift": {"phases": [{"start": 0, "end": 100, "mix": {"zzz": 1.0}}]}}}, "workload", "unknown domain"),
]


@pytest.mark.parametrize("update,field,message", SHIFT_BAD, ids=[f"{c[1]}-{i}" for i, c in enumerate(SHIFT_BAD)])
def test_bad_shift_and_distill_input(tmp_path, update, field, message):
    p = write(tmp_path, bad(update))
    r = invoke("run", p, "--no-write", "--quiet")
    assert r.exit_code == 2, r.output
    out = r.output.strip()
    assert len(out.splitlines()) == 1 and "Traceback" not in out
    assert field in out and message in out, out


def test_limits_refuse_huge_runs_up_front(tmp_path):
    p = write(tmp_path, bad({"workload": {"num_requests": 40_000_000}}))
    r = invoke("run", p, "--no-write", "--quiet")
    assert r.exit_code == 2 and "limits.max_memory_gb" in r.output and "GB" in r.output
    p = write(tmp_path, bad({"workload": {"num_requests": 100_000}, "limits": {"max_events": 1000}}))
    r = invoke("run", p, "--no-write", "--quiet")
    assert r.exit_code == 2 and "limits.max_events" in r.output and "min" in r.output


def test_doctor_reports_capabilities():
    r = invoke("doctor", "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["capabilities"]["osdsim run / sweep / plot"] == "yes"
    assert any(c["name"] == "torch" for c in doc["checks"])


def test_doctor_says_whether_the_llamacpp_backend_is_available():
    import importlib.util

    r = invoke("doctor", "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    check = next(c for c in doc["checks"] if c["name"] == "llama-cpp-python")
    cap = doc["capabilities"]["osdsim real (models.backend: llamacpp)"]
    if importlib.util.find_spec("llama_cpp") is None:
        assert check["ok"] is False and "unavailable" in check["detail"] and "llamacpp" in check["fix"]
        assert cap.startswith("no")
    else:
        assert check["ok"] is True and "available" in check["detail"]
        if all(c["ok"] for c in doc["checks"] if c["name"] in ("torch", "transformers", "gguf")):
            assert cap == "yes"
