"""A real OSD run: serve a shifting query stream with speculative decoding, distil the draft online,
measure α, timings and the speedup over target-only decoding on the same prompts.

Closed loop at batch 1 (as the OSD prototype): each request starts when the previous one (and any
training update it triggered, `inline`) is done, so arrival = start. Training runs inline.
Baseline: for `baseline.requests_per_phase` evenly spaced requests of each phase, the same prompt is
also decoded target-only right after it is served (interleaved, so both see the same machine load);
greedy fp32 speculative decoding emits the same tokens, so time per token compares like for like.

Outputs (written atomically to out_dir): requests.csv, steps.csv, updates.csv, alpha.csv,
summary.json.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osdsim.errors import atomic_write_text, json_safe
from osdsim.real.config import RealConfig
from osdsim.specdec import bootstrap_ratio_ci


@dataclass
class RealRunResult:
    summary: dict[str, Any]
    requests: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    updates: list[dict[str, Any]]
    alpha: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)


Progress = Callable[[int, int, dict[str, Any]], None]


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def write_outputs(result: RealRunResult, out_dir: Path) -> list[Path]:
    files = []
    for name, rows in (("requests.csv", result.requests), ("steps.csv", result.steps),
                       ("updates.csv", result.updates), ("alpha.csv", result.alpha)):
        atomic_write_text(out_dir / name, _csv_text(rows))
        files.append(out_dir / name)
    atomic_write_text(out_dir / "summary.json", json.dumps(json_safe(result.summary), indent=2) + "\n")
    files.append(out_dir / "summary.json")
    return files


def _phases(cfg: RealConfig) -> list[Any]:
    from osdsim.real.data import Phase, sharp_phases, smooth_phases

    s = cfg.stream
    if s.phases is not None:
        return [Phase(p.start, p.end, dict(p.mix), dict(p.mix_end) if p.mix_end else None, p.name)
                for p in s.phases]
    if s.shape == "sharp":
        return sharp_phases(s.domains, s.requests_per_phase)
    return smooth_phases(s.domains, s.requests_per_phase)


# A query whose text is longer than this many characters per allowed prompt token is skipped
# before tokenising (no tokenizer packs more than ~8 characters into one token).
PROMPT_CHARS_PER_TOKEN_MAX = 8


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _sync_summary(sync_s: list[float], records: list[Any]) -> dict[str, Any]:
    """Publication of each update to the server (the simulator's sync_delay_s): median and p90;
    on llama.cpp split into GGUF export and reload."""
    import statistics

    from osdsim.real.llamacpp import p90, sync_summary

    if records:
        return sync_summary(records)
    return {"n": len(sync_s), "sync_s_median": statistics.median(sync_s) if sync_s else float("nan"),
            "sync_s_p90": p90(sync_s)}


def device_fingerprint_of(device: Any, threads: int) -> dict[str, Any]:
    """What a recorded run was measured on (CPU model/family, GPU name, torch threads): the
    validator's fingerprint, so `--reuse-runs` can tell another device's runs apart."""
    from osdsim.validate.fingerprint import device_fingerprint

    return device_fingerprint(str(device), threads)


def native_bf16(device: Any) -> bool:
    """Whether `device` computes bf16 matmuls natively (else torch converts them to fp32 per call)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return bool(torch.cuda.is_bf16_supported())
    from osdsim.calibrate.devices import cpu_native_bf16

    return cpu_native_bf16()


def resolve_serve_dtype(name: str, device: Any) -> str:
    """A config's serve dtype, with 'auto' decided by the device (see ModelsCfg.serve_dtype)."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"


def resolve_device(torch: Any, name: str) -> Any:
    """torch.device for a config's `device`; a missing GPU is a one-line input error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name} requested but torch sees no CUDA device (use cpu or auto)")
    return torch.device(name)


@dataclass
class Prepared:
    """The stages both modes share: models loaded and placed, data split, serving copies, held-out
    answers, and the held-out α evaluator (rows collected in `alpha_rows`)."""

    cfg: RealConfig
    torch: Any
    pair: Any
    codec: Any
    target: Any
    draft: Any  # the trained (master) draft
    device: Any
    phases: list[Any]
    domains: list[str]
    splits: dict[str, Any]
    stream: Any
    s_target: Any
    s_draft: Any  # serving copy of the draft (maybe the master itself)
    s_draft_call: Any  # what proposes: s_draft or a reduced-head view of it
    vocab_ids: Any
    draft_vocab_size: int
    serve_dtype: str
    heldout: dict[str, Any]
    ids_of: Callable[[Any], list[int]]
    short: Callable[[Any], bool]
    answers_for: Callable[[str, list[Any]], list[Any]]
    load_s: float
    heldout_s: float
    generator: Any
    alpha_rows: list[dict[str, Any]] = field(default_factory=list)

    def sync_serving(self) -> None:
        """Publish the master draft's trainable weights to the serving draft."""
        from osdsim.real.models import SubsetHeadLM, sync_trainable

        if self.s_draft is not self.draft:
            sync_trainable(self.draft, self.s_draft)
        if isinstance(self.s_draft_call, SubsetHeadLM):
            self.s_draft_call.refresh()

    def eval_heldout(self, label: str, request_index: int, update: int, model: Any,
                     time_s: float | None = None) -> dict[str, float]:
        from osdsim.real import distill as Dl

        vals = {}
        for d in self.domains:
            counts = Dl.teacher_forced_counts(model, self.heldout[d], self.codec.pad_id, vocab_ids=self.vocab_ids)
            vals[d] = a = Dl.pooled_hit_rate(counts)
            # 95% interval over the held-out prompts (resampled): how far another held-out set of
            # as many prompts could land; the α-at-end rows of the load report show it.
            ci = bootstrap_ratio_ci([h for h, _ in counts], [m for _, m in counts])
            row: dict[str, Any] = {"label": label, "request_index": request_index}
            if time_s is not None:
                row["time_s"] = round(time_s, 6)
            row.update(update=update, domain=d, alpha_heldout=round(a, 5),
                       alpha_heldout_lo="" if ci is None else round(ci[0], 5),
                       alpha_heldout_hi="" if ci is None else round(ci[1], 5))
            self.alpha_rows.append(row)
        return vals


def prepare(cfg: RealConfig, separate_serving_draft: bool = False) -> Prepared:
    """Load models, split data, build serving copies and held-out answers (the shared stages)."""
    import torch

    from osdsim.real import data as D
    from osdsim.real import distill as Dl
    from osdsim.real.models import (
        SubsetHeadLM,
        cache_root,
        frequent_token_ids,
        load_pair,
        serving_copy,
    )

    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    pair = load_pair(cfg.models.target, cfg.models.draft, cfg.models.dtype, cfg.models.tiny_seed)
    device = resolve_device(torch, cfg.device)
    codec, target, draft = pair.codec, pair.target.to(device), pair.draft.to(device)
    load_s = time.perf_counter() - t0

    # --- data: splits per domain, filtered on prompt length ------------------------------------
    phases = _phases(cfg)
    domains = sorted({d for ph in phases for d in (set(ph.mix) | set(ph.mix_end or {}))})
    prompt_ids: dict[str, list[int]] = {}

    def ids_of(q: Any) -> list[int]:
        if q.uid not in prompt_ids:
            prompt_ids[q.uid] = codec.chat_prompt(q.text, q.system)
        return prompt_ids[q.uid]

    def short(q: Any) -> bool:
        return (len(q.text) <= PROMPT_CHARS_PER_TOKEN_MAX * cfg.stream.max_prompt_tokens
                and len(ids_of(q)) <= cfg.stream.max_prompt_tokens)

    splits = {d: D.split_domain(D.load_domain(d), cfg.stream.heldout_per_domain, cfg.seed, short)
              for d in domains}
    stream = D.ShiftStream(phases, splits, cfg.seed)

    # --- serving models: optional low-precision copies and a reduced-vocabulary draft head -------
    serve_dtype = resolve_serve_dtype(cfg.models.serve_dtype or cfg.models.dtype, device)
    s_target = serving_copy(target, serve_dtype) if serve_dtype != cfg.models.dtype else target
    s_draft = (serving_copy(draft, serve_dtype)
               if serve_dtype != cfg.models.dtype or separate_serving_draft else draft)
    s_draft_call: Any = s_draft
    vocab_ids = None
    draft_vocab_size = int(draft.config.vocab_size)
    if cfg.models.draft_vocab:
        counted = [ids_of(q) for d in domains for q in splits[d].train]
        vocab_ids = frequent_token_ids(counted, cfg.models.draft_vocab, draft_vocab_size, codec.eos_ids)
        s_draft_call = SubsetHeadLM(s_draft, vocab_ids)
        draft_vocab_size = int(vocab_ids.numel())

    # --- held-out answers (cached per model, domain, prompt set) --------------------------------
    dc = cfg.decode
    cache = Dl.AnswerCache(cache_root() / "answers")

    def answers_for(domain: str, queries: list[Any]) -> list[tuple[list[int], list[int]]]:
        prompts = [ids_of(q) for q in queries]
        key = Dl.answers_key(pair.target_id, codec.fingerprint(), domain, prompts, dc.max_new_tokens)
        meta = {"model": pair.target_id, "domain": domain, "n": len(prompts), "max_new": dc.max_new_tokens}
        ans = cache.get_or_make(
            key,
            lambda: Dl.greedy_answers_batched(target, prompts, dc.max_new_tokens, codec.eos_ids, codec.pad_id),
            meta,
        )
        return list(zip(prompts, ans, strict=True))

    t0 = time.perf_counter()
    heldout = {d: answers_for(d, splits[d].heldout) for d in domains}
    heldout_s = time.perf_counter() - t0
    return Prepared(
        cfg=cfg, torch=torch, pair=pair, codec=codec, target=target, draft=draft, device=device,
        phases=phases, domains=domains, splits=splits, stream=stream, s_target=s_target,
        s_draft=s_draft, s_draft_call=s_draft_call, vocab_ids=vocab_ids,
        draft_vocab_size=draft_vocab_size, serve_dtype=serve_dtype, heldout=heldout, ids_of=ids_of,
        short=short, answers_for=answers_for, load_s=load_s, heldout_s=heldout_s, generator=gen,
    )


def run_real(cfg: RealConfig, out_dir: Path | None = None, progress: Progress | None = None) -> RealRunResult:
    """Run the configured OSD stream for real; write outputs to out_dir (if given).
    A config with a `serve` section runs the batched server (`osdsim.real.serve.serve_real`)."""
    if cfg.serve is not None:
        from osdsim.real.serve import serve_real

        return serve_real(cfg, out_dir, progress)
    from osdsim.real import data as D
    from osdsim.real import distill as Dl
    from osdsim.real.models import model_spec
    from osdsim.real.specdec import DecodeParams, speculative_generate, target_generate
    from osdsim.real.stats import summarize

    t_run = time.perf_counter()
    if cfg.models.backend == "llamacpp":  # fail before minutes of loading: a non-Llama GGUF, no llama.cpp
        from osdsim.real import llamacpp as LC

        if cfg.models.target.endswith(".gguf"):
            LC.read_base(Path(cfg.models.target).expanduser())
        LC.require_llama_cpp()
    prep = prepare(cfg)
    torch, pair, codec, target, draft, device = (prep.torch, prep.pair, prep.codec, prep.target,
                                                 prep.draft, prep.device)
    phases, domains, splits, stream = prep.phases, prep.domains, prep.splits, prep.stream
    s_target, s_draft_call, ids_of, short = prep.s_target, prep.s_draft_call, prep.ids_of, prep.short
    answers_for, gen, dc = prep.answers_for, prep.generator, cfg.decode
    serve_dtype, draft_vocab_size, load_s, heldout_s = (prep.serve_dtype, prep.draft_vocab_size,
                                                        prep.load_s, prep.heldout_s)
    sync_serving, eval_heldout, alpha_rows = prep.sync_serving, prep.eval_heldout, prep.alpha_rows

    # --- the serving engine: transformers (the models above) or llama.cpp (GGUF files) -----------
    server = None
    workdir = None
    if cfg.models.backend == "llamacpp":
        import shutil
        import tempfile

        from osdsim.real import llamacpp as LC

        workdir = Path(tempfile.mkdtemp(prefix="osdsim-llamacpp-"))
        n_ctx = cfg.stream.max_prompt_tokens + dc.max_new_tokens + dc.k + 16
        try:
            server = LC.LlamaCppServer(cfg.models.target, target, draft, workdir, cfg.threads, n_ctx,
                                       cfg.models.gguf_draft_type)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    def served(model: Any) -> Any:
        """The draft as it is served (llama.cpp: its matrices through the exported GGUF type)."""
        return model if server is None else LC.served_model(model, server.publisher.layer_type)

    initial = eval_heldout("initial", 0, 0, served(draft))

    def serve_spec(prompt: list[int], params: Any) -> Any:
        if server is None:
            return speculative_generate(s_target, s_draft_call, prompt, params, codec.eos_ids, gen)
        return LC.speculative_generate_llamacpp(server.target, server.draft, prompt, params, codec.eos_ids, gen)

    def serve_baseline(prompt: list[int]) -> Any:
        if server is None:
            return target_generate(s_target, prompt, dc.max_new_tokens, dc.greedy, dc.temperature,
                                   codec.eos_ids, gen)
        return LC.target_generate_llamacpp(server.target, prompt, dc.max_new_tokens, dc.greedy, dc.temperature,
                                           codec.eos_ids, gen)

    def publish() -> dict[str, float]:
        """Hand the updated draft to the server; its export + reload time is the sync delay."""
        t0 = time.perf_counter()
        if server is None:
            sync_serving()
            return {"sync_s": round(time.perf_counter() - t0, 6)}
        rec = server.publisher.publish(draft)
        return {"sync_s": round(rec.total_s, 6), "export_s": round(rec.export_s, 6),
                "reload_s": round(rec.reload_s, 6)}

    # --- optional offline-distilled baseline draft (measured on held-out α) ---------------------
    offline_summary: dict[str, Any] | None = None
    if cfg.offline.enabled:
        oc = cfg.offline
        t0 = time.perf_counter()
        off_domains = oc.domains or domains
        samples = []
        for d in off_domains:
            if d not in splits:
                splits[d] = D.split_domain(D.load_domain(d), cfg.stream.heldout_per_domain, cfg.seed, short)
            # the last train queries: the stream takes train queries from the front
            qs = splits[d].train[-oc.prompts_per_domain:]
            for p, a in answers_for(d, qs):
                if a:
                    samples.append(Dl.label_with_target(target, p, a, cfg.distill.teacher_topk, d))
        off_draft = copy.deepcopy(draft)
        first, last = Dl.offline_distill(
            off_draft, samples,
            Dl.OfflineConfig(loss=oc.loss, lr=oc.lr, epochs=oc.epochs, warmup_ratio=oc.warmup_ratio,
                             batch_size=oc.batch_size),
            codec.pad_id, gen,
        )
        off_alpha = eval_heldout("offline", 0, 0, off_draft)
        offline_summary = {"samples": len(samples), "loss_first_epoch": first, "loss_last_epoch": last,
                           "alpha_heldout": off_alpha, "seconds": time.perf_counter() - t0}
        del off_draft

    # --- the OSD stream ---------------------------------------------------------------------------
    params = DecodeParams(
        k=dc.k, greedy=dc.greedy, temperature=dc.temperature, max_new_tokens=dc.max_new_tokens,
        positions=(cfg.distill.positions if cfg.distill.enabled and cfg.distill.sample_source in
                   ("teacher", "mix_request") else "none"),
        teacher_topk=cfg.distill.teacher_topk,
    )
    distiller = None
    if cfg.distill.enabled:
        dcfg = cfg.distill
        distiller = Dl.OnlineDistiller(
            draft=draft, target=target, pad_id=codec.pad_id, generator=gen, eos_ids=codec.eos_ids,
            cfg=Dl.distill_config(dcfg),
        )

    baseline_idx: set[int] = set()
    nb = cfg.baseline.requests_per_phase
    for ph in phases:
        span = ph.end - ph.start
        if nb > 0:
            baseline_idx |= {ph.start + (j * span) // min(nb, span) for j in range(min(nb, span))}

    req_rows: list[dict[str, Any]] = []
    step_rows: list[dict[str, Any]] = []
    upd_rows: list[dict[str, Any]] = []
    steps_by_phase: dict[int, list[Any]] = {}
    clock0 = time.perf_counter()
    total = len(stream.requests)
    n_updates = 0
    try:
        for r in stream.requests:
            q = r.query
            prompt = ids_of(q)
            start = time.perf_counter() - clock0
            g = serve_spec(prompt, params)
            finish = time.perf_counter() - clock0
            s = summarize(g.steps, dc.k)
            steps_by_phase.setdefault(r.phase, []).extend(g.steps)
            for j, st in enumerate(g.steps):
                step_rows.append({"request_index": r.index, "step": j, "proposed": st.proposed,
                                  "accepted": st.accepted, "emitted": st.emitted,
                                  "draft_s": round(st.draft_s, 6), "verify_s": round(st.verify_s, 6)})
            row: dict[str, Any] = {
                "request_index": r.index, "phase": r.phase, "phase_name": phases[r.phase].label,
                "domain": q.domain, "uid": q.uid,
                "arrival_s": round(start, 6), "start_s": round(start, 6),
                "first_token_s": round(start + g.first_token_s, 6), "finish_s": round(finish, 6),
                "prompt_tokens": len(prompt), "output_tokens": len(g.tokens), "hit_eos": g.hit_eos,
                "steps": len(g.steps), "proposed": s.proposed, "accepted": s.accepted,
                "rejections": s.rejections, "alpha": round(s.alpha, 5) if s.steps else "",
                "accepted_lengths": " ".join(str(st.accepted) for st in g.steps),
                "prefill_s": round(g.prefill_s, 6),
                "draft_s": round(sum(st.draft_s for st in g.steps), 6),
                "verify_s": round(sum(st.verify_s for st in g.steps), 6),
                "decode_s": round(g.total_s - g.prefill_s, 6),
                "baseline_decode_s": "", "baseline_prefill_s": "", "baseline_tokens": "",
                "baseline_same_tokens": "", "label_s": 0.0, "train_s": 0.0, "sync_s": 0.0, "update": "",
            }
            if r.index in baseline_idx:
                b = serve_baseline(prompt)
                row.update(baseline_decode_s=round(b.total_s - b.prefill_s, 6),
                           baseline_prefill_s=round(b.prefill_s, 6), baseline_tokens=len(b.tokens),
                           baseline_same_tokens=b.tokens == g.tokens)
            if distiller is not None:
                l0 = distiller.label_s
                sample = distiller.make_sample(prompt, g, q.domain, dc.max_new_tokens)
                row["label_s"] = round(distiller.label_s - l0, 6)
                upd = distiller.request_done(sample)
                if upd is not None:
                    sync = publish()
                    n_updates = upd.update
                    row["train_s"] = round(upd.train_s, 6)
                    row["sync_s"] = sync["sync_s"]
                    row["update"] = upd.update
                    upd_rows.append({**upd.__dict__, "phase": r.phase, **sync,
                                     "time_s": round(time.perf_counter() - clock0, 6)})
                    if upd.update % cfg.eval.every_updates == 0:
                        eval_heldout("online", r.index + 1, upd.update, served(draft))
            req_rows.append(row)
            # phase boundary: evaluate held-out α at the end of each phase; checkpoint the tables
            if r.index + 1 == phases[r.phase].end:
                eval_heldout(f"end_phase_{r.phase}", r.index + 1, n_updates, served(draft))
                if out_dir is not None:
                    partial = {"name": cfg.name, "partial": True, "requests": len(req_rows)}
                    write_outputs(RealRunResult(partial, req_rows, step_rows, upd_rows, alpha_rows), out_dir)
            if progress is not None:
                progress(r.index + 1, total, {"domain": q.domain, "alpha": s.alpha, "updates": n_updates})
    except (MemoryError, KeyboardInterrupt):
        # Keep what was recorded so far (out of memory, Ctrl-C), then let the caller report it.
        if out_dir is not None:
            partial = {"name": cfg.name, "partial": True, "requests": len(req_rows), "stopped": "interrupted"}
            write_outputs(RealRunResult(partial, req_rows, step_rows, upd_rows, alpha_rows), out_dir)
        raise
    finally:
        sync_records = list(server.publisher.records) if server is not None else []
        backend_info = server.describe() if server is not None else {"engine": "transformers"}
        if server is not None:
            server.close()
        if workdir is not None:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)

    stream_s = time.perf_counter() - clock0

    # --- summary -----------------------------------------------------------------------------------
    per_phase = []
    for p_idx, ph in enumerate(phases):
        rows = [x for x in req_rows if x["phase"] == p_idx]
        acc = summarize(steps_by_phase.get(p_idx, []), dc.k)
        base = [x for x in rows if x["baseline_decode_s"] != ""]
        spec_tok_s = sum(x["output_tokens"] for x in base) / max(sum(x["decode_s"] for x in base), 1e-9)
        spec_incl = sum(x["output_tokens"] for x in rows) / max(
            sum(x["decode_s"] + x["train_s"] + x["label_s"] + x["sync_s"] for x in rows), 1e-9)
        base_tok_s = sum(x["baseline_tokens"] for x in base) / max(sum(x["baseline_decode_s"] for x in base), 1e-9)
        all_tok_s = sum(x["output_tokens"] for x in rows) / max(sum(x["decode_s"] for x in rows), 1e-9)
        start_alpha = {a["domain"]: a["alpha_heldout"] for a in alpha_rows
                       if a["label"] == (f"end_phase_{p_idx - 1}" if p_idx else "initial")}
        end_alpha = {a["domain"]: a["alpha_heldout"] for a in alpha_rows if a["label"] == f"end_phase_{p_idx}"}
        draft_pass = [st.draft_s / st.proposed for st in steps_by_phase.get(p_idx, []) if st.proposed]
        verify_pass = [st.verify_s for st in steps_by_phase.get(p_idx, []) if st.proposed == dc.k]
        per_phase.append({
            "phase": p_idx, "name": ph.label, "requests": len(rows),
            "acceptance": acc.as_dict(),
            "alpha_heldout_start": start_alpha, "alpha_heldout_end": end_alpha,
            "alpha_heldout_rise": {d: end_alpha[d] - start_alpha[d] for d in end_alpha if d in start_alpha},
            "domains": sorted(d for d in set(ph.mix) | set(ph.mix_end or {})),
            "spec_tokens_per_s_on_baseline_requests": spec_tok_s,
            "baseline_tokens_per_s": base_tok_s if base else float("nan"),
            "speedup_serving": spec_tok_s / base_tok_s if base else float("nan"),
            "spec_tokens_per_s_all": all_tok_s,
            "spec_tokens_per_s_incl_training": spec_incl,
            "speedup_incl_training": spec_incl / base_tok_s if base else float("nan"),
            "baseline_requests": len(base),
            "baseline_identical_outputs": sum(1 for x in base if x["baseline_same_tokens"] is True),
            "draft_pass_s_mean": _mean(draft_pass),
            "verify_pass_s_mean": _mean(verify_pass),
            "train_s": sum(x["train_s"] for x in rows),
            "sync_s": sum(x["sync_s"] for x in rows),
            "label_s": sum(x["label_s"] for x in rows),
        })
    base_step = [
        x["baseline_decode_s"] / x["baseline_tokens"] for x in req_rows
        if x["baseline_decode_s"] != "" and x["baseline_tokens"]
    ]
    all_draft = [st.draft_s / st.proposed for v in steps_by_phase.values() for st in v if st.proposed]
    summary = {
        "name": cfg.name,
        "config": cfg.model_dump(),
        "target": {"id": pair.target_id, **model_spec(target)},
        "draft": {"desc": pair.draft_desc, **model_spec(draft)},
        "threads": cfg.threads,
        "device_fingerprint": device_fingerprint_of(device, cfg.threads),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "serve_dtype": serve_dtype,
        "draft_vocab": draft_vocab_size,
        "torch": torch.__version__,
        "requests": len(req_rows),
        "updates": len(upd_rows),
        "alpha_heldout_initial": initial,
        "offline": offline_summary,
        "phases": per_phase,
        "overall_acceptance": summarize([st for v in steps_by_phase.values() for st in v], dc.k).as_dict(),
        "target_decode_s_per_token": _mean(base_step),
        "draft_pass_s_mean": _mean(all_draft),
        "c_measured": _mean(all_draft) / _mean(base_step) if base_step else float("nan"),
        "backend": backend_info,
        "sync": _sync_summary([u["sync_s"] for u in upd_rows], sync_records),
        "timing_s": {"load": load_s, "heldout_answers": heldout_s, "stream": stream_s,
                     "total": time.perf_counter() - t_run},
    }
    result = RealRunResult(summary, req_rows, step_rows, upd_rows, alpha_rows)
    if out_dir is not None:
        result.files = write_outputs(result, out_dir)
    return result
