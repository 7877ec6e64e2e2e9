"""`osdsim calibrate` end to end (issue 4): a quick CPU calibration writes a profile that
`osdsim run` accepts; bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from osdsim.cli import app
from tests.conftest import REPO

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_unknown_gpu_name_lists_known_names(tmp_path):
    r = invoke("calibrate", "--gpu", "tpu-v5", "--out", tmp_path / "x.yaml")
    assert r.exit_code == 2
    line = one_error_line(r)
    assert "tpu-v5" in line and "h100" in line and "cpu" in line
    assert not list(tmp_path.iterdir())


def test_bad_device_value(tmp_path):
    r = invoke("calibrate", "--device", "tpu", "--out", tmp_path / "x.yaml")
    assert r.exit_code == 2
    assert "--device" in one_error_line(r)


@pytest.mark.real
def test_asked_gpu_on_a_machine_without_one(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = invoke("calibrate", "--gpu", "h100", "--out", tmp_path / "x.yaml")
    assert r.exit_code == 2
    line = one_error_line(r)
    assert "no CUDA device" in line and "--gpu cpu" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.real
def test_unwritable_out(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = invoke("calibrate", "--gpu", "cpu", "--quick", "--out", blocker / "sub" / "x.yaml")
    assert r.exit_code == 2
    assert "cannot write" in one_error_line(r)


@pytest.mark.real
def test_quick_cpu_calibration_writes_a_profile_osdsim_run_accepts(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "cpu.yaml"
    r = invoke("calibrate", "--gpu", "cpu", "--quick", "--json", "--out", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    held = doc["heldout_errors"]
    assert held, "no held-out errors reported"
    for key, summary in held.items():
        assert math.isfinite(summary["median_ape_pct"]) and math.isfinite(summary["max_ape_pct"]), key
    # Loose bound: the quick grid takes 5 samples per shape of 2–4-layer models on a shared CPU.
    assert held["all"]["median_ape_pct"] < 100.0
    data = yaml.safe_load(out.read_text())
    assert data["provenance"]["source"] == "measured"
    assert data["provenance"]["raw_measurements"] == "cpu.csv"
    assert (tmp_path / "cpu.csv").read_text().startswith("kind,")
    assert "torch" in data["provenance"]["versions"]

    run = invoke(
        "run", REPO / "scenarios" / "steady.yaml", "--set", f"hardware.profile={out}",
        "--set", "models.target=smollm2-135m", "--set", "models.draft=smollm2-135m-l2",
        "--set", "workload.num_requests=20", "--no-write", "--json",
    )
    assert run.exit_code == 0, run.output
    summary = json.loads(run.output)
    assert summary["variants"]

    # A second calibration keeps the first profile as cpu.prev.yaml.
    r2 = invoke("calibrate", "--gpu", "cpu", "--quick", "--quiet", "--out", out)
    assert r2.exit_code == 0, r2.output
    assert (tmp_path / "cpu.prev.yaml").is_file()
    assert "cpu.prev.yaml" in r2.output


def test_llamacpp_backend_needs_the_cpu(tmp_path):
    r = invoke("calibrate", "--gpu", "h100", "--backend", "llamacpp", "--out", tmp_path / "x.yaml")
    assert r.exit_code == 2
    assert "--backend llamacpp" in one_error_line(r)
    r = invoke("calibrate", "--gpu", "cpu", "--backend", "vllm", "--out", tmp_path / "x.yaml")
    assert r.exit_code == 2
    assert "--backend" in one_error_line(r)
    assert not list(tmp_path.iterdir())


@pytest.mark.real
def test_quick_llamacpp_calibration_writes_a_profile_the_simulator_prices(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from osdsim.real._deps import MissingDependency
    from osdsim.real.models import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except MissingDependency as exc:
        pytest.skip(str(exc))
    out = tmp_path / "cal"
    r = invoke("calibrate", "--gpu", "cpu", "--backend", "llamacpp", "--quick", "--json", "--out", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    path = out / (doc["profile"].rsplit("/", 1)[-1])
    assert path.name.startswith("cpu-llamacpp-") and path.is_file() and path.with_suffix(".csv").is_file()
    prof = yaml.safe_load(path.read_text())
    assert {"q4_1", "q8_0", "fp32", "bf16"} <= set(prof["peak_flops_per_s"])
    assert "q8_0" in prof["efficiency_by_dtype"]  # the trained draft as osdsim real publishes it
    assert "llama_cpp_python" in prof["provenance"]["versions"]
    held = doc["heldout_errors"]
    assert {"decode/q4_1", "verify/q4_1", "decode/q8_0", "verify/q8_0", "all"} <= set(held)
    assert all(math.isfinite(v["median_ape_pct"]) for v in held.values())
    # the simulator prices the llama.cpp models with it: a verify pass costs more than a decode step
    from osdsim.cost.model import CostModel
    from osdsim.cost.profile import load_profile
    from osdsim.models import PRESETS

    cm = CostModel(PRESETS["smollm2-135m-q4_1"], load_profile(path))
    decode = cm.pass_time(1, 1, 200.0, 200.5)[0]
    verify = cm.pass_time(4, 4, 200.0, 4 * 202.0)[0]
    assert 0 < decode < verify
    q8 = CostModel(PRESETS["smollm2-135m-q8_0-l2"], load_profile(path))
    assert 0 < q8.pass_time(1, 1, 200.0, 200.5)[0] < q8.pass_time(4, 4, 200.0, 4 * 202.0)[0]
