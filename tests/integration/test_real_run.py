"""End to end: `run_real` on a tiny random Llama over real queries with a sharp shift."""

from __future__ import annotations

import csv
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from osdsim.real._deps import MissingDependency  # noqa: E402
from osdsim.real.config import RealConfig  # noqa: E402
from osdsim.real.run import run_real  # noqa: E402

pytestmark = pytest.mark.real


def test_tiny_osd_run_writes_consistent_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("OSDSIM_CACHE", str(tmp_path / "cache"))
    cfg = RealConfig.model_validate({
        "name": "tiny", "seed": 3, "threads": 1,
        "models": {"target": "tiny", "draft": "layers:1"},
        "stream": {"domains": ["finance", "gsm8k"], "requests_per_phase": 8, "heldout_per_domain": 3,
                   "max_prompt_tokens": 300},
        "decode": {"k": 3, "max_new_tokens": 12},
        "distill": {"update_interval": 4, "teacher_topk": 0, "positions": "target"},
        "baseline": {"requests_per_phase": 2},
        "offline": {"enabled": True, "prompts_per_domain": 4, "lr": 1e-3, "epochs": 1},
        "eval": {"every_updates": 1},
    })
    seen = []
    out = tmp_path / "out"
    try:
        res = run_real(cfg, out, lambda done, total, info: seen.append((done, total)))
    except MissingDependency as e:
        pytest.skip(str(e))
    assert seen[-1] == (16, 16)
    assert {p.name for p in res.files} == {"requests.csv", "steps.csv", "updates.csv", "alpha.csv", "summary.json"}
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == 16
    assert [r["domain"] for r in rows] == ["finance"] * 8 + ["gsm8k"] * 8
    steps = list(csv.DictReader((out / "steps.csv").open()))
    for r in rows:
        mine = [s for s in steps if s["request_index"] == r["request_index"]]
        assert len(mine) == int(r["steps"])
        assert sum(int(s["emitted"]) for s in mine) == int(r["output_tokens"]) <= 12
        assert r["accepted_lengths"].split() == [s["accepted"] for s in mine]
        assert float(r["start_s"]) <= float(r["first_token_s"]) <= float(r["finish_s"])
    # greedy fp32: the target-only baseline emits the very same tokens
    base = [r for r in rows if r["baseline_tokens"] != ""]
    assert len(base) == 4 and all(r["baseline_same_tokens"] == "True" for r in base)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == 16 and summary["updates"] == 4
    assert len(list(csv.DictReader((out / "updates.csv").open()))) == 4
    assert [p["name"] for p in summary["phases"]] == ["finance", "gsm8k"]
    acc = summary["phases"][0]["acceptance"]
    assert acc["accepted"] == sum(int(r["accepted"]) for r in rows[:8])
    assert summary["offline"]["samples"] > 0
    alpha = list(csv.DictReader((out / "alpha.csv").open()))
    assert {a["label"] for a in alpha} >= {"initial", "offline", "online", "end_phase_0", "end_phase_1"}
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temp files
    # the held-out answers were cached: a second run reuses them (same model, prompts, domain)
    cached = list((tmp_path / "cache" / "answers").glob("*.json"))
    assert len(cached) >= 2


def test_out_of_memory_keeps_what_was_recorded(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    import osdsim.real.specdec as sd
    from osdsim.cli import app

    monkeypatch.setenv("OSDSIM_CACHE", str(tmp_path / "cache"))
    real_generate = sd.speculative_generate
    calls = {"n": 0}

    def generate_then_oom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise MemoryError
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sd, "speculative_generate", generate_then_oom)
    cfg = {"name": "tiny-oom", "seed": 3, "threads": 1, "models": {"target": "tiny", "draft": "layers:1"},
           "stream": {"domains": ["finance", "gsm8k"], "requests_per_phase": 4, "heldout_per_domain": 2,
                      "max_prompt_tokens": 200},
           "decode": {"k": 2, "max_new_tokens": 8}, "distill": {"update_interval": 2, "teacher_topk": 0},
           "baseline": {"requests_per_phase": 0}, "eval": {"every_updates": 4}}
    scen = tmp_path / "s.yaml"
    scen.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["real", str(scen), "--out", str(out), "--quiet"])
    assert r.exit_code == 1, r.output
    assert "out of memory" in r.output and "Traceback" not in r.output
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == 5
    assert json.loads((out / "summary.json").read_text())["partial"] is True
