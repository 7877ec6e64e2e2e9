"""`osdsim real` input handling: bad scenarios give one line and exit code 2 (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from osdsim.real.cli import real
from osdsim.real.config import RealConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(real)
    return app


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("stream: {domains: [poetry]}\n", "unknown domain"),
        ("decode: {k: 0}\n", "decode.k"),
        ("bogus: 1\n", "bogus"),
        ("- 1\n- 2\n", "mapping"),
        ("decode: {k: [\n", "yaml"),
    ],
)
def test_bad_scenario_exits_2_with_one_line(tmp_path, text, needle):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    res = CliRunner().invoke(_app(), [str(path)])
    assert res.exit_code == 2
    out = (res.stderr if hasattr(res, "stderr") else res.output).strip()
    assert len(out.splitlines()) == 1 and out.startswith("error:")
    assert needle.lower() in out.lower()
    assert "Traceback" not in res.output


def test_missing_file_exits_2(tmp_path):
    res = CliRunner().invoke(_app(), [str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_shipped_real_scenarios_validate():
    paths = sorted((ROOT / "scenarios").glob("real-*.yaml"))
    assert paths, "scenarios/real-*.yaml missing"
    for p in paths:
        cfg = load_config(p)
        assert isinstance(cfg, RealConfig)


def test_device_is_checked_before_any_work():
    torch = pytest.importorskip("torch")
    from pydantic import ValidationError

    from osdsim.real.config import RealConfig
    from osdsim.real.run import resolve_device

    assert resolve_device(torch, "cpu").type == "cpu"
    assert resolve_device(torch, "auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device(torch, "cuda:0")
    with pytest.raises(ValidationError):
        RealConfig(device="gpu")


def test_llamacpp_backend_rejects_a_non_llama_gguf_in_one_line(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    import numpy as np

    model = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(model), arch="phi2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path = tmp_path / "s.yaml"
    path.write_text(f"models: {{target: {model}, backend: llamacpp}}\nstream: {{domains: [gsm8k]}}\n")
    res = CliRunner().invoke(_app(), [str(path), "--quiet"])
    assert res.exit_code == 2
    out = res.output.strip()
    assert len(out.splitlines()) == 1 and out.startswith("error:")
    assert "architecture is 'phi2'" in out and "Llama" in out
    assert "Traceback" not in res.output
