"""Real speculative decoding on tiny random Llama models: exactness (greedy) and distribution
preservation (sampling, chi-square), cache rollback, and acceptance statistics."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from scipy.stats import chisquare  # noqa: E402

from osdsim.real.models import layer_draft, tiny_llama  # noqa: E402
from osdsim.real.specdec import (  # noqa: E402
    DecodeParams,
    StepRecord,
    speculative_generate,
    target_generate,
    verify_greedy,
    verify_sampling,
)
from osdsim.real.stats import summarize  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def pair():
    target = tiny_llama(seed=0, num_layers=4)
    return target, layer_draft(target, 1)


def _reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding without any KV cache: a full forward over the whole sequence per token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
    return seq[len(prompt):]


def _chi2_p(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit; categories with small expected counts are pooled."""
    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    return float(chisquare(obs, exp).pvalue)


# --- the verifier as a pure function ------------------------------------------------------------


def test_verify_greedy_prefix_and_correction():
    p_argmax = torch.tensor([5, 6, 7, 8])
    assert verify_greedy(p_argmax, torch.tensor([5, 6, 1])) == (2, 7)
    assert verify_greedy(p_argmax, torch.tensor([9, 6, 7])) == (0, 5)
    assert verify_greedy(p_argmax, torch.tensor([5, 6, 7])) == (3, 8)  # bonus token
    assert verify_greedy(p_argmax[:1], torch.tensor([], dtype=torch.long)) == (0, 5)


def test_verify_sampling_identical_models_accept_everything():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), -1)
    x = torch.tensor([1, 2, 3])
    for _ in range(50):
        n, _t = verify_sampling(p, p[:3], x, g)
        assert n == 3


def test_verify_sampling_preserves_target_distribution():
    """Leviathan Alg. 1: with x_i ~ q_i, the first two emitted tokens are distributed as p_1, p_2."""
    g = torch.Generator().manual_seed(1)
    V, gamma, draws = 6, 3, 12000
    p = torch.softmax(1.5 * torch.randn(gamma + 1, V, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(1.5 * torch.randn(gamma, V, generator=g, dtype=torch.float64), -1)
    first = np.zeros(V)
    second = np.zeros(V)
    for _ in range(draws):
        x = torch.stack([torch.multinomial(q[i], 1, generator=g)[0] for i in range(gamma)])
        n, t = verify_sampling(p, q, x, g)
        emitted = x[:n].tolist() + [t]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    assert _chi2_p(first, p[0].numpy()) > 1e-3
    assert _chi2_p(second, p[1].numpy()) > 1e-3
    # and the test has power: the draft's own distribution is rejected
    assert _chi2_p(first, q[0].numpy()) < 1e-6


# --- greedy speculative decoding == greedy decoding of the target (fp32) -------------------------


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_greedy_speculative_equals_target_greedy(pair, k):
    target, draft = pair
    g = torch.Generator().manual_seed(10 + k)
    for i in range(4):
        prompt = torch.randint(3, 500, (5 + 3 * i,), generator=g).tolist()
        ref = _reference_greedy(target, prompt, 30)
        spec = speculative_generate(target, draft, prompt, DecodeParams(k=k, max_new_tokens=30))
        plain = target_generate(target, prompt, 30)
        assert spec.tokens == ref
        assert plain.tokens == ref
        assert sum(s.emitted for s in spec.steps) == 30
        assert all(0 <= s.accepted <= s.proposed <= k for s in spec.steps)


def test_greedy_speculative_with_a_perfect_draft_accepts_all(pair):
    target, _ = pair
    prompt = [5, 9, 33, 2, 100]
    gen = speculative_generate(target, target, prompt, DecodeParams(k=3, max_new_tokens=17))
    assert gen.tokens == _reference_greedy(target, prompt, 17)
    assert [s.accepted for s in gen.steps] == [3, 3, 3, 3, 0]  # last step: 1 token left, nothing drafted
    assert [s.emitted for s in gen.steps] == [4, 4, 4, 4, 1]


def test_eos_stops_generation(pair):
    target, draft = pair
    prompt = [7, 8, 9]
    ref = _reference_greedy(target, prompt, 20)
    eos = ref[6]
    first = ref.index(eos)
    gen = speculative_generate(target, draft, prompt, DecodeParams(k=4, max_new_tokens=20), (eos,))
    assert gen.tokens == ref[: first + 1] and gen.hit_eos


def test_teacher_positions_reuse_verify_logits(pair):
    target, draft = pair
    prompt = [11, 12, 13, 14]
    params = DecodeParams(k=3, max_new_tokens=12, positions="all", teacher_topk=0)
    gen = speculative_generate(target, draft, prompt, params)
    ids = torch.tensor([prompt + gen.tokens])
    with torch.no_grad():
        full = torch.log_softmax(target(input_ids=ids, use_cache=False).logits[0], -1)
    rec = gen.teacher
    assert rec is not None and rec.index is None
    assert rec.positions.tolist() == list(range(len(prompt) - 1, len(prompt) - 1 + 12))
    torch.testing.assert_close(rec.logprobs, full[rec.positions], atol=1e-4, rtol=1e-4)
    # OSD positions: one per step (the target-supplied correction or bonus token), top-K kept
    params = DecodeParams(k=3, max_new_tokens=12, positions="target", teacher_topk=8)
    gen2 = speculative_generate(target, draft, prompt, params)
    assert gen2.teacher is not None and len(gen2.teacher.positions) == len(gen2.steps)
    assert gen2.teacher.logprobs.shape == (len(gen2.steps), 8)
    ends = np.cumsum([s.emitted for s in gen2.steps]) - 1 + len(prompt) - 1
    assert gen2.teacher.positions.tolist() == ends.tolist()
    top = full[gen2.teacher.positions].topk(8, dim=-1)
    torch.testing.assert_close(gen2.teacher.logprobs, top.values, atol=1e-4, rtol=1e-4)


# --- sampling speculative decoding reproduces the target's next-token distribution ----------------


def test_sampling_speculative_matches_target_distribution(pair):
    target, draft = pair
    prompt = [1, 40, 41, 42]
    temperature = 0.5
    with torch.no_grad():
        logits = target(input_ids=torch.tensor([prompt]), use_cache=False).logits[0, -1].double()
        dlogits = draft(input_ids=torch.tensor([prompt]), use_cache=False).logits[0, -1].double()
    p = torch.softmax(logits / temperature, -1).numpy()
    q = torch.softmax(dlogits / temperature, -1).numpy()
    g = torch.Generator().manual_seed(3)
    params = DecodeParams(k=3, greedy=False, temperature=temperature, max_new_tokens=2)
    counts = np.zeros(p.shape[0])
    for _ in range(1500):
        gen = speculative_generate(target, draft, prompt, params, generator=g)
        counts[gen.tokens[0]] += 1
    assert _chi2_p(counts, p) > 1e-3
    assert _chi2_p(counts, q) < 1e-6  # the draft's distribution differs detectably


# --- statistics -----------------------------------------------------------------------------------


def test_summary_definitions():
    steps = [
        StepRecord(4, 4, 5, 0, 0, 3.0, 4),
        StepRecord(4, 1, 2, 0, 0, 1.0, 2),
        StepRecord(4, 0, 1, 0, 0, 0.5, 1),
        StepRecord(2, 1, 2, 0, 0, 1.0, 2),  # truncated at the cap: counts for α, not histogram
        StepRecord(0, 0, 1, 0, 0, 0.0, 0),  # nothing drafted: ignored for α
    ]
    s = summarize(steps, 4)
    assert s.accepted == 6 and s.rejections == 3
    assert s.alpha == pytest.approx(6 / 9)
    assert s.alpha_beta == pytest.approx(5.5 / 9)
    assert s.histogram == [1, 1, 0, 0, 1]
    assert s.mean_accepted == pytest.approx(5 / 3)
    assert s.tokens_per_step == pytest.approx(11 / 5)
