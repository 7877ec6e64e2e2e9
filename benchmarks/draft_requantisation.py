"""What publishing a distilled draft in a GGUF type keeps of its training: held-out α by update.

The llama.cpp backend trains the draft in PyTorch (fp32) and publishes it as GGUF. The packaged
SmolLM2 GGUF has Q4_1 layers; a Q4_1 block of 32 weights has a step of (max − min)/15, and one
distillation step moves a weight by about 1e-3 (Adam, lr 2e-3). This trains SmolLM2's 2-layer draft
online as a run does (the suite's distill settings, teacher = the PyTorch target's greedy answers and
top-k distributions) on one domain's stream prompts and prints, after each update, the held-out α
(teacher-forced on the domain's held-out prompts, osdsim.real.distill.teacher_forced_alpha) of the
fp32 draft and of the same draft with its matrices as an export in each type serves them
(osdsim.real.llamacpp.round_trip), and the median |ΔW| of the trained matrices.

    python benchmarks/draft_requantisation.py [--suite validate/cpu-llamacpp-load.yaml] [--domain code]
        [--requests 30] [--every 2]

One torch thread; about 2 minutes on a 2-core EPYC. Needs torch, transformers, gguf and the
packaged models (scripts/install.sh dev).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

TYPES = ("q4_1", "q8_0", "f16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default=str(Path(__file__).resolve().parents[1] / "validate/cpu-llamacpp-load.yaml"))
    ap.add_argument("--domain", default="code")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--every", type=int, default=2, help="report every N updates")
    args = ap.parse_args()

    import torch

    from osdsim.real import distill as Dl
    from osdsim.real.config import RealConfig
    from osdsim.real.llamacpp import served_model
    from osdsim.real.run import prepare

    fit = yaml.safe_load(Path(args.suite).read_text())["fit"]
    fit.pop("serve", None)
    cfg = RealConfig(**{**fit, "threads": 1})
    prep = prepare(cfg)
    target, draft, codec = prep.target, prep.draft, prep.codec
    queries = prep.splits[args.domain].train[: args.requests]
    prompts = [prep.ids_of(q) for q in queries]
    answers = Dl.greedy_answers_batched(target, prompts, cfg.decode.max_new_tokens, codec.eos_ids, codec.pad_id)
    samples = [Dl.label_with_target(target, p, a, cfg.distill.teacher_topk, args.domain)
               for p, a in zip(prompts, answers, strict=True)]
    distiller = Dl.OnlineDistiller(draft, target, Dl.distill_config(cfg.distill), codec.pad_id,
                                   torch.Generator().manual_seed(cfg.seed), codec.eos_ids)
    held = prep.heldout[args.domain]
    start = {n: p.detach().clone() for n, p in draft.named_parameters() if p.requires_grad and p.dim() == 2}

    print(f"held-out α ({args.domain}, {len(held)} prompts) of the trained draft, fp32 and as served in each type")
    print(f"{'update':>6} {'fp32':>7} " + " ".join(f"{t:>7}" for t in TYPES) + "  median |ΔW|")

    def row(update: int) -> None:
        vals = [Dl.teacher_forced_alpha(draft, held, codec.pad_id)]
        vals += [Dl.teacher_forced_alpha(served_model(draft, t), held, codec.pad_id) for t in TYPES]
        moved = torch.cat([(p.detach() - start[n]).abs().flatten() for n, p in draft.named_parameters() if n in start])
        print(f"{update:>6} " + " ".join(f"{v:7.3f}" for v in vals) + f"  {float(np.median(moved.numpy())):.2e}",
              flush=True)

    row(0)
    for sample in samples:
        rec = distiller.request_done(sample)
        if rec is not None and rec.update % args.every == 1 % args.every:
            row(rec.update)


if __name__ == "__main__":
    main()
