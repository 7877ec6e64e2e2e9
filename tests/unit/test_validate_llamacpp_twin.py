"""The validator's twin of a run served on llama.cpp: its models are priced in the GGUF types
(Q4_1 layers, Q8_0 head, f16 KV), training stays in the training dtype."""

from __future__ import annotations

import pytest

from osdsim.cost.model import CostModel
from osdsim.cost.profile import load_profile, resolve_profile_path
from osdsim.models import PRESETS, ModelSpec
from osdsim.validate.pipeline import twin_scenario

SPEC = {"layers": 30, "hidden": 576, "heads": 9, "kv_heads": 3, "ffn": 1536, "vocab": 49152,
        "tied_embeddings": True}


def _summary(backend: dict | None) -> dict:
    cfg = {"seed": 0, "models": {"dtype": "float32", "serve_dtype": None},
           "decode": {"k": 3}, "distill": {"update_interval": 4, "positions": "all"}}
    out = {"name": "x", "config": cfg, "serve_dtype": "float32", "draft_vocab": 49152,
           "target": SPEC, "draft": {**SPEC, "layers": 2}}
    if backend is not None:
        out["backend"] = backend
    return out


REQS = [{"request_index": i, "phase": 0, "phase_name": "code", "domain": "code", "start_s": float(i),
         "finish_s": i + 0.5, "prompt_tokens": 40, "output_tokens": 20, "train_s": 0.0} for i in range(3)]


def test_twin_of_a_llamacpp_run_uses_the_gguf_types(tmp_path):
    backend = {"engine": "llama.cpp", "target_layer_type": "q4_1", "draft_layer_type": "q4_1", "head_type": "q8_0"}
    doc = twin_scenario(_summary(backend), REQS, "cpu-amd-epyc", tmp_path / "a.yaml", tmp_path / "l.yaml",
                        tmp_path / "t.csv", tmp_path)
    for role in ("target", "draft"):
        m = doc["models"][role]
        assert (m["dtype"], m["head_dtype"], m["kv_dtype"]) == ("q4_1", "q8_0", "fp16")
        ModelSpec(**m)  # a valid spec
    assert doc["distill"]["train_dtype"] == "fp32"
    plain = twin_scenario(_summary(None), REQS, "cpu-amd-epyc", tmp_path / "a.yaml", tmp_path / "l.yaml",
                          tmp_path / "t.csv", tmp_path)
    assert plain["models"]["target"]["dtype"] == "fp32" and "head_dtype" not in plain["models"]["target"]


def test_head_dtype_prices_the_head_apart():
    q4 = PRESETS["smollm2-135m-q4_1"]
    assert q4.weight_bytes == pytest.approx(q4.dense_params * 20 / 32 + q4.vocab * q4.hidden * 34 / 32)
    prof = load_profile(resolve_profile_path("cpu-amd-epyc"))
    prof = prof.model_copy(update={"peak_flops_per_s": {**prof.peak_flops_per_s, "q4_1": 1e11}})
    cm = CostModel(q4, prof)
    assert cm.weight_bytes == pytest.approx(q4.weight_bytes)
    all_q4 = CostModel(q4.model_copy(update={"head_dtype": None}), prof)
    assert cm.weight_bytes > all_q4.weight_bytes  # the Q8_0 head costs more bytes than Q4_1 would
    with pytest.raises(ValueError, match="head_dtype"):
        ModelSpec(name="x", n_layers=1, hidden=8, n_heads=2, ffn=16, vocab=10, head_dtype="q3_k")


def test_publication_is_priced_by_the_twin_not_replayed_as_think_time(tmp_path):
    """The fit run's median sync_s becomes distill.publish_pause_s, and the trace's think time no
    longer contains the measured publication (it would be counted twice)."""
    from types import SimpleNamespace

    from osdsim.validate.pipeline import publish_pause_of, twin_trace_rows

    reqs = [dict(r) for r in REQS]
    reqs[0]["train_s"], reqs[0]["sync_s"] = 0.1, 0.2  # request 1 starts at 1.0 = 0.5 + 0.1 + 0.2 + 0.2 think
    replayed = twin_trace_rows(reqs)[2].split(",")
    priced = twin_trace_rows(reqs, priced_sync=True)[2].split(",")
    assert float(replayed[-1]) == pytest.approx(0.4) and float(priced[-1]) == pytest.approx(0.2)
    run = SimpleNamespace(updates=[{"sync_s": "0.7"}, {"sync_s": "0.9"}, {"sync_s": "0.8"}, {"sync_s": ""}])
    assert publish_pause_of(run) == pytest.approx(0.8)
    assert publish_pause_of(SimpleNamespace(updates=[])) == 0.0
    backend = {"engine": "llama.cpp", "target_layer_type": "q4_1", "draft_layer_type": "q4_1", "head_type": "q8_0"}
    doc = twin_scenario(_summary(backend), reqs, "cpu-amd-epyc", tmp_path / "a.yaml", tmp_path / "l.yaml",
                        tmp_path / "t.csv", tmp_path, publish_pause_s=0.8)
    assert doc["distill"]["publish_pause_s"] == 0.8
    assert (tmp_path / "t.csv").read_text().splitlines()[2].split(",")[-1] == priced[-1]
