"""Fuzz the inputs through the CLI: every case exits 0 or 2 with one line, never a traceback.

Fast mode runs a few dozen cases per command; `pytest -m slow` runs >= 500 in total.
"""

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from osdsim.cli import app
from tests.conftest import BASE, REPO

runner = CliRunner()
FAST = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SLOW = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from(["", "auto", "poisson", "a100-80g", "🚀", "1e400", "-1", "nan", "missing.csv"]),
)


def _paths(d, prefix=()):
    for k, v in d.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))


@st.composite
def mutated(draw, base):
    doc = copy.deepcopy(base)
    paths = list(_paths(doc))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        node = doc
        for p in path[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        else:
            action = draw(st.sampled_from(["set", "delete", "unknown"]))
            if action == "set":
                node[path[-1]] = draw(junk)
            elif action == "delete":
                node.pop(path[-1], None)
            else:
                node[draw(st.text(min_size=1, max_size=6))] = draw(junk)
    kind = draw(st.sampled_from(["yaml", "yaml", "yaml", "truncated", "empty", "binary", "scalar"]))
    text = yaml.safe_dump(doc, allow_unicode=True)
    if kind == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    elif kind == "empty":
        text = ""
    elif kind == "scalar":
        text = draw(st.sampled_from(["42\n", "[1, 2]\n", "'x'\n", "~\n"]))
    elif kind == "binary":
        return draw(st.binary(max_size=40))
    return text.encode("utf-8")


def _assert_clean(result):
    out = result.output
    assert "Traceback" not in out
    if result.exit_code not in (0, 2):
        raise AssertionError(f"exit {result.exit_code}: {out!r} {result.exception!r}")
    if result.exit_code == 2:
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), out


def _run_scenario(tmp_path_factory, data: bytes):
    p = tmp_path_factory.mktemp("fz") / "s.yaml"
    p.write_bytes(data)
    r = runner.invoke(app, ["run", str(p), "--no-write", "--quiet", "--set", "limits.max_events=2e6",
                            "--set", "limits.max_sim_time_s=1e5"])
    _assert_clean(r)


SMALL = {**copy.deepcopy(BASE), "workload": {**copy.deepcopy(BASE["workload"]), "num_requests": 20}}


@FAST
@given(data=mutated(SMALL))
def test_fuzz_run(tmp_path_factory, data):
    _run_scenario(tmp_path_factory, data)


PROFILE = yaml.safe_load((REPO / "calibration" / "a100-80g.yaml").read_text())


def _run_profile(tmp_path_factory, data: bytes):
    d = tmp_path_factory.mktemp("fp")
    prof = d / "p.yaml"
    prof.write_bytes(data)
    _assert_clean(runner.invoke(app, ["profile", "show", str(prof)]))
    sc = d / "s.yaml"
    sc.write_text(yaml.safe_dump({**SMALL, "hardware": {"profile": str(prof)}}))
    _assert_clean(runner.invoke(app, ["run", str(sc), "--no-write", "--quiet", "--set", "limits.max_events=2e6"]))


@FAST
@given(data=mutated(PROFILE))
def test_fuzz_profile_loading(tmp_path_factory, data):
    _run_profile(tmp_path_factory, data)


SWEEP = {"name": "fz", "base": SMALL, "axes": {"speculation.k": [2, 3]}, "repeats": 1, "strategies": ["static"]}


def _run_sweep(tmp_path_factory, data: bytes):
    d = tmp_path_factory.mktemp("fs")
    p = d / "sw.yaml"
    p.write_bytes(data)
    r = runner.invoke(app, ["sweep", str(p), "--out", str(d / "out"), "--workers", "1", "--quiet"])
    _assert_clean(r)


@FAST
@given(data=mutated(SWEEP))
def test_fuzz_sweep(tmp_path_factory, data):
    _run_sweep(tmp_path_factory, data)


@pytest.mark.slow
@SLOW
@given(data=mutated(SMALL))
def test_fuzz_run_long(tmp_path_factory, data):
    _run_scenario(tmp_path_factory, data)


@pytest.mark.slow
@SLOW
@given(data=mutated(PROFILE))
def test_fuzz_profile_long(tmp_path_factory, data):
    _run_profile(tmp_path_factory, data)


@pytest.mark.slow
@SLOW
@given(data=mutated(SWEEP))
def test_fuzz_sweep_long(tmp_path_factory, data):
    _run_sweep(tmp_path_factory, data)


SUITE = yaml.safe_load((REPO / "validate" / "cpu-smollm2.yaml").read_text())
SUITE["profile"] = str(REPO / "calibration" / "cpu-amd-epyc.yaml")


def _run_suite(tmp_path_factory, data: bytes):
    p = tmp_path_factory.mktemp("fv") / "suite.yaml"
    p.write_bytes(data)
    _assert_clean(runner.invoke(app, ["validate", str(p), "--check", "--quiet"]))


@FAST
@given(data=mutated(SUITE))
def test_fuzz_validate_suite_loading(tmp_path_factory, data):
    _run_suite(tmp_path_factory, data)


@pytest.mark.slow
@SLOW
@given(data=mutated(SUITE))
def test_fuzz_validate_suite_long(tmp_path_factory, data):
    _run_suite(tmp_path_factory, data)
