"""Throughput of the real batched server (not a timed test): the same requests served at batch 1
and at batch B, with and without speculation (k = 0 is target-only batched decoding).

All requests are queued at t = 0 (a closed batch: the server is never idle), so tokens/s is the
server's capacity at that batch cap. One warm-up request per configuration, then `--repeats` runs;
the median is reported.

    python benchmarks/real_serve_throughput.py --threads 1 --requests 16 --batch 8 --k 3
    python benchmarks/real_serve_throughput.py --backend llamacpp   # the packaged SmolLM2 GGUF (Q4_1)

`--backend llamacpp` serves the packaged SmolLM2 GGUF as target and the 2-layer draft exported to
GGUF (full head: llama.cpp's output tensor covers the vocabulary) on `LlamaCppEngine`.

Prints a table: batch cap, k, tokens, seconds, tokens/s, mean batch, α, and the speedups.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from osdsim.real import data as D
from osdsim.real.models import SubsetHeadLM, frequent_token_ids, load_pair, serving_copy
from osdsim.real.serve import BatchServer, RequestRecord, Sequence, ServeModels, ServeParams
from osdsim.specdec import alpha_from_counts


def serve_closed_batch(models: ServeModels, prompts: list[list[int]], k: int, max_batch: int,
                       max_new: int, chunk: int, engine: Any = None) -> dict[str, float]:
    params = ServeParams(k, True, 1.0, max_new, "none", 0, max_batch, 1 << 20, chunk)
    server = BatchServer(models, params, torch.Generator().manual_seed(0), engine)
    waiting = [Sequence(RequestRecord(j, 0, "p", "d", str(j), 0.0), list(p), list(p)) for j, p in enumerate(prompts)]
    seqs = list(waiting)
    t0 = time.perf_counter()
    batches = []
    while any(not s.done for s in seqs):
        while waiting and server.can_admit(len(waiting[0].prompt)):
            server.admit(waiting.pop(0))
        it, _, _ = server.step(time.perf_counter, len(waiting))
        if it.batch_size:
            batches.append(it.batch_size)
    wall = time.perf_counter() - t0
    tokens = sum(len(s.tokens) for s in seqs)
    acc = sum(st.accepted for s in seqs for st in s.steps if st.proposed)
    rej = sum(st.accepted < st.proposed for s in seqs for st in s.steps if st.proposed)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "mean_batch": statistics.mean(batches), "alpha": alpha_from_counts(acc, rej) if k else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--domain", default="spider")
    ap.add_argument("--draft-vocab", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--backend", choices=("transformers", "llamacpp"), default="transformers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pair = load_pair("smollm2", "layers:2", "float32")
    codec = pair.codec
    target, draft = serving_copy(pair.target, args.dtype), serving_copy(pair.draft, args.dtype)
    queries = [q for q in D.load_domain(args.domain) if len(codec.chat_prompt(q.text, q.system)) <= 256]
    prompts = [codec.chat_prompt(q.text, q.system) for q in queries[: args.requests + 1]]
    proposer, engine = draft, None
    if args.backend == "llamacpp":
        from osdsim.real.engines import LlamaCppEngine

        args.draft_vocab, args.dtype = 0, "gguf"
        engine = LlamaCppEngine("smollm2", pair.target, pair.draft, Path(tempfile.mkdtemp(prefix="osdsim-bench-")),
                                args.threads, args.batch, 256 + args.max_new + args.k + 16)
    elif args.draft_vocab:
        ids = frequent_token_ids([codec.chat_prompt(q.text, q.system) for q in queries[:200]],
                                 args.draft_vocab, int(draft.config.vocab_size), codec.eos_ids)
        proposer = SubsetHeadLM(draft, ids)
    models = ServeModels(target, proposer, codec.pad_id, tuple(codec.eos_ids), torch.device("cpu"))
    rows = []
    for batch in (1, args.batch):
        for k in (0, args.k):
            serve_closed_batch(models, prompts[:1], k, batch, args.max_new, args.chunk, engine)  # warm-up
            runs = [serve_closed_batch(models, prompts[1:], k, batch, args.max_new, args.chunk, engine)
                    for _ in range(args.repeats)]
            best = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
            rows.append((batch, k, best))
    base = {b: r["tokens_per_s"] for b, k, r in rows if k == 0}
    print(f"{'llama.cpp' if engine is not None else 'transformers'}: SmolLM2-135M target, 2-layer draft ({args.draft_vocab or 'full'} head), {args.dtype} serving, "
          f"{args.threads} thread(s), {args.requests} {args.domain} requests x ≤{args.max_new} tokens, all queued at t=0")
    print(f"{'batch cap':>9} {'k':>2} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'mean B':>7} {'alpha':>6} "
          f"{'vs k=0':>7} {'vs batch 1':>10}")
    one = {k: r["tokens_per_s"] for b, k, r in rows if b == 1}
    for b, k, r in rows:
        print(f"{b:>9} {k:>2} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tokens_per_s']:>7.2f} "
              f"{r['mean_batch']:>7.2f} {r['alpha']:>6.3f} {r['tokens_per_s'] / base[b]:>6.2f}x "
              f"{r['tokens_per_s'] / one[k]:>9.2f}x")


if __name__ == "__main__":
    main()
