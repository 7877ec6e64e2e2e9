"""Per-pass timings of the real models (not a timed test): target decode step, target verify pass
over k+1 tokens, draft pass with the full and a reduced-vocabulary head, in fp32 and bf16.

    python benchmarks/real_passes.py --threads 1 --target smollm2 --draft layers:2 --repeats 20

Prints one JSON object per (dtype, pass) with the median seconds and c = draft / target step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from osdsim.real.models import SubsetHeadLM, frequent_token_ids, load_pair, serving_copy
from osdsim.real.specdec import forward_logits, new_cache


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pass_time(model, context: list[int], feed: list[int], repeats: int) -> float:
    """Median time of one pass feeding `feed` after a cached `context` (cache rolled back)."""
    cache = new_cache(model)
    forward_logits(model, context, cache)

    def once() -> None:
        forward_logits(model, feed, cache)
        cache.crop(-len(feed))

    once()  # warm-up
    return _median_time(once, repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--draft", default="layers:2")
    ap.add_argument("--context", type=int, default=200, help="tokens already in the KV cache")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--draft-vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pair = load_pair(args.target, args.draft, "float32")
    g = torch.Generator().manual_seed(0)
    vocab = pair.target.config.vocab_size
    context = torch.randint(0, min(vocab, 4000), (args.context,), generator=g).tolist()
    subset = frequent_token_ids([context], args.draft_vocab, vocab, pair.codec.eos_ids)
    for dtype in ("float32", "bfloat16"):
        target = pair.target if dtype == "float32" else serving_copy(pair.target, dtype)
        draft = pair.draft if dtype == "float32" else serving_copy(pair.draft, dtype)
        step = _pass_time(target, context, [5], args.repeats)
        rows = [{"dtype": dtype, "pass": "target_decode", "s": step}]
        for k in args.k:
            rows.append({"dtype": dtype, "pass": f"target_verify_{k + 1}",
                         "s": _pass_time(target, context, [5] * (k + 1), args.repeats)})
        for name, model in (("draft_full_head", draft),
                            (f"draft_head_{int(subset.numel())}", SubsetHeadLM(draft, subset))):
            s = _pass_time(model, context, [5], args.repeats)
            rows.append({"dtype": dtype, "pass": name, "s": s, "c": s / step})
        for r in rows:
            print(json.dumps({**r, "threads": args.threads}))


if __name__ == "__main__":
    main()
