"""The batched server's model engines: what `serve.BatchServer` runs its passes on.

`BatchServer` decides (admission, chunked prefill, k draft passes, one verify pass, acceptance,
rollback); an engine only evaluates tokens and holds the KV state. Two engines:

- `TorchEngine`: transformers models, one `BatchKV` per model (holes + masks for ragged rows,
  `osdsim.real.batching`), batch-1 prefill into a sequence's own cache, merged when it joins.
- `LlamaCppEngine`: llama.cpp contexts (`osdsim.real.llamacpp.LlamaCppBatchLM`) with one KV
  sequence id (and its own stream of KV cells) per admitted request: prefill, draft and verify blocks carry their own positions,
  so ragged acceptance is `seq_rm` of the rejected positions of that sequence, with no padding.
  Publication exports the trained draft to GGUF and reloads it (`BatchDraftPublisher`).

Rows are the decoding sequences in `BatchServer.rows` order; `drop_newest(role, row, n)` removes a
row's n newest cached positions, `keep_rows` drops finished rows, `add_row` appends a sequence
whose prefill completed. Logits come back as fp32 torch tensors for the verifiers of `specdec`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from osdsim.real.batching import BatchKV, batched_forward, prefill_chunk, prefill_single
from osdsim.real.specdec import sync

TARGET, DRAFT = "target", "draft"


class TorchEngine:
    """transformers models: `BatchKV` for the decoding rows, batch-1 caches while prefilling."""

    name = "transformers"

    def __init__(self, target: Any, draft: Any, pad_id: int, device: torch.device) -> None:
        self.target, self.draft, self.pad_id, self.device = target, draft, pad_id, device
        self.kv = {TARGET: BatchKV(target.config), DRAFT: BatchKV(draft.config)}

    def prefill(self, s: Any, chunk: list[int], last: bool, with_draft: bool) -> torch.Tensor | None:
        """Prefill `chunk` into the sequence's own caches; with `last`, the target's logits [V] at its end."""
        s.tcache, first = prefill_chunk(self.target, chunk, s.tcache, last_logits=last)
        if with_draft:
            s.dcache = prefill_single(self.draft, chunk, s.dcache)
        return first

    def forward(self, role: str, blocks: list[list[int]], want: list[list[int]] | None = None) -> list[torch.Tensor]:
        """Feed row i its block after its cached tokens; logits [len(want_i) or len(block_i), V] per row."""
        model = self.target if role == TARGET else self.draft
        return batched_forward(model, self.kv[role], blocks, self.pad_id, want)

    def drop_newest(self, role: str, row: int, n: int) -> None:
        self.kv[role].drop_newest(row, n)

    def keep_rows(self, keep: list[int], with_draft: bool) -> None:
        self.kv[TARGET].keep_rows(keep)
        if with_draft:
            self.kv[DRAFT].keep_rows(keep)

    def add_row(self, s: Any, with_draft: bool) -> None:
        self.kv[TARGET].add_row(s.tcache, s.n_t, self.device)
        if with_draft:
            self.kv[DRAFT].add_row(s.dcache, s.n_d, self.device)
        s.tcache = s.dcache = None

    def release(self, s: Any) -> None:
        """A sequence that finished before joining the rows (its first token ended it)."""
        s.tcache = s.dcache = None

    def compact(self) -> None:
        self.kv[TARGET].maybe_compact()
        self.kv[DRAFT].maybe_compact()

    def widths(self, with_draft: bool) -> tuple[int, int]:
        """Padded KV widths of the target and draft batches (the attention the padded pass runs)."""
        return self.kv[TARGET].width, (self.kv[DRAFT].width if with_draft else 0)

    def sync(self) -> None:
        sync(self.device)

    def publish(self, draft: Any) -> dict[str, float] | None:
        """New draft weights reach the serving copy in `serve_real` (nothing to reload here)."""
        return None

    def served_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The trainable weights as this engine serves them (PyTorch: the master's, as they are)."""
        return state

    def served_model(self, model: Any) -> Any:
        return model

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name}

    def close(self) -> None:
        pass


class LlamaCppEngine:
    """llama.cpp contexts with one KV sequence per admitted request (ids 0..max_batch_size-1)."""

    name = "llama.cpp"

    def __init__(self, target_spec: str, target_model: Any, draft_model: Any, workdir: Path, threads: int,
                 n_seq: int, n_ctx_seq: int, draft_type: str = "auto") -> None:
        from osdsim.errors import InputError
        from osdsim.real import llamacpp as LC

        LC.require_llama_cpp()
        exported_type = "f32" if draft_type == "auto" else draft_type
        path = LC.target_gguf_for(target_spec, target_model, workdir, exported_type)
        self.base = LC.read_base(path)
        if self.base.vocab != int(target_model.config.vocab_size):
            raise InputError(f"{path.name}: GGUF vocabulary ({self.base.vocab}) differs from the PyTorch "
                             f"target's ({int(target_model.config.vocab_size)})")
        self.target = LC.LlamaCppBatchLM(path, n_seq, n_ctx_seq, threads)
        self.publisher = LC.BatchDraftPublisher(workdir, self.base, LC.served_draft_type(draft_type, self.base.layer_type),
                                                n_seq, n_ctx_seq, threads)
        self.initial_sync = self.publisher.publish(draft_model)
        self.publisher.records.clear()  # the initial export is not a distillation update
        self.free = list(range(n_seq - 1, -1, -1))  # KV sequence ids not in use (pop from the end)
        self.slot: dict[int, int] = {}  # id(Sequence) -> its KV sequence id
        self.pos = {TARGET: [0] * n_seq, DRAFT: [0] * n_seq}  # cached positions per sequence id
        self.rows: list[int] = []  # sequence ids of the decoding rows, in row order
        self.n_ctx_seq = n_ctx_seq
        self._version = str(getattr(LC.require_llama_cpp(), "__version__", "?"))
        self._LC = LC

    def _lm(self, role: str) -> Any:
        if role == TARGET:
            return self.target
        assert self.publisher.lm is not None
        return self.publisher.lm

    def _slot_of(self, s: Any) -> int:
        key = id(s)
        if key not in self.slot:
            if not self.free:
                raise RuntimeError("llama.cpp engine: more sequences admitted than KV sequence ids")
            self.slot[key] = self.free.pop()
        return self.slot[key]

    def _feed(self, role: str, sid: int, tokens: list[int], want: list[int]) -> torch.Tensor:
        blk = self._LC.Block(sid, self.pos[role][sid], tokens, want)
        out = self._lm(role).decode([blk])[0]
        self.pos[role][sid] += len(tokens)
        return torch.from_numpy(out)

    def prefill(self, s: Any, chunk: list[int], last: bool, with_draft: bool) -> torch.Tensor | None:
        sid = self._slot_of(s)
        logits = self._feed(TARGET, sid, chunk, [len(chunk) - 1] if last else [])
        if with_draft:
            self._feed(DRAFT, sid, chunk, [])
        return logits[0] if last else None

    def forward(self, role: str, blocks: list[list[int]], want: list[list[int]] | None = None) -> list[torch.Tensor]:
        LC, pos = self._LC, self.pos[role]
        lm_blocks = []
        for i, blk in enumerate(blocks):
            sid = self.rows[i]
            w = want[i] if want is not None else list(range(len(blk)))
            lm_blocks.append(LC.Block(sid, pos[sid], blk, w))
        nonempty = [b for b in lm_blocks if b.tokens]
        outs = iter(self._lm(role).decode(nonempty)) if nonempty else iter(())
        result = []
        for b in lm_blocks:
            if b.tokens:
                pos[b.seq_id] += len(b.tokens)
                result.append(torch.from_numpy(next(outs)))
            else:
                result.append(torch.zeros(0, 0))
        return result

    def drop_newest(self, role: str, row: int, n: int) -> None:
        if n <= 0:
            return
        sid = self.rows[row]
        self.pos[role][sid] -= n
        self._lm(role).seq_rm(sid, self.pos[role][sid])

    def _free(self, sid: int, with_draft: bool) -> None:
        self.target.seq_rm(sid, 0)
        if with_draft:
            self._lm(DRAFT).seq_rm(sid, 0)
        self.pos[TARGET][sid] = self.pos[DRAFT][sid] = 0
        self.free.append(sid)
        for key, v in list(self.slot.items()):
            if v == sid:
                del self.slot[key]

    def keep_rows(self, keep: list[int], with_draft: bool) -> None:
        kept = set(keep)
        for i, sid in enumerate(self.rows):
            if i not in kept:
                self._free(sid, with_draft)
        self.rows = [self.rows[i] for i in keep]

    def add_row(self, s: Any, with_draft: bool) -> None:
        sid = self.slot[id(s)]
        assert self.pos[TARGET][sid] == s.n_t and (not with_draft or self.pos[DRAFT][sid] == s.n_d)
        self.rows.append(sid)

    def release(self, s: Any) -> None:
        sid = self.slot.get(id(s))
        if sid is not None:
            self._free(sid, True)

    def compact(self) -> None:
        pass  # a sequence's freed cells are reused by the next request given its id

    def widths(self, with_draft: bool) -> tuple[int, int]:
        """Longest cached sequence per model (llama.cpp attends each row over its own cells; no padding)."""
        t = max((self.pos[TARGET][sid] for sid in self.rows), default=0)
        d = max((self.pos[DRAFT][sid] for sid in self.rows), default=0) if with_draft else 0
        return t, d

    def sync(self) -> None:
        pass  # llama_decode returns when its pass is done

    def publish(self, draft: Any) -> dict[str, float]:
        rec = self.publisher.publish(draft)
        return {"export_s": rec.export_s, "reload_s": rec.reload_s, "sync_s": rec.total_s}

    def served_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The trainable weights as llama.cpp serves them: matrices through the export's GGUF type
        (quantised and back), norms as exported (f32). The held-out α is then the served draft's."""
        return self._LC.served_weights(state, self.publisher.layer_type or self.base.layer_type)

    def served_model(self, model: Any) -> Any:
        """A copy of the draft with its trainable matrices as served (llamacpp.served_model)."""
        return self._LC.served_model(model, self.publisher.layer_type or self.base.layer_type)

    def describe(self) -> dict[str, Any]:
        LC = self._LC
        return {"engine": self.name, "llama_cpp_python": self._version,
                "batch_invariant": LC.build_info()["batch_invariant"], "target_gguf": str(self.base.path),
                "target_layer_type": self.base.layer_type, "head_type": self.base.head_type,
                "draft_layer_type": self.publisher.layer_type or self.base.layer_type,
                "draft_gguf_bytes": self.initial_sync.bytes, "initial_export_s": self.initial_sync.export_s,
                "initial_reload_s": self.initial_sync.reload_s, "kv_cells_per_sequence": self.target.n_ctx_seq}

    def close(self) -> None:
        self.target.close()
        self.publisher.close()
