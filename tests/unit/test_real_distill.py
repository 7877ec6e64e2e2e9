"""Distillation: losses against reference computations, and online OSD updates on a tiny model."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from osdsim.real import distill as Dl  # noqa: E402
from osdsim.real.models import layer_draft, tiny_llama  # noqa: E402
from osdsim.real.specdec import DecodeParams, speculative_generate, target_generate  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]


def _logits(seed: int, n: int = 5, v: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, v, generator=g, dtype=torch.float64), 2 * torch.randn(n, v, generator=g, dtype=torch.float64)


def _ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # per row, from probabilities
    return (p * (p.log() - q.log())).sum(-1)


def test_forward_and_reverse_kl_match_reference():
    s_logits, t_logits = _logits(0)
    p, q = t_logits.softmax(-1), s_logits.softmax(-1)
    t_lp = t_logits.log_softmax(-1)
    fkl = Dl.distill_loss(s_logits, t_lp, None, "fkl")
    rkl = Dl.distill_loss(s_logits, t_lp, None, "rkl")
    assert float(fkl) == pytest.approx(float(_ref_kl(p, q).mean()), rel=1e-5)
    assert float(rkl) == pytest.approx(float(_ref_kl(q, p).mean()), rel=1e-5)
    assert float(fkl) != pytest.approx(float(rkl), rel=1e-3)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_reference(beta):
    s_logits, t_logits = _logits(1)
    p, q = t_logits.softmax(-1), s_logits.softmax(-1)
    m = beta * p + (1 - beta) * q
    ref = (beta * _ref_kl(p, m) + (1 - beta) * _ref_kl(q, m)).mean()
    got = Dl.distill_loss(s_logits, t_logits.log_softmax(-1), None, "jsd", beta)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)


def test_jsd_symmetric_bounded_and_zero_on_equal():
    a, b = _logits(2)
    ab = Dl.distill_loss(a, b.log_softmax(-1), None, "jsd", 0.5)
    ba = Dl.distill_loss(b, a.log_softmax(-1), None, "jsd", 0.5)
    assert float(ab) == pytest.approx(float(ba), rel=1e-9)
    assert 0 < float(ab) <= math.log(2)
    assert float(Dl.distill_loss(a, a.log_softmax(-1), None, "jsd", 0.5)) == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError):
        Dl.distill_loss(a, b.log_softmax(-1), None, "jsd", 1.0)


def test_topk_truncated_losses():
    s_logits, t_logits = _logits(3, v=20)
    t_lp = t_logits.log_softmax(-1)
    # K = V: the truncated variant is the full loss
    vals, idx = t_lp.topk(20, -1)
    for kind in ("fkl", "rkl", "jsd"):
        full = Dl.distill_loss(s_logits, t_lp, None, kind)
        trunc = Dl.distill_loss(s_logits, vals, idx, kind)
        assert float(trunc) == pytest.approx(float(full), rel=1e-6)
    # K < V: both distributions collapsed onto the teacher's top-K plus a 'rest' category
    vals, idx = t_lp.topk(5, -1)
    p_all, q_all = t_logits.softmax(-1), s_logits.softmax(-1)
    p = torch.cat([p_all.gather(-1, idx), 1 - p_all.gather(-1, idx).sum(-1, keepdim=True)], -1)
    q = torch.cat([q_all.gather(-1, idx), 1 - q_all.gather(-1, idx).sum(-1, keepdim=True)], -1)
    for kind, ref in (("fkl", _ref_kl(p, q)), ("rkl", _ref_kl(q, p))):
        got = Dl.distill_loss(s_logits, vals, idx, kind)
        assert float(got) == pytest.approx(float(ref.mean()), rel=1e-6)
    # the student is penalised for mass outside the teacher's top-K
    far = s_logits.clone()
    far.scatter_(-1, idx, -30.0)
    assert float(Dl.distill_loss(far, vals, idx, "fkl")) > 10


def test_loss_gradient_flows_to_student_only():
    s_logits, t_logits = _logits(4)
    s_logits.requires_grad_(True)
    Dl.distill_loss(s_logits, t_logits.log_softmax(-1), None, "fkl").backward()
    g = s_logits.grad
    # d FKL / d logits = (q - p) / N
    ref = (s_logits.detach().softmax(-1) - t_logits.softmax(-1)) / s_logits.shape[0]
    torch.testing.assert_close(g, ref)


def test_cosine_warmup_schedule():
    f = Dl.cosine_with_warmup(100, 0.03)
    assert f(0) == pytest.approx(1 / 3) and f(2) == pytest.approx(1.0)
    assert f(51) == pytest.approx(0.5, abs=0.02) and f(100) == pytest.approx(0.0, abs=1e-9)


def test_answers_key_changes_with_model_prompts_and_domain():
    base = Dl.answers_key("m1", "tok", "code", [[1, 2, 3]], 64)
    assert base == Dl.answers_key("m1", "tok", "code", [[1, 2, 3]], 64)
    assert base != Dl.answers_key("m2", "tok", "code", [[1, 2, 3]], 64)
    assert base != Dl.answers_key("m1", "tok", "code", [[1, 2, 4]], 64)
    assert base != Dl.answers_key("m1", "tok", "gsm8k", [[1, 2, 3]], 64)
    assert base != Dl.answers_key("m1", "tok", "code", [[1, 2, 3]], 32)


def test_answer_cache_roundtrip(tmp_path):
    cache = Dl.AnswerCache(tmp_path)
    calls = []

    def make():
        calls.append(1)
        return [[1, 2], [3]]

    assert cache.get_or_make("k", make, {}) == [[1, 2], [3]]
    assert cache.get_or_make("k", make, {}) == [[1, 2], [3]]
    assert len(calls) == 1


# --- online distillation on a tiny model ---------------------------------------------------------


def _prompts(g: torch.Generator, n: int, lo: int, hi: int) -> list[list[int]]:
    return [torch.randint(lo, hi, (12,), generator=g).tolist() for _ in range(n)]


def test_online_distillation_lowers_loss_and_raises_heldout_alpha():
    """OSD on a tiny pair: serve 64 requests of one 'domain' (prompts over tokens 3..99) with
    speculative decoding, distil every 8 requests from the verify pass's logits; held-out prompts
    of that domain get a lower loss and a higher α."""
    target = tiny_llama(seed=0, num_layers=4)
    draft = layer_draft(target, 1)
    g = torch.Generator().manual_seed(0)
    train, held = _prompts(g, 64, 3, 100), _prompts(g, 16, 3, 100)
    heldout = [(p, target_generate(target, p, 24).tokens) for p in held]
    held_samples = [Dl.label_with_target(target, p, a, 0) for p, a in heldout]
    loss0 = Dl.eval_loss(draft, held_samples, "fkl", 0.5, pad_id=0)
    alpha0 = Dl.teacher_forced_alpha(draft, heldout, pad_id=0)
    cfg = Dl.DistillConfig(update_interval=8, window_requests=64, lr=1e-3, epochs_per_update=2, teacher_topk=0)
    distiller = Dl.OnlineDistiller(draft=draft, target=target, cfg=cfg, pad_id=0, generator=g)
    params = DecodeParams(k=3, max_new_tokens=24, positions="all", teacher_topk=0)
    for p in train:
        gen = speculative_generate(target, draft, p, params, generator=g)
        distiller.request_done(Dl.sample_from_generation(p, gen, "d"))
    assert len(distiller.updates) == 8
    loss1 = Dl.eval_loss(draft, held_samples, "fkl", 0.5, pad_id=0)
    alpha1 = Dl.teacher_forced_alpha(draft, heldout, pad_id=0)
    assert loss1 < 0.95 * loss0
    assert alpha1 > alpha0 + 0.05
    # the target and the shared embeddings/head were not touched
    assert not any(p.requires_grad for p in target.parameters())


def test_offline_distillation_and_sources():
    target = tiny_llama(seed=1, num_layers=3)
    draft = layer_draft(target, 1)
    g = torch.Generator().manual_seed(1)
    prompts = _prompts(g, 16, 3, 100)
    samples = [Dl.label_with_target(target, p, target_generate(target, p, 16).tokens, 16) for p in prompts]
    first, last = Dl.offline_distill(draft, samples, Dl.OfflineConfig(lr=2e-3, epochs=3), 0, g)
    assert last < first
    # student and mix sources label their own sequences with the target
    for source in ("student", "mix_token", "mix_request"):
        cfg = Dl.DistillConfig(sample_source=source, update_interval=2, teacher_topk=16)
        d = Dl.OnlineDistiller(draft=draft, target=target, cfg=cfg, pad_id=0, generator=g)
        for p in prompts[:4]:
            gen = speculative_generate(target, draft, p, DecodeParams(k=2, max_new_tokens=8, positions="all", teacher_topk=16))
            s = d.make_sample(p, gen, "d", 8)
            assert s is not None and s.n_positions == 8
            assert s.teacher.logprobs.shape == (8, 16)
            d.request_done(s)
        assert len(d.updates) == 2


def test_batch_loss_uses_stored_topk_teacher():
    """batch_loss on top-K samples equals distill_loss on the draft's logits at the positions."""
    target = tiny_llama(seed=2, num_layers=2)
    draft = layer_draft(target, 1)
    g = torch.Generator().manual_seed(2)
    samples = [Dl.label_with_target(target, p, target_generate(target, p, 6).tokens, 10)
               for p in _prompts(g, 3, 3, 200)]
    with torch.no_grad():
        ids = [s.ids for s in samples]
        logits = torch.cat([draft(input_ids=i[None], use_cache=False).logits[0, s.teacher.positions]
                            for i, s in zip(ids, samples, strict=True)])
    t_lp = torch.cat([s.teacher.logprobs for s in samples])
    t_idx = torch.cat([s.teacher.index for s in samples])
    for kind in ("fkl", "rkl", "jsd"):
        got = Dl.batch_loss(draft, samples, kind, 0.5, 0)
        ref = Dl.distill_loss(logits, t_lp, t_idx, kind, 0.5)
        assert float(got) == pytest.approx(float(ref), rel=1e-4, abs=1e-6)


def test_teacher_forced_counts_are_per_pair_and_pool_to_the_alpha():
    """Per (prompt, answer) pair, hits = answer tokens the draft's argmax predicts given the target's
    prefix, counted one pair at a time (the same in any batching); pooled they are the held-out α;
    an empty answer counts (0, 0)."""
    target = tiny_llama(seed=0, num_layers=4)
    draft = layer_draft(target, 1)
    g = torch.Generator().manual_seed(5)
    pairs = [(p, target_generate(target, p, 10 + 3 * i).tokens) for i, p in enumerate(_prompts(g, 7, 3, 100))]
    pairs.insert(3, (pairs[0][0], []))
    counts = Dl.teacher_forced_counts(draft, pairs, pad_id=0, batch_size=3)
    assert len(counts) == len(pairs) and counts[3] == (0, 0)
    assert [n for _, n in counts] == [len(a) for _, a in pairs]
    alone = [Dl.teacher_forced_counts(draft, [pr], pad_id=0)[0] for pr in pairs]
    assert counts == alone
    # the target itself predicts every token of its own greedy answer
    assert all(h == n for h, n in Dl.teacher_forced_counts(target, pairs, pad_id=0))
    hits, n = sum(h for h, _ in counts), sum(m for _, m in counts)
    assert Dl.teacher_forced_alpha(draft, pairs, pad_id=0) == pytest.approx(hits / n)
