"""The llama.cpp backend on tiny random Llamas: GGUF export (layout, q/k permutation: llama.cpp's
logits equal the PyTorch model's), KV rollback, greedy exactness and full acceptance of speculative
decoding on llama.cpp, and the one-line errors (non-Llama GGUF, vocabulary mismatch)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from osdsim.errors import InputError  # noqa: E402
from osdsim.real import llamacpp as L  # noqa: E402
from osdsim.real.models import layer_draft, tiny_llama  # noqa: E402
from osdsim.real.specdec import DecodeParams  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]

PROMPTS = [[1, 40, 41, 42, 43], [1, 200, 7, 99, 300, 12, 5, 77], [1, 9]]


def _needs_llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=3, num_layers=4)


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "target.gguf"
    L.export_gguf(tiny, path, "f32")
    return path


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def test_export_writes_llama_layout(tiny, tiny_gguf):
    r = gguf.GGUFReader(str(tiny_gguf))
    names = {t.name for t in r.tensors}
    assert "token_embd.weight" in names and "output_norm.weight" in names
    assert "output.weight" not in names  # tied: llama.cpp reuses the embeddings
    for i in range(4):
        for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                     "ffn_up", "ffn_down"):
            assert f"blk.{i}.{part}.weight" in names
    assert r.fields["llama.block_count"].contents() == 4
    assert r.fields["llama.vocab_size"].contents() == 512
    # the K rows are permuted (rotary halves -> pairs): not the HF matrix, but the same rows
    k = next(t for t in r.tensors if t.name == "blk.0.attn_k.weight")
    hf = tiny.model.layers[0].self_attn.k_proj.weight.numpy()
    got = np.array(k.data).reshape(hf.shape)
    assert not np.allclose(got, hf)
    assert np.allclose(got, L.permute_qk(hf, 2))
    assert np.allclose(np.sort(got, axis=0), np.sort(hf, axis=0))


def test_base_must_be_llama(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), arch="gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match="architecture is 'gpt2'"):
        L.read_base(path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(InputError, match="not a readable GGUF"):
        L.read_base(tmp_path / "junk.gguf")


def test_draft_vocabulary_must_match_the_target(tiny_gguf):
    base = L.read_base(tiny_gguf)
    assert base.vocab == 512 and base.n_layers == 4 and base.layer_type == "f32"
    other = tiny_llama(seed=1, num_layers=2, vocab_size=640)
    with pytest.raises(InputError, match="vocabulary"):
        L.export_gguf(other, tiny_gguf.parent / "bad.gguf", base=base)
    assert not (tiny_gguf.parent / "bad.gguf").exists()
    assert not list(tiny_gguf.parent.glob(".bad.gguf.*"))  # no temp file left behind


def test_failed_export_is_one_line_and_leaves_nothing(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="GGUF export to .* failed"):
        L.export_gguf(tiny, blocker / "sub" / "x.gguf", "f32")
    with pytest.raises(InputError, match="layer type"):
        L.export_gguf(tiny, tmp_path / "y.gguf", "q3_k")



def test_replacing_renames_on_success_and_cleans_up_on_failure(tmp_path):
    from osdsim.errors import replacing

    out = tmp_path / "d" / "x.bin"
    with replacing(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        tmp.write_bytes(b"new")
        assert not out.exists()  # nothing at the destination until the block succeeds
    assert out.read_bytes() == b"new"
    with pytest.raises(RuntimeError), replacing(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert out.read_bytes() == b"new"  # the old file stays
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.bin"]  # no temp file left


def test_failed_slice_is_one_line(tiny_gguf, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="GGUF slice to .* failed"):
        L.slice_gguf(tiny_gguf, 2, blocker / "x.gguf")
    out = L.slice_gguf(tiny_gguf, 2, tmp_path / "s.gguf")
    assert L.read_base(out).n_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "s.gguf"]

@pytest.mark.parametrize("layer_type,tol", [("f32", 2e-3), ("f16", 3e-2)])
def test_llamacpp_logits_match_pytorch(tiny, tmp_path, layer_type, tol):
    _needs_llama_cpp()
    path = tmp_path / f"t-{layer_type}.gguf"
    L.export_gguf(tiny, path, layer_type)
    lm = L.LlamaCppLM(path, n_ctx=256)
    try:
        for ids in PROMPTS:
            lm.reset()
            got = lm.feed(ids, all_logits=True)
            want = _torch_logits(tiny, ids)
            scale = np.abs(want).max()
            assert np.abs(got - want).max() <= tol * scale, layer_type
            assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8
    finally:
        lm.close()


def test_layer_draft_exported_against_the_target_gguf(tiny, tiny_gguf, tmp_path):
    """The draft's own layers from PyTorch, the target's embeddings/norm copied from its GGUF."""
    _needs_llama_cpp()
    draft = layer_draft(tiny, 2)
    with torch.no_grad():  # a trained draft differs from the target's layers
        draft.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    path = tmp_path / "draft.gguf"
    rec = L.export_gguf(draft, path, base=L.read_base(tiny_gguf))
    assert rec.layer_type == "f32" and rec.bytes == path.stat().st_size
    lm = L.LlamaCppLM(path, n_ctx=256)
    try:
        ids = PROMPTS[1]
        got = lm.feed(ids)
        want = _torch_logits(draft, ids)
        assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
    finally:
        lm.close()


def test_truncate_rolls_back_the_kv_cache(tiny_gguf):
    _needs_llama_cpp()
    lm = L.LlamaCppLM(tiny_gguf, n_ctx=256)
    try:
        fresh = lm.feed([1, 5, 6, 7, 8, 9])
        lm.reset()
        lm.feed([1, 5, 6])
        lm.feed([100, 101, 102])  # rejected continuation
        lm.truncate(3)
        assert lm.n_past == 3
        again = lm.feed([7, 8, 9])
        assert np.allclose(again, fresh[3:], atol=1e-4 * np.abs(fresh).max())
    finally:
        lm.close()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_target_greedy_on_llamacpp(tiny, tiny_gguf, tmp_path, k):
    _needs_llama_cpp()
    target = L.LlamaCppLM(tiny_gguf, n_ctx=512)
    dpath = tmp_path / "draft.gguf"
    L.export_gguf(layer_draft(tiny, 2), dpath, base=L.read_base(tiny_gguf))
    draft = L.LlamaCppLM(dpath, n_ctx=512)
    try:
        params = DecodeParams(k=k, greedy=True, max_new_tokens=40, positions="target", teacher_topk=8)
        proposed = accepted = 0
        for ids in PROMPTS:
            base = L.target_generate_llamacpp(target, ids, 40)
            spec = L.speculative_generate_llamacpp(target, draft, ids, params)
            assert spec.tokens == base.tokens
            assert len(spec.tokens) == 40
            assert sum(s.emitted for s in spec.steps) == 40
            proposed += sum(s.proposed for s in spec.steps)
            accepted += sum(s.accepted for s in spec.steps)
            assert spec.teacher is not None and spec.teacher.index.shape[1] == 8
        assert proposed > 0 and 0 < accepted < proposed  # both branches of the rollback ran
    finally:
        target.close()
        draft.close()


def test_self_draft_accepts_everything_greedy_and_sampling(tiny_gguf):
    """Draft = target: every drafted token is accepted (p = q), greedy and under rejection sampling."""
    _needs_llama_cpp()
    target = L.LlamaCppLM(tiny_gguf, n_ctx=512)
    draft = L.LlamaCppLM(tiny_gguf, n_ctx=512)
    try:
        for greedy in (True, False):
            gen = torch.Generator().manual_seed(0)
            params = DecodeParams(k=4, greedy=greedy, temperature=1.0, max_new_tokens=30)
            out = L.speculative_generate_llamacpp(target, draft, PROMPTS[0], params, generator=gen)
            full = [s for s in out.steps if s.proposed == 4]
            assert full and all(s.accepted == 4 for s in full)
            assert len(out.tokens) == 30
    finally:
        target.close()
        draft.close()


def test_publisher_exports_reloads_and_times(tiny, tiny_gguf, tmp_path):
    _needs_llama_cpp()
    draft = layer_draft(tiny, 2)
    pub = L.DraftPublisher(tmp_path / "work", L.read_base(tiny_gguf), None, threads=1, n_ctx=256)
    try:
        pub.publish(draft)
        before = pub.lm.feed(PROMPTS[0])
        with torch.no_grad():
            draft.model.layers[0].self_attn.o_proj.weight.mul_(-1.0)
        pub.publish(draft)
        after = pub.lm.feed(PROMPTS[0])
        assert not np.allclose(before, after)  # the server serves the updated weights
        assert np.abs(after - _torch_logits(draft, PROMPTS[0])).max() <= 2e-3 * np.abs(after).max()
        s = L.sync_summary(pub.records)
        assert s["n"] == 2 and s["sync_s_median"] > 0 and s["sync_s_p90"] >= s["sync_s_median"] * 0.5
        assert s["export_s_median"] > 0 and s["reload_s_median"] > 0
    finally:
        pub.close()


def test_an_unloadable_llama_cpp_is_reported_unavailable(monkeypatch):
    """A failed build / missing library: the backend says so in one line; doctor marks it unavailable."""
    import sys

    from osdsim import doctor
    from osdsim.real._deps import MissingDependency

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    ok, why = L.available()
    assert ok is False and "llama_cpp" in why
    with pytest.raises(MissingDependency, match=r"llamacpp.*extra"):
        L.require_llama_cpp()
    check = next(c for c in doctor.checks() if c.name == "llama-cpp-python")
    assert check.ok is False and "unavailable" in check.detail and check.fix
    caps = doctor.capabilities(doctor.checks())
    assert caps["osdsim real (models.backend: llamacpp)"].startswith("no")
    assert caps["osdsim run / sweep / plot"] == "yes"  # everything else keeps working


def _needs_batch_invariant_build():
    _needs_llama_cpp()
    if not L.build_info()["batch_invariant"]:
        pytest.fail("llama-cpp-python is built with llamafile's sgemm (GGML_LLAMAFILE): logits depend on the pass "
                    "size, greedy speculative output is not exact; rebuild: bash scripts/install.sh llamacpp")


def test_logits_do_not_depend_on_the_pass_size(tiny, tmp_path):
    """Bit-identical logits whether a position is evaluated alone or in a block (q8_0 weights: the
    type llamafile's sgemm would take over for blocks of >= 2 tokens)."""
    _needs_llama_cpp()
    if not L.build_info()["batch_invariant"]:
        pytest.skip("llama.cpp built with llamafile's sgemm (not batch-invariant)")
    path = tmp_path / "t-q8.gguf"
    L.export_gguf(tiny, path, "q8_0")
    lm = L.LlamaCppLM(path, n_ctx=256)
    try:
        ids = PROMPTS[1]
        rows = {}
        for b in (1, 2, 3, 5):
            lm.reset()
            lm.feed(ids[:2], all_logits=False)
            rows[b] = np.concatenate([lm.feed(ids[i:i + b]) for i in range(2, len(ids), b)])
        for b in (2, 3, 5):
            assert np.array_equal(rows[b], rows[1]), b
    finally:
        lm.close()


@pytest.mark.slow
def test_real_smollm2_gguf_greedy_speculative_is_exact(tmp_path):
    """On the packaged SmolLM2 GGUF (Q4_1 layers, Q8_0 head) with its 2-layer slice as draft: the
    target's logits are bit-identical across pass sizes, and greedy speculative output equals the
    target's own greedy output on real prompts (needs a build without llamafile's sgemm)."""
    _needs_batch_invariant_build()
    from osdsim.real import data as D
    from osdsim.real._deps import MissingDependency
    from osdsim.real.models import smollm2_gguf_path

    try:
        src = smollm2_gguf_path()
    except (MissingDependency, FileNotFoundError) as e:
        pytest.skip(str(e))
    target = L.LlamaCppLM(src, n_ctx=1024)
    draft = L.LlamaCppLM(L.slice_gguf(src, 2, tmp_path / "draft-l2.gguf"), n_ctx=1024)
    try:
        texts = [q.text for d in ("gsm8k", "code") for q in itertools.islice(D.load_domain(d), 2)]
        eos = (int(target.llm.token_eos()),)
        prompts = [target.llm.tokenize(f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n".encode(),
                                       add_bos=False, special=True)[:256] for t in texts]
        ids = prompts[0]
        target.reset()
        one = np.concatenate([target.feed([t]) for t in ids[:12]])
        target.reset()
        block = np.concatenate([target.feed(ids[i:i + 4]) for i in range(0, 12, 4)])
        assert np.array_equal(one, block)
        params = DecodeParams(k=3, greedy=True, max_new_tokens=40)
        for p in prompts:
            base = L.target_generate_llamacpp(target, p, 40, eos_ids=eos)
            spec = L.speculative_generate_llamacpp(target, draft, p, params, eos)
            assert spec.tokens == base.tokens
            assert sum(s.proposed for s in spec.steps) > 0
    finally:
        target.close()
        draft.close()


# --- batched serving on llama.cpp (one KV sequence per request) -------------------------------------


def _llama_engine(tiny, draft, tmp_path, n_seq=3):
    from osdsim.real.engines import LlamaCppEngine

    return LlamaCppEngine("tiny", tiny, draft, tmp_path / "work", threads=1, n_seq=n_seq, n_ctx_seq=512)


@pytest.mark.parametrize("k", [0, 3])
def test_batched_llamacpp_serving_is_exact_with_mid_flight_joins(tiny, tmp_path, k):
    """Greedy: every request served by the batched llama.cpp engine (ragged acceptance rolled back
    per KV sequence, more requests than sequence ids, arrivals joining mid-flight) emits the tokens
    the target GGUF alone emits at batch 1."""
    _needs_llama_cpp()
    from tests.unit.test_real_serve import _prompts, _serve_all

    draft = layer_draft(tiny, 2)
    (tmp_path / "work").mkdir()
    engine = _llama_engine(tiny, draft, tmp_path)
    ref_lm = L.LlamaCppLM(engine.base.path, n_ctx=512)
    try:
        prompts = _prompts(7)
        seqs, server = _serve_all(tiny, draft, prompts, [0, 0, 1, 3, 4, 4, 9], k=k, engine=engine)
        if k:
            accepted = sum(st.accepted for s in seqs.values() for st in s.steps)
            rejected = sum(st.accepted < st.proposed for s in seqs.values() for st in s.steps)
            assert accepted > 0 and rejected > 0  # ragged acceptance really happened
        for j, p in enumerate(prompts):
            ref = L.target_generate_llamacpp(ref_lm, p, 20, eos_ids=(2,)).tokens
            assert seqs[j].tokens == ref, f"request {j} differs from the target's own greedy output"
        assert engine.rows == [] and sorted(engine.free) == [0, 1, 2] and not engine.slot
        assert server.kv_reserved == 0
    finally:
        ref_lm.close()
        engine.close()


def test_batched_publication_keeps_the_running_sequences(tiny, tmp_path):
    """A publication mid-stream loads the new draft in a new context and carries every running
    sequence's KV cells over: decoding continues exactly, with the new weights, and is timed."""
    _needs_llama_cpp()
    from osdsim.real.serve import BatchServer, RequestRecord, Sequence, ServeModels, ServeParams
    from tests.unit.test_real_serve import _prompts

    draft = layer_draft(tiny, 2)
    (tmp_path / "work").mkdir()
    engine = _llama_engine(tiny, draft, tmp_path)
    ref_lm = L.LlamaCppLM(engine.base.path, n_ctx=512)
    try:
        models = ServeModels(tiny, draft, 0, (2,), torch.device("cpu"))
        server = BatchServer(models, ServeParams(3, True, 1.0, 24, "all", 8, 3, 10_000, 64),
                             torch.Generator().manual_seed(0), engine)
        prompts = _prompts(3, seed=5)
        seqs = [Sequence(RequestRecord(j, 0, "p", "d", str(j), 0.0), list(p), list(p)) for j, p in enumerate(prompts)]
        for s in seqs:
            server.admit(s)
        tick = [0.0]

        def clock():
            tick[0] += 1.0
            return tick[0]

        for _ in range(3):
            server.step(clock, 0)
        probe = [L.Block(engine.rows[0], engine.pos["draft"][engine.rows[0]], [7], [0])]

        def probe_logits():
            out = engine.publisher.lm.decode(probe)[0]
            engine.publisher.lm.seq_rm(probe[0].seq_id, probe[0].pos0)
            return out

        before = probe_logits()
        old = engine.publisher.lm
        engine.publish(draft)  # the same weights: the carried cells give the same next-token logits
        assert engine.publisher.lm is not old
        assert np.array_equal(probe_logits(), before)
        with torch.no_grad():
            draft.model.layers[0].self_attn.o_proj.weight.mul_(-1.0)
        timing = engine.publish(draft)
        assert timing["reload_s"] > 0 and timing["export_s"] > 0
        assert not np.allclose(probe_logits(), before)  # the new weights serve
        while not all(s.done for s in seqs):
            server.step(clock, 0)
        for s, p in zip(seqs, prompts, strict=True):
            assert s.tokens == L.target_generate_llamacpp(ref_lm, p, 24, eos_ids=(2,)).tokens
        assert len(engine.publisher.records) == 2
    finally:
        ref_lm.close()
        engine.close()


def test_serve_real_on_llamacpp_records_the_stream_and_its_publications(tmp_path):
    """The whole serving loop with `models.backend: llamacpp`: every request served, training
    inline, each done step published to llama.cpp with its export + reload time in the summary."""
    _needs_llama_cpp()
    from osdsim.real.serve import serve_real
    from tests.unit.test_real_serve import _config

    cfg = _config("inline", 20.0)
    cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={"backend": "llamacpp"})})
    res = serve_real(cfg, tmp_path)
    s = res.summary
    assert s["backend"]["engine"] == "llama.cpp"
    assert all(r.finish_s is not None and r.output_tokens > 0 for r in res.requests)
    assert max(it.batch_size for it in res.iterations) > 1  # batched
    done = s["training"]["steps_done"]
    assert done > 0 and s["backend"]["sync"]["n"] == done
    assert s["backend"]["sync"]["sync_s_median"] > 0
    assert (tmp_path / "summary.json").is_file()


def test_auto_draft_type_never_publishes_a_trained_draft_coarser_than_q8_0():
    assert L.served_draft_type("auto", "q4_1") == L.served_draft_type("auto", "q4_0") == "q8_0"
    assert L.served_draft_type("auto", "q8_0") == "q8_0"
    assert L.served_draft_type("auto", "f16") == "f16"
    assert L.served_draft_type("auto", "f32") == L.served_draft_type("auto", None) == "f32"
    assert L.served_draft_type("q4_1", "q4_1") == "q4_1"  # asked for: served as asked
    with pytest.raises(InputError, match="GGUF layer type"):
        L.served_draft_type("q2_k", "q4_1")


def test_a_4_bit_round_trip_rounds_small_updates_away_and_q8_0_keeps_them():
    """Why `auto` is at least q8_0: a weight already on the Q4_1 grid plus a distillation-sized
    update (±1e-3) comes back from Q4_1 with ~5% of the update (the block's grid moves instead), and
    from Q8_0 with all of it."""
    rng = np.random.default_rng(0)
    w = L.round_trip(rng.normal(0, 0.05, (16, 64)).astype(np.float32), "q4_1")  # a packaged weight
    update = rng.choice([-1e-3, 1e-3], w.shape).astype(np.float32)
    assert np.array_equal(L.round_trip(w, "q4_1"), w)

    def served_fraction(layer_type: str) -> float:  # projection of the served change on the update
        return float(((L.round_trip(w + update, layer_type) - w) * update).sum() / (update * update).sum())

    assert served_fraction("q4_1") < 0.2
    assert served_fraction("q8_0") == pytest.approx(1.0, abs=0.1)
    assert served_fraction("f16") == pytest.approx(1.0, abs=0.01) and served_fraction("f32") == pytest.approx(1.0)


def test_a_slice_retyped_to_q8_0_has_q8_0_layers_and_the_base_s_other_tensors(tiny, tmp_path):
    src = tmp_path / "t.gguf"
    L.export_gguf(tiny, src, "q4_1")
    out = L.slice_gguf(src, 2, tmp_path / "s.gguf", layer_type="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    base = {t.name: t.tensor_type for t in gguf.GGUFReader(str(src)).tensors}
    q8 = gguf.GGMLQuantizationType.Q8_0
    assert types["blk.1.attn_q.weight"] == types["blk.0.ffn_down.weight"] == q8
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["token_embd.weight"] == base["token_embd.weight"]
    assert L.read_base(out).layer_type == "q8_0" and L.read_base(out).n_layers == 2


def test_the_llamacpp_engine_evaluates_the_weights_it_serves():
    """served_state: the matrices as the export's GGUF type holds them, the norms as they are."""
    import types as _types

    from osdsim.real.engines import LlamaCppEngine, TorchEngine

    eng = object.__new__(LlamaCppEngine)
    eng._LC = L
    eng.publisher = _types.SimpleNamespace(layer_type="q4_1")
    eng.base = _types.SimpleNamespace(layer_type="q4_1")
    w = torch.from_numpy(L.round_trip(np.random.default_rng(1).normal(0, 0.05, (8, 64)).astype(np.float32), "q4_1"))
    norm = torch.ones(64) + 1e-3
    trained = w + torch.from_numpy(np.random.default_rng(2).choice([-1e-3, 1e-3], (8, 64)).astype(np.float32))
    state = {"layers.0.mlp.up_proj.weight": trained, "layers.0.input_layernorm.weight": norm}
    got = eng.served_state(state)
    assert torch.equal(got["layers.0.input_layernorm.weight"], norm)
    served = got["layers.0.mlp.up_proj.weight"]
    assert np.array_equal(served.numpy(), L.round_trip(trained.numpy(), "q4_1")) and not torch.equal(served, trained)
    assert object.__new__(TorchEngine).served_state(state) is state
