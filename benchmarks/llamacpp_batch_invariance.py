"""Batch invariance of llama.cpp's logits on the packaged SmolLM2 GGUF, and what it does to greedy
speculative decoding (issue 15: greedy spec output == the target's own greedy output).

    python benchmarks/llamacpp_batch_invariance.py --prompts 6 --json
    python benchmarks/llamacpp_batch_invariance.py --timings-only --reps 30

1. Logits: for each prompt, the target's greedy continuation (n tokens) is evaluated one token per
   pass (the reference) and in blocks of b = 2..5 tokens (as the verify pass does); reported: the
   max |Δ logit| over all positions, over the first block only (same KV cache, only the pass
   differs), and the share of positions whose argmax agrees.
2. Greedy exactness: speculative decoding (draft = the target's first 2 layers, `slice_gguf`,
   k=3) vs target-only greedy decoding, same prompts; reported: identical outputs, the first
   differing position.
3. Pass timings of the target (n_threads=1): decode (1 token), verify (k+1 = 4 tokens, all
   logits), prefill (128 tokens); medians after warm-up.

The llama.cpp build is whatever `import llama_cpp` finds (put another build first on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _codec():
    from transformers import AutoTokenizer

    from osdsim.real.models import HFChatCodec, resolve_model_dir

    return HFChatCodec(AutoTokenizer.from_pretrained(str(resolve_model_dir("smollm2"))), "smollm2")


def _prompts(codec, n: int, max_tokens: int) -> list[list[int]]:
    from osdsim.real.data import chat_prompts

    return chat_prompts(codec, n, max_tokens)


def _blocked_logits(lm, prompt: list[int], cont: list[int], b: int) -> np.ndarray:
    """Logits after each token of `cont` (fed in blocks of b after the prompt), [len(cont), V]."""
    lm.reset()
    lm.feed(prompt, all_logits=False)
    rows = [lm.feed(cont[i:i + b], all_logits=True) for i in range(0, len(cont), b)]
    return np.concatenate(rows)


def logit_invariance(lm, prompts: list[list[int]], n: int, blocks: range) -> dict:
    from osdsim.real.llamacpp import target_generate_llamacpp

    out: dict = {}
    refs = []
    for p in prompts:
        cont = target_generate_llamacpp(lm, p, n).tokens
        refs.append((p, cont, _blocked_logits(lm, p, cont, 1)))
    for b in blocks:
        worst = worst_first = 0.0
        agree = total = 0
        for p, cont, ref in refs:
            got = _blocked_logits(lm, p, cont, b)
            d = np.abs(got - ref)
            worst = max(worst, float(d.max()))
            worst_first = max(worst_first, float(d[:b].max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(cont)
        out[str(b)] = {"max_abs_diff": worst, "max_abs_diff_first_block": worst_first,
                       "argmax_agree": f"{agree}/{total}"}
    return out


def greedy_exactness(target, draft, prompts: list[list[int]], k: int, max_new: int, eos) -> dict:
    from osdsim.real.llamacpp import speculative_generate_llamacpp, target_generate_llamacpp
    from osdsim.real.specdec import DecodeParams

    params = DecodeParams(k=k, greedy=True, max_new_tokens=max_new)
    same, first_diff, alpha = 0, [], []
    for p in prompts:
        base = target_generate_llamacpp(target, p, max_new, eos_ids=eos).tokens
        gen = speculative_generate_llamacpp(target, draft, p, params, eos)
        spec = gen.tokens
        same += spec == base
        diff = next((i for i, (a, c) in enumerate(zip(base, spec, strict=False)) if a != c), None)
        if diff is None and len(base) != len(spec):
            diff = min(len(base), len(spec))
        first_diff.append(diff)
        prop = sum(s.proposed for s in gen.steps)
        alpha.append(sum(s.accepted for s in gen.steps) / prop if prop else float("nan"))
    return {"identical": f"{same}/{len(prompts)}", "first_diff_position": first_diff,
            "alpha_mean": float(np.nanmean(alpha))}


def _median_ms(fn, reps: int, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def pass_timings(lm, prompt: list[int], reps: int) -> dict:
    ctx = list(prompt)[:100]
    lm.reset()
    lm.feed(ctx, all_logits=False)
    n0 = lm.n_past

    def step(ids, all_logits):
        lm.feed(ids, all_logits=all_logits)
        lm.truncate(n0)

    long = (list(prompt) * 8)[:128]

    def prefill():
        lm.reset()
        lm.feed(long, all_logits=False)

    out = {"decode_1_ms": _median_ms(lambda: step([ctx[-1]], False), reps),
           "verify_4_ms": _median_ms(lambda: step(ctx[-4:], True), reps),
           "prefill_128_ms": _median_ms(prefill, reps)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--cont", type=int, default=20, help="continuation tokens compared per prompt")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--timings-only", action="store_true")
    ap.add_argument("--no-timings", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import llama_cpp
    import torch

    from osdsim.real import llamacpp as LC
    from osdsim.real.models import smollm2_gguf_path

    torch.set_num_threads(1)
    codec = _codec()
    prompts = _prompts(codec, args.prompts, args.max_prompt)
    src = smollm2_gguf_path()
    n_ctx = args.max_prompt + args.max_new + 2 * args.k + 256
    doc: dict = {"llama_cpp": str(Path(llama_cpp.__file__).parent), "flash_attn": args.flash_attn,
                 "prompt_tokens": [len(p) for p in prompts]}
    target = LC.LlamaCppLM(src, n_ctx=n_ctx, threads=1, flash_attn=args.flash_attn)
    with tempfile.TemporaryDirectory(prefix="osdsim-inv-") as tmp:
        try:
            if not args.timings_only:
                doc["logits_vs_one_at_a_time"] = logit_invariance(target, prompts, args.cont, range(2, 6))
                dpath = LC.slice_gguf(src, 2, Path(tmp) / "draft-l2.gguf")
                draft = LC.LlamaCppLM(dpath, n_ctx=n_ctx, threads=1, flash_attn=args.flash_attn)
                try:
                    doc["greedy_spec_vs_target"] = greedy_exactness(target, draft, prompts, args.k, args.max_new,
                                                                    codec.eos_ids)
                finally:
                    draft.close()
            if not args.no_timings:
                doc["timings_target"] = pass_timings(target, prompts[0], args.reps)
        finally:
            target.close()
    print(json.dumps(doc, indent=None if not args.json else 2))


if __name__ == "__main__":
    main()
