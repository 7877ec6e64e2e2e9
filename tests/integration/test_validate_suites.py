"""`osdsim validate --list` and the suite chosen for this device when none is given."""

import json

from typer.testing import CliRunner

from osdsim.cli import app
from osdsim.validate import suites
from tests.conftest import REPO

runner = CliRunner()


def test_list_names_every_shipped_suite_with_its_device():
    r = runner.invoke(app, ["validate", "--list", "--json"])
    assert r.exit_code == 0, r.output
    doc = {s["name"]: s for s in json.loads(r.output)}
    assert doc["gpu"]["device"] == "cuda" and doc["cpu-smollm2"]["device"] == "cpu"
    assert {p.stem for p in (REPO / "validate").glob("*.yaml")} <= {json.loads(r.output)[i]["file"].rsplit("/", 1)[-1][:-5]
                                                                   for i in range(len(doc))}
    r = runner.invoke(app, ["validate", "--list"])
    assert r.exit_code == 0 and "cpu-smollm2" in r.output and "cuda" in r.output


def test_default_suite_follows_the_device():
    assert suites.default_suite(cuda=True)[0].name == "gpu.yaml"
    assert suites.default_suite(cuda=False)[0].name == "cpu-smollm2.yaml"


def test_no_argument_runs_the_suite_for_this_device_and_says_which(monkeypatch):
    monkeypatch.setattr(suites, "cuda_available", lambda: False)
    r = runner.invoke(app, ["validate", "--check"])
    assert r.exit_code == 0, r.output
    assert "cpu-smollm2.yaml" in r.output and "CPU only" in r.output
    monkeypatch.setattr(suites, "cuda_available", lambda: True)
    r = runner.invoke(app, ["validate", "--check"])
    assert r.exit_code == 0, r.output
    assert "suite: gpu.yaml" in r.output and "suite gpu is valid" in r.output
