"""Tokens/s of target-only and speculative decoding on llama.cpp vs transformers, same requests.

    python benchmarks/llamacpp_vs_transformers.py --threads 1 --requests 8 --max-new 64 --k 3

Models: the packaged SmolLM2-135M-Instruct GGUF as target (llama.cpp: the file itself, Q4_1 layers,
Q8_0 head; transformers: the same file dequantised to fp32) and the untrained 2-layer layer draft
(llama.cpp: exported from the PyTorch draft to GGUF with the target's layer type; transformers:
fp32, full head and a 4,096-token head). Greedy; the prompts are real queries (GSM8K, code).
Each configuration decodes the same prompts, after one warm-up request; reported: aggregate
tokens/s (Σ tokens / Σ decode seconds, prefill excluded), the median per request, α and tokens/step.
Prints a table and, with --json, one JSON object. `greedy_identical` (spec output == target-only
output) holds on llama.cpp only for a build without llamafile's sgemm (-DGGML_LLAMAFILE=OFF, what
scripts/install.sh builds; `batch_invariant` in the JSON): with it the logits depend on the pass size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from osdsim.real import data as D
from osdsim.real import llamacpp as LC
from osdsim.real.models import SubsetHeadLM, frequent_token_ids, load_pair, smollm2_gguf_path
from osdsim.real.specdec import DecodeParams, speculative_generate, target_generate
from osdsim.real.stats import summarize


def _prompts(codec, n: int, max_tokens: int) -> list[list[int]]:
    """n chat prompts of ≤ max_tokens tokens, alternating GSM8K and code queries (file order)."""
    return D.chat_prompts(codec, n, max_tokens)


def _row(name: str, gens: list, k: int) -> dict:
    tokens = sum(len(g.tokens) for g in gens)
    decode = sum(g.total_s - g.prefill_s for g in gens)
    per_req = [len(g.tokens) / max(g.total_s - g.prefill_s, 1e-9) for g in gens]
    steps = [s for g in gens for s in g.steps]
    acc = summarize(steps, k) if any(s.proposed for s in steps) else None
    return {"config": name, "requests": len(gens), "tokens": tokens, "tokens_per_s": tokens / decode,
            "tokens_per_s_median_request": statistics.median(per_req),
            "prefill_s_median": statistics.median(g.prefill_s for g in gens),
            "alpha": acc.alpha if acc else None, "tokens_per_step": acc.tokens_per_step if acc else 1.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--draft-vocab", type=int, default=4096, help="transformers' reduced-head draft (0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pair = load_pair("smollm2", "layers:2", "float32")
    codec = pair.codec
    prompts = _prompts(codec, args.requests + 1, args.max_prompt)
    warm, prompts = prompts[0], prompts[1:]
    params = DecodeParams(k=args.k, greedy=True, max_new_tokens=args.max_new)
    eos = codec.eos_ids
    rows = []

    def run(name: str, fn) -> list:
        fn(warm)
        gens = [fn(p) for p in prompts]
        rows.append(_row(name, gens, args.k))
        return gens

    with tempfile.TemporaryDirectory(prefix="osdsim-bench-") as tmp:
        base = LC.read_base(smollm2_gguf_path())
        n_ctx = args.max_prompt + args.max_new + args.k + 16
        lc_target = LC.LlamaCppLM(base.path, n_ctx=n_ctx, threads=args.threads)
        pub = LC.DraftPublisher(Path(tmp), base, None, threads=args.threads, n_ctx=n_ctx)
        pub.publish(pair.draft)
        lc_base = run("llama.cpp target-only", lambda p: LC.target_generate_llamacpp(lc_target, p, args.max_new,
                                                                                      eos_ids=eos))
        lc_spec = run(f"llama.cpp speculative k={args.k}",
                      lambda p: LC.speculative_generate_llamacpp(lc_target, pub.lm, p, params, eos))
        same_lc = sum(a.tokens == b.tokens for a, b in zip(lc_base, lc_spec, strict=True))
        for _ in range(4):
            pub.publish(pair.draft)
        sync = LC.sync_summary(pub.records[1:])
        lc_target.close()
        pub.close()
    hf_base = run("transformers target-only",
                  lambda p: target_generate(pair.target, p, args.max_new, eos_ids=eos))
    hf_spec = run(f"transformers speculative k={args.k}",
                  lambda p: speculative_generate(pair.target, pair.draft, p, params, eos))
    same_hf = sum(a.tokens == b.tokens for a, b in zip(hf_base, hf_spec, strict=True))
    if args.draft_vocab:
        ids = frequent_token_ids(prompts, args.draft_vocab, int(pair.target.config.vocab_size), eos)
        small = SubsetHeadLM(pair.draft, ids)
        run(f"transformers speculative k={args.k}, {args.draft_vocab}-token draft head",
            lambda p: speculative_generate(pair.target, small, p, params, eos))
    by = {r["config"]: r for r in rows}
    lc_t, hf_t = by["llama.cpp target-only"]["tokens_per_s"], by["transformers target-only"]["tokens_per_s"]
    doc = {"threads": args.threads, "requests": len(prompts), "max_new_tokens": args.max_new, "k": args.k,
           "rows": rows, "llamacpp_over_transformers_target_only": lc_t / hf_t,
           "speedup_spec_llamacpp": by[f"llama.cpp speculative k={args.k}"]["tokens_per_s"] / lc_t,
           "speedup_spec_transformers": by[f"transformers speculative k={args.k}"]["tokens_per_s"] / hf_t,
           "greedy_identical": {"llama.cpp": f"{same_lc}/{len(prompts)}", "transformers": f"{same_hf}/{len(prompts)}"},
           "batch_invariant": LC.build_info()["batch_invariant"],
           "draft_export_reload": sync}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{'config':58s} {'tok/s':>8s} {'median/req':>10s} {'α':>6s} {'tok/step':>8s}")
    for r in rows:
        a = f"{r['alpha']:.3f}" if r["alpha"] is not None else "—"
        print(f"{r['config']:58s} {r['tokens_per_s']:8.1f} {r['tokens_per_s_median_request']:10.1f} {a:>6s} "
              f"{r['tokens_per_step']:8.2f}")
    print(f"llama.cpp / transformers (target-only): {doc['llamacpp_over_transformers_target_only']:.2f}x; "
          f"speculative speedup llama.cpp {doc['speedup_spec_llamacpp']:.2f}x, transformers "
          f"{doc['speedup_spec_transformers']:.2f}x; greedy identical {doc['greedy_identical']}")
    print(f"draft export + reload (n={sync['n']}): median {sync['sync_s_median'] * 1e3:.0f} ms, p90 "
          f"{sync['sync_s_p90'] * 1e3:.0f} ms (export {sync['export_s_median'] * 1e3:.0f} ms, reload "
          f"{sync['reload_s_median'] * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
