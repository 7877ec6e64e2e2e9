"""Batched KV caches with ragged lengths: what continuous batching needs from a transformers model.

A running batch of B sequences shares one `DynamicCache` of width W (keys/values [B, H, W, D] per
layer). Each row has its own valid columns; the rest are holes. Why holes instead of cropping:
after a verify pass every row has accepted its own a_i ∈ [0, γ] drafts, so the rows' committed
lengths diverge. `DynamicCache.crop` cuts every row at one column; crop-to-the-shortest plus
re-feeding ("catch-up") re-computes the lead of the faster rows each step, and the lead grows
without bound when one row keeps accepting and another keeps rejecting. Masking instead costs
nothing per step: a rejected draft's column is marked invalid, and when the holes make the cache
much wider than its longest row it is compacted once (each row's valid columns gathered to the
right). Rows leave by index selection and join left-padded to the batch's width.

Per row i, position ids are the count n_i of its valid columns (its committed prefix length), so
rotary embeddings see exactly the positions a batch-1 run would; every query attends to its row's
valid cache columns plus the row's real tokens before it in the block (a custom 4D mask). Padding
queries (a row's block shorter than the widest) attend to themselves only, which keeps every
softmax row finite; their columns are invalid from the start and never attended.

Exactness: in fp32 the logits of a row equal those of a batch-1 run up to float reassociation
(the same keys, the same positions, masked columns contribute exactly 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

# Compact when the cache is this much wider than its longest row, and at least this many columns
# are holes (a gather of every layer's keys and values costs about one pass's KV traffic).
COMPACT_WIDTH_RATIO = 1.5
COMPACT_MIN_HOLES = 64


def _layers(cache: DynamicCache) -> list[Any]:
    return list(cache.layers)


def _set_layer(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values
    layer.dtype, layer.device = keys.dtype, keys.device
    layer.is_initialized = True


@dataclass
class BatchKV:
    """One model's KV cache for a running batch: the cache, valid columns [B, W], lengths n_i."""

    model_config: Any
    cache: DynamicCache | None = None
    valid: torch.Tensor | None = None  # [B, W] bool
    lengths: list[int] = field(default_factory=list)  # valid columns per row = positions held

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return 0 if self.valid is None else int(self.valid.shape[1])

    # --- membership ---------------------------------------------------------------------------
    def add_row(self, single: DynamicCache, length: int, device: torch.device) -> None:
        """Append a sequence whose batch-1 cache `single` holds `length` tokens (all valid)."""
        row_valid = torch.ones(1, length, dtype=torch.bool, device=device)
        if self.cache is None or self.rows == 0:
            self.cache, self.valid, self.lengths = single, row_valid, [length]
            return
        w_old, w_new = self.width, max(self.width, length)
        new_layers = _layers(single)
        for layer, one in zip(_layers(self.cache), new_layers, strict=True):
            k_b, v_b = _left_pad(layer.keys, w_new), _left_pad(layer.values, w_new)
            k_1, v_1 = _left_pad(one.keys, w_new), _left_pad(one.values, w_new)
            _set_layer(layer, torch.cat([k_b, k_1], 0), torch.cat([v_b, v_1], 0))
        pad_b = torch.zeros(self.rows, w_new - w_old, dtype=torch.bool, device=device)
        pad_1 = torch.zeros(1, w_new - length, dtype=torch.bool, device=device)
        self.valid = torch.cat([torch.cat([pad_b, self.valid], 1), torch.cat([pad_1, row_valid], 1)], 0)
        self.lengths.append(length)

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order); trims leading columns no row uses."""
        if not keep:
            self.cache, self.valid, self.lengths = None, None, []
            return
        assert self.valid is not None and self.cache is not None
        idx = torch.tensor(keep, dtype=torch.long, device=self.valid.device)
        valid = self.valid.index_select(0, idx)
        used = valid.any(0).nonzero()
        first = int(used[0]) if used.numel() else valid.shape[1]
        for layer in _layers(self.cache):
            _set_layer(layer, layer.keys.index_select(0, idx)[:, :, first:].contiguous(),
                       layer.values.index_select(0, idx)[:, :, first:].contiguous())
        self.valid = valid[:, first:].contiguous()
        self.lengths = [self.lengths[i] for i in keep]

    # --- passes ------------------------------------------------------------------------------
    def block_inputs(self, blocks: list[list[int]], pad_id: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids [B, m], position_ids [B, m], 4D additive mask [B, 1, m, W+m], new_valid [B, m]."""
        b, m, w = len(blocks), max(len(x) for x in blocks), self.width
        ids = torch.full((b, m), pad_id, dtype=torch.long)
        new_valid = torch.zeros(b, m, dtype=torch.bool)
        for i, blk in enumerate(blocks):
            if blk:
                ids[i, : len(blk)] = torch.tensor(blk, dtype=torch.long)
                new_valid[i, : len(blk)] = True
        ids, new_valid = ids.to(device), new_valid.to(device)
        base = torch.tensor(self.lengths if self.lengths else [0] * b, dtype=torch.long, device=device)
        pos = base[:, None] + torch.arange(m, device=device)[None, :]  # [B, m]
        causal = torch.tril(torch.ones(m, m, dtype=torch.bool, device=device))  # [m, m]
        allowed_new = causal[None] & new_valid[:, None, :]  # real tokens at or before the query
        allowed_new = allowed_new | torch.eye(m, dtype=torch.bool, device=device)[None]  # pads: self
        if w:
            assert self.valid is not None
            allowed_old = self.valid[:, None, :].expand(b, m, w) & new_valid[:, :, None]
            allowed = torch.cat([allowed_old, allowed_new], dim=2)  # [B, m, W+m]
        else:
            allowed = allowed_new
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return ids, pos, mask[:, None], new_valid

    def commit_block(self, new_valid: torch.Tensor) -> None:
        """After a pass over a block: its real tokens become valid columns."""
        self.valid = new_valid if self.valid is None or self.width == 0 else torch.cat([self.valid, new_valid], 1)
        counts = new_valid.sum(1).tolist()
        self.lengths = [n + int(c) for n, c in zip(self.lengths or [0] * len(counts), counts, strict=True)]

    def drop_newest(self, row: int, count: int) -> None:
        """Invalidate the `count` newest valid columns of `row` (rejected drafts)."""
        if count <= 0:
            return
        assert self.valid is not None
        cols = self.valid[row].nonzero().flatten()[-count:]
        self.valid[row, cols] = False
        self.lengths[row] -= count

    def maybe_compact(self) -> bool:
        """Gather each row's valid columns to the right when holes dominate; True if it did."""
        if self.valid is None or not self.lengths:
            return False
        longest, w = max(self.lengths), self.width
        if w < COMPACT_WIDTH_RATIO * longest or w - longest < COMPACT_MIN_HOLES:
            return False
        assert self.cache is not None
        device = self.valid.device
        # index[i, j]: the cache column that lands at column j of row i (right-aligned, left pad)
        index = torch.zeros(self.rows, longest, dtype=torch.long, device=device)
        valid = torch.zeros(self.rows, longest, dtype=torch.bool, device=device)
        for i, n in enumerate(self.lengths):
            cols = self.valid[i].nonzero().flatten()
            if n:
                index[i, longest - n:] = cols
                valid[i, longest - n:] = True
        for layer in _layers(self.cache):
            k, v = layer.keys, layer.values  # [B, H, W, D]
            gidx = index[:, None, :, None].expand(k.shape[0], k.shape[1], longest, k.shape[3])
            _set_layer(layer, torch.gather(k, 2, gidx), torch.gather(v, 2, gidx))
        self.valid = valid
        return True


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, w, D] -> [B, H, width, D], zeros on the left."""
    w = x.shape[2]
    if w == width:
        return x
    pad = torch.zeros(x.shape[0], x.shape[1], width - w, x.shape[3], dtype=x.dtype, device=x.device)
    return torch.cat([pad, x], dim=2)


def base_and_head(model: Any) -> tuple[Any, Any]:
    """(decoder stack, head callable hidden -> logits) of a causal LM or a SubsetHeadLM."""
    inner = getattr(model, "base", None)
    if inner is not None and hasattr(model, "vocab_ids"):  # SubsetHeadLM: reduced head
        return inner.model, model.head
    return model.model, model.lm_head


@torch.no_grad()
def batched_forward(model: Any, kv: BatchKV, blocks: list[list[int]], pad_id: int,
                    rows_for_logits: list[list[int]] | None = None) -> list[torch.Tensor]:
    """Feed each row its block after what `kv` holds; returns per row fp32 logits [len(block_i), V]
    (or only at the block offsets `rows_for_logits[i]`). The cache grows by max(len) columns."""
    stack, head = base_and_head(model)
    device = next(stack.parameters()).device
    dtype = next(stack.parameters()).dtype
    if kv.cache is None:
        kv.cache = DynamicCache(config=model.config)
        kv.lengths = [0] * len(blocks)
    ids, pos, mask, new_valid = kv.block_inputs(blocks, pad_id, dtype, device)
    hidden = stack(input_ids=ids, attention_mask=mask, position_ids=pos, cache=kv.cache,
                   use_cache=True).last_hidden_state  # [B, m, H]
    kv.commit_block(new_valid)
    wants = [rows_for_logits[i] if rows_for_logits is not None else list(range(len(blk)))
             for i, blk in enumerate(blocks)]
    # One head GEMM over every wanted position of every row ([N, H] x [H, V]): the head's weights
    # are read once per pass, as a serving engine does and as the cost model prices it (a head
    # call per row re-read them B times and ran B GEMMs of q rows each).
    row_idx = torch.tensor([i for i, w in enumerate(wants) for _ in w], dtype=torch.long, device=device)
    col_idx = torch.tensor([j for w in wants for j in w], dtype=torch.long, device=device)
    if row_idx.numel() == 0:
        return [hidden.new_zeros(0, 0).float() for _ in blocks]
    logits = head(hidden[row_idx, col_idx]).float()  # [N, V]
    return list(torch.split(logits, [len(w) for w in wants]))


@torch.no_grad()
def prefill_single(model: Any, ids: list[int], cache: DynamicCache | None) -> DynamicCache:
    """Batch-1 prefill of `ids` after what `cache` holds (no LM head: nothing reads these logits)."""
    return prefill_chunk(model, ids, cache, last_logits=False)[0]


@torch.no_grad()
def prefill_chunk(model: Any, ids: list[int], cache: DynamicCache | None,
                  last_logits: bool) -> tuple[DynamicCache, torch.Tensor | None]:
    """Batch-1 prefill of `ids` after what `cache` holds; with last_logits, also the LM head at the
    chunk's last position only ([V] float: the next-token logits a prompt's final chunk yields)."""
    stack, head = base_and_head(model)
    device = next(stack.parameters()).device
    if cache is None:
        cache = DynamicCache(config=model.config)
    if not ids:
        return cache, None
    out = stack(input_ids=torch.tensor([ids], dtype=torch.long, device=device), cache=cache, use_cache=True)
    if not last_logits:
        return cache, None
    return cache, head(out.last_hidden_state[0, -1:]).float()[0]
