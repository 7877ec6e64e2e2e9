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


def test_tiny_osd_run_on_llamacpp_publishes_each_update(tmp_path, monkeypatch):
    """Serving on llama.cpp, training in PyTorch: the draft is exported and reloaded after every
    update (timed), greedy speculative output equals llama.cpp's own target-only output."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    monkeypatch.setenv("OSDSIM_CACHE", str(tmp_path / "cache"))
    cfg = RealConfig.model_validate({
        "name": "tiny-llamacpp", "seed": 3, "threads": 1,
        "models": {"target": "tiny", "draft": "layers:2", "backend": "llamacpp"},
        "stream": {"domains": ["finance", "gsm8k"], "requests_per_phase": 6, "heldout_per_domain": 3,
                   "max_prompt_tokens": 300},
        "decode": {"k": 3, "max_new_tokens": 12},
        "distill": {"update_interval": 3, "teacher_topk": 16, "positions": "target", "lr": 1e-2},
        "baseline": {"requests_per_phase": 3},
    })
    out = tmp_path / "out"
    res = run_real(cfg, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"]["engine"] == "llama.cpp"
    assert summary["backend"]["target_layer_type"] == "f32" and summary["backend"]["draft_layer_type"] == "f32"
    assert summary["updates"] == 4
    sync = summary["sync"]
    assert sync["n"] == 4 and sync["sync_s_median"] > 0 and sync["export_s_median"] > 0
    assert sync["reload_s_median"] > 0 and sync["sync_s_p90"] >= sync["sync_s_median"]
    upd = list(csv.DictReader((out / "updates.csv").open()))
    assert len(upd) == 4 and all(float(u["sync_s"]) > 0 for u in upd)
    rows = list(csv.DictReader((out / "requests.csv").open()))
    base = [r for r in rows if r["baseline_tokens"] != ""]
    assert len(base) == 6 and all(r["baseline_same_tokens"] == "True" for r in base)
    assert sum(float(r["sync_s"]) for r in rows) == pytest.approx(sum(float(u["sync_s"]) for u in upd), abs=1e-5)
    assert res.summary["overall_acceptance"]["proposed"] > 0
    # the exported GGUFs lived in a temporary directory that is gone after the run
    from pathlib import Path

    exported = Path(summary["backend"]["target_gguf"])
    assert exported.name == "target.gguf" and not exported.parent.exists()


def test_llamacpp_backend_config_errors():
    from pydantic import ValidationError

    base = {"models": {"target": "tiny", "backend": "llamacpp"}}
    with pytest.raises(ValidationError, match="draft_vocab"):
        RealConfig.model_validate({**base, "models": {**base["models"], "draft_vocab": 512}})
    # serving mode runs on llama.cpp too (one KV sequence per admitted request)
    assert RealConfig.model_validate({**base, "serve": {"rate_per_s": 1.0}}).serve.rate_per_s == 1.0
    with pytest.raises(ValidationError, match="CPU"):
        RealConfig.model_validate({**base, "device": "cuda"})
    with pytest.raises(ValidationError):
        RealConfig.model_validate({"models": {"backend": "vllm"}})
