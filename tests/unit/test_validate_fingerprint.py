"""Device fingerprints: a profile or a recorded run made on another device is detected (issue 12, 5b)."""

import json
import re

import pytest
import yaml

from osdsim.cost.profile import load_profile
from osdsim.errors import InputError
from osdsim.validate import fingerprint as fpm
from osdsim.validate import pipeline
from tests.conftest import REPO

EPYC_OLD = {"kind": "cpu", "cpu_model": "AMD EPYC", "cpu_family": "25", "cpu_model_id": "17", "threads": 1, "gpu": None}


def test_fingerprint_of_this_cpu_is_complete_and_stable():
    a, b = fpm.device_fingerprint("cpu", 1), fpm.device_fingerprint("cpu", 1)
    assert a == b and a["kind"] == "cpu" and a["threads"] == 1 and a["cpu_model"]
    assert fpm.differences(a, b) == []
    assert fpm.differences(a, {**b, "threads": 2}) == ["threads 1 here 2"]
    assert fpm.differences(None, a) == ["no device fingerprint recorded"]


def test_shipped_profile_is_recognised_as_made_on_another_generation():
    prof = load_profile(REPO / "calibration" / "cpu-amd-epyc.yaml")
    assert fpm.profile_fingerprint(prof) == {**EPYC_OLD}
    assert fpm.profile_differences(prof, EPYC_OLD) == []
    newer = {**EPYC_OLD, "cpu_family": "26", "cpu_model_id": "2"}
    assert fpm.profile_differences(prof, newer) == ["cpu_family '25' here '26'", "cpu_model_id '17' here '2'"]
    assert fpm.profile_differences(prof, {**EPYC_OLD, "threads": 2}) == ["threads 1 here 2"]
    # A datasheet profile claims no device of its own.
    assert fpm.profile_differences(load_profile(REPO / "calibration" / "h100-datasheet.yaml"), newer) == []


def _suite(**kw):
    doc = yaml.safe_load((REPO / "validate" / "cpu-smollm2.yaml").read_text())
    doc.update(kw)
    return pipeline.Suite(**doc)


def test_profile_from_another_device_recalibrates_or_refuses(tmp_path, monkeypatch):
    newer = {**EPYC_OLD, "cpu_family": "26", "cpu_model_id": "2"}
    monkeypatch.setattr(pipeline, "device_fingerprint", lambda device, threads: newer)
    suite_path = REPO / "validate" / "cpu-smollm2.yaml"
    cfg = pipeline.RealConfigLike(device="cpu", threads=1)
    calls = []

    def fake_cal(path, quick, device, threads):
        calls.append((quick, device, threads))
        path.write_text("x")
        return path

    prof, how = pipeline.resolve_profile(_suite(), suite_path, tmp_path, cfg, fake_cal, calibrate_given=False)
    assert calls == [(False, "cpu", 1)] and prof == str(tmp_path / "profile.yaml") and "another device" in how
    with pytest.raises(InputError, match="measured on another device .*cpu_family '25' here '26'"):
        pipeline.resolve_profile(_suite(), suite_path, tmp_path, cfg, fake_cal, calibrate_given=True)
    with pytest.raises(InputError, match="another device"):
        pipeline.resolve_profile(_suite(on_other_device="refuse"), suite_path, tmp_path, cfg, fake_cal, False)
    monkeypatch.setattr(pipeline, "device_fingerprint", lambda device, threads: EPYC_OLD)
    prof, how = pipeline.resolve_profile(_suite(), suite_path, tmp_path, cfg, fake_cal, calibrate_given=True)
    assert prof.endswith("cpu-amd-epyc.yaml") and len(calls) == 1 and "this device" in how


def test_a_measured_profile_of_this_device_beside_the_suites_is_used_instead_of_calibrating(tmp_path, monkeypatch):
    cal = tmp_path / "calibration"
    cal.mkdir()
    shipped = (REPO / "calibration" / "cpu-amd-epyc.yaml").read_text()
    (cal / "cpu-other.yaml").write_text(shipped.replace("family 25 model 17", "family 25 model 99"))
    (cal / "cpu-this.yaml").write_text(shipped)
    # A llama.cpp profile of this very CPU (sorted first) prices another backend: never chosen.
    llama = re.sub(r"(?m)^device: .*$", "device: CPU AMD EPYC (2 cores, 1 threads, family 25 model 17, avx2), llama.cpp",
                   shipped)
    (cal / "cpu-a-llamacpp.yaml").write_text(llama)
    assert fpm.profile_differences(load_profile(cal / "cpu-a-llamacpp.yaml"), EPYC_OLD) == []  # it would match
    (cal / "h100-datasheet.yaml").write_text((REPO / "calibration" / "h100-datasheet.yaml").read_text())
    (cal / "broken.yaml").write_text("not: [a profile")
    suite_path = tmp_path / "suites" / "s.yaml"
    suite_path.parent.mkdir()
    monkeypatch.setattr(pipeline, "device_fingerprint", lambda device, threads: EPYC_OLD)
    calls = []

    def fake_cal(path, quick, device, threads):
        calls.append(quick)
        return path

    cfg = pipeline.RealConfigLike(device="cpu", threads=1)
    prof, how = pipeline.resolve_profile(_suite(profile="../calibration/cpu-other.yaml"), suite_path, tmp_path, cfg,
                                         fake_cal, calibrate_given=False)
    assert prof == str(cal / "cpu-this.yaml") and calls == [] and "measured on this device" in how
    assert "cpu-other.yaml was measured on another" in how
    # Nothing of this device there (a datasheet profile claims no device): calibrate, as before.
    (cal / "cpu-this.yaml").unlink()
    prof, how = pipeline.resolve_profile(_suite(profile="../calibration/cpu-other.yaml"), suite_path, tmp_path, cfg,
                                         fake_cal, calibrate_given=False)
    assert calls == [False] and "calibrated here" in how


def test_a_llamacpp_suite_takes_the_llamacpp_profile_of_this_device_and_calibrates_that_backend(tmp_path, monkeypatch):
    from types import SimpleNamespace

    cal = tmp_path / "calibration"
    cal.mkdir()
    shipped = (REPO / "calibration" / "cpu-amd-epyc.yaml").read_text()
    (cal / "cpu-this.yaml").write_text(shipped)  # torch profile of this CPU: prices another backend
    llama = re.sub(r"(?m)^device: (.*)$", r"device: \1, llama.cpp", shipped)
    (cal / "cpu-llamacpp-other.yaml").write_text(llama.replace("family 25 model 17", "family 25 model 99"))
    (cal / "cpu-llamacpp-this.yaml").write_text(llama)
    suite_path = tmp_path / "suites" / "s.yaml"
    suite_path.parent.mkdir()
    monkeypatch.setattr(pipeline, "device_fingerprint", lambda device, threads: EPYC_OLD)
    calls = []

    def fake_cal(path, quick, device, threads, backend="torch"):
        calls.append(backend)
        return path

    cfg = SimpleNamespace(device="cpu", threads=1, models=SimpleNamespace(backend="llamacpp"))
    prof, how = pipeline.resolve_profile(_suite(profile="../calibration/cpu-llamacpp-other.yaml"), suite_path,
                                         tmp_path, cfg, fake_cal, calibrate_given=False)
    assert prof == str(cal / "cpu-llamacpp-this.yaml") and calls == []
    (cal / "cpu-llamacpp-this.yaml").unlink()
    pipeline.resolve_profile(_suite(profile="../calibration/cpu-llamacpp-other.yaml"), suite_path, tmp_path, cfg,
                             fake_cal, calibrate_given=False)
    assert calls == ["llamacpp"]  # recalibrated on llama.cpp, not with torch passes
    with pytest.raises(InputError, match="serve on llamacpp"):  # a torch profile for llama.cpp runs
        pipeline.resolve_profile(_suite(profile="../calibration/cpu-this.yaml"), suite_path, tmp_path, cfg,
                                 fake_cal, calibrate_given=False)


def test_cli_refuses_a_foreign_profile_with_calibrate_none_in_one_line(monkeypatch):
    from typer.testing import CliRunner

    from osdsim.cli import app

    pytest.importorskip("torch")
    monkeypatch.setattr(pipeline, "device_fingerprint", lambda device, threads: {**EPYC_OLD, "cpu_model_id": "99"})
    r = CliRunner().invoke(app, ["validate", str(REPO / "validate" / "cpu-smollm2.yaml"), "--calibrate", "none", "-q"])
    assert r.exit_code == 2
    assert "another device" in r.output and len(r.output.strip().splitlines()) <= 3  # one (wrapped) line


def _record(run_dir, fp):
    from osdsim.real.config import RealConfig

    cfg = RealConfig(name="r", models={"target": "tiny"})
    run_dir.mkdir(parents=True)
    summary = {"config": cfg.model_dump(mode="json"), "device": "cpu", "threads": 1}
    if fp is not None:
        summary["device_fingerprint"] = fp
    (run_dir / "summary.json").write_text(json.dumps(summary))
    for name in ("requests.csv", "steps.csv", "updates.csv"):
        (run_dir / name).write_text("request_index\n")
    return cfg


@pytest.mark.parametrize("recorded", [None, {**EPYC_OLD, "threads": 4}])
def test_reuse_runs_never_reuses_a_run_from_another_or_unknown_device(tmp_path, recorded):
    cfg = _record(tmp_path / "S1", recorded)
    ran, notes = [], []

    class Fake:
        summary = {"fresh": True}

    def runner(c, d):
        ran.append(d)
        return Fake()

    here = fpm.device_fingerprint("cpu", 1)
    run, reused = pipeline._recorded_or_run(cfg, tmp_path / "S1", True, "fit run S1", None, notes.append, runner)
    assert not reused and ran == [tmp_path / "S1"]
    assert ("unknown device" if recorded is None else "another device") in notes[0]
    assert run.summary["device_fingerprint"] == here  # the fresh run is stamped


def test_reuse_runs_reuses_a_run_from_this_device(tmp_path):
    cfg = _record(tmp_path / "S1", fpm.device_fingerprint("cpu", 1))
    run, reused = pipeline._recorded_or_run(cfg, tmp_path / "S1", True, "fit run S1", None, None,
                                            lambda c, d: pytest.fail("must not run"))
    assert reused and run.summary["config"]["name"] == "r"


@pytest.mark.parametrize("served,reused", [("q4_1", False), ("q8_0", True)])
def test_reuse_runs_never_reuses_a_llamacpp_run_whose_draft_was_served_otherwise(tmp_path, served, reused):
    """A run recorded when `auto` published the draft in the target's Q4_1 is stale: this version
    publishes it in Q8_0 (osdsim.real.llamacpp.served_draft_type)."""
    cfg = _record(tmp_path / "S1", fpm.device_fingerprint("cpu", 1))
    doc = json.loads((tmp_path / "S1" / "summary.json").read_text())
    doc["backend"] = {"engine": "llama.cpp", "target_layer_type": "q4_1", "draft_layer_type": served}
    (tmp_path / "S1" / "summary.json").write_text(json.dumps(doc))
    notes = []
    ran = []

    class Fake:
        summary = {"fresh": True}

    run, was_reused = pipeline._recorded_or_run(cfg, tmp_path / "S1", True, "fit run S1", None, notes.append,
                                                lambda c, d: ran.append(d) or Fake())
    assert was_reused is reused and (ran == []) is reused
    if not reused:
        assert "served in q4_1" in notes[0] and "q8_0" in notes[0]
