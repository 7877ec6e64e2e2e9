"""Model loading helpers on tiny models (SmolLM2 checks are marked slow)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from osdsim.real.models import (  # noqa: E402
    ByteCodec,
    check_codecs_match,
    layer_draft,
    load_pair,
    model_spec,
    tiny_llama,
)

pytestmark = pytest.mark.real


def test_tiny_llama_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_llama(seed=3), tiny_llama(seed=3), tiny_llama(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        la, lb, lc = (m(input_ids=ids).logits for m in (a, b, c))
    assert torch.equal(la, lb) and not torch.allclose(la, lc)


def test_layer_draft_shares_frozen_embeddings_and_trains_only_layers():
    target = tiny_llama(seed=0, num_layers=4)
    draft = layer_draft(target, 2)
    assert draft.model.embed_tokens is target.model.embed_tokens
    assert draft.lm_head is target.lm_head and draft.model.norm is target.model.norm
    assert len(draft.model.layers) == 2
    trainable = {n for n, p in draft.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.") for n in trainable)
    # the layers are copies: training the draft cannot change the target
    p = next(draft.model.layers.parameters())
    q = next(target.model.layers.parameters())
    assert p is not q and torch.equal(p, q)
    with pytest.raises(ValueError):
        layer_draft(target, 4)


def test_model_spec_numbers():
    m = tiny_llama(seed=0, num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2,
                   intermediate_size=128, vocab_size=512)
    spec = model_spec(m)
    assert {k: spec[k] for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab")} == {
        "layers": 3, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "ffn": 128, "vocab": 512}
    per_layer = 4 * 64 * 16 * 2 + 2 * 64 * 16 * 2 + 3 * 64 * 128 + 2 * 64  # q,o + k,v + mlp + norms
    assert spec["params"] == 512 * 64 + 3 * per_layer + 64  # tied head counted once
    assert spec["dtype"] == "float32" and spec["trainable_params"] == 0


def test_byte_codec_and_mismatch_message():
    c = ByteCodec(512)
    ids = c.chat_prompt("héllo")
    assert ids[0] == 1 and max(ids) < 512 and "héllo" in c.decode(ids)
    check_codecs_match(c, ByteCodec(512))
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_codecs_match(c, ByteCodec(600))


def test_load_pair_tiny():
    pair = load_pair("tiny", "layers:1")
    assert pair.target_id.startswith("tiny-") and len(pair.draft.model.layers) == 1
    with pytest.raises(ValueError, match="layers:L"):
        load_pair("tiny", "layers:x")
    with pytest.raises(FileNotFoundError):
        load_pair("/nonexistent/model", "layers:1")


@pytest.mark.slow
def test_smollm2_gguf_loads_and_greedy_spec_is_exact(tmp_path, monkeypatch):
    """The packaged SmolLM2 GGUF converts to a cached HF dir; greedy spec decoding is exact (fp32)."""
    pytest.importorskip("gguf")
    from osdsim.real._deps import MissingDependency
    from osdsim.real.specdec import DecodeParams, speculative_generate, target_generate

    torch.set_num_threads(1)
    try:
        pair = load_pair("smollm2", "layers:2")
    except MissingDependency as e:
        pytest.skip(str(e))
    spec = model_spec(pair.target)
    assert (spec["layers"], spec["hidden"], spec["heads"], spec["kv_heads"], spec["vocab"]) == (30, 576, 9, 3, 49152)
    assert model_spec(pair.draft)["trainable_params"] == 7080192
    for text in ("What is 12 times 7?", "Write a Python function that reverses a string."):
        prompt = pair.codec.chat_prompt(text)
        ref = target_generate(pair.target, prompt, 24, eos_ids=pair.codec.eos_ids)
        gen = speculative_generate(pair.target, pair.draft, prompt, DecodeParams(k=4, max_new_tokens=24),
                                   pair.codec.eos_ids)
        assert gen.tokens == ref.tokens
        assert pair.codec.decode(ref.tokens).strip()


def test_frequent_token_ids_ranks_by_count_then_id():
    from osdsim.real.models import frequent_token_ids

    ids = frequent_token_ids([[7, 7, 7, 9, 9, 300], [9, 300, 300, 300]], 3, 512, always=(2,))
    assert ids.tolist() == [2, 7, 9, 300]
    assert frequent_token_ids([[5]], 3, 512).tolist() == [0, 1, 5]  # padded with the lowest ids


def test_subset_head_draft_is_exact_on_its_subset_and_spec_stays_exact():
    from osdsim.real.models import SubsetHeadLM
    from osdsim.real.specdec import DecodeParams, speculative_generate, target_generate

    target = tiny_llama(seed=0, num_layers=3)
    draft = layer_draft(target, 1)
    keep = torch.arange(0, 512, 3)
    sub = SubsetHeadLM(draft, keep)
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        full = draft(input_ids=ids, use_cache=False).logits
        small = sub(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(small[..., keep], full[..., keep])
    drop = torch.ones(512, dtype=torch.bool)
    drop[keep] = False
    assert torch.isinf(small[..., drop]).all()
    prompt = [1, 50, 60, 70]
    gen = speculative_generate(target, sub, prompt, DecodeParams(k=3, max_new_tokens=20))
    assert gen.tokens == target_generate(target, prompt, 20).tokens


def test_serving_copy_and_sync():
    from osdsim.real.models import serving_copy, sync_trainable

    target = tiny_llama(seed=0, num_layers=2)
    draft = layer_draft(target, 1)
    served = serving_copy(draft, "bfloat16")
    assert next(served.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        next(draft.model.layers.parameters()).add_(1.0)
    before = next(served.model.layers.parameters()).clone()
    sync_trainable(draft, served)
    after = next(served.model.layers.parameters())
    assert not torch.equal(before, after)
    torch.testing.assert_close(after.float(), next(draft.model.layers.parameters()), atol=2e-2, rtol=1e-2)


def test_serve_dtype_auto_follows_native_bf16(monkeypatch):
    pytest.importorskip("torch")
    from osdsim.real import run as R

    assert R.resolve_serve_dtype("float32", "cpu") == "float32"
    assert R.resolve_serve_dtype("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setattr(R, "native_bf16", lambda device: False)
    assert R.resolve_serve_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(R, "native_bf16", lambda device: True)
    assert R.resolve_serve_dtype("auto", "cpu") == "bfloat16"
