"""Microbenchmarks (issue 4, item 2): dense GEMM, memory bandwidth, attention, per-op overhead.

Each returns Measurement rows. Inputs are fresh random tensors (never zeros: some CPUs and GPUs
run faster on zeros). The callers hold torch; these functions receive it as an argument.
"""

from __future__ import annotations

from typing import Any

from osdsim.calibrate.measure import Measurement, Timer

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def tdtype(torch: Any, dtype: str) -> Any:
    return getattr(torch, TORCH_DTYPES[dtype])


def gemm(torch: Any, timer: Timer, device: str, dtype: str, tokens: int, k: int, n: int) -> Measurement:
    """Y[T,N] = X[T,K]·W[K,N]: 2·T·K·N FLOPs; bytes = (T·K + K·N + T·N)·b (each operand once)."""
    dt = tdtype(torch, dtype)
    w = torch.randn(k, n, device=device, dtype=dt)

    def prepare() -> Any:
        return torch.randn(tokens, k, device=device, dtype=dt)

    t = timer.time(prepare, lambda x: torch.matmul(x, w))
    return Measurement(
        kind="gemm", dtype=dtype, median_s=t.median_s, min_s=t.min_s, max_s=t.max_s, repeats=t.repeats,
        m=tokens, k=k, n=n, tokens=tokens, flops=2.0 * tokens * k * n,
        bytes=float((tokens * k + k * n + tokens * n) * BYTES[dtype]),
    )


def copy_bandwidth(torch: Any, timer: Timer, device: str, nbytes: int) -> Measurement:
    """Large device-to-device copy: bytes = read + written = 2·size."""
    n = nbytes // 4
    src = torch.rand(n, device=device, dtype=torch.float32) + 0.5
    dst = torch.empty_like(src)
    t = timer.time(lambda: None, lambda _: dst.copy_(src))
    return Measurement(
        kind="bandwidth", dtype="fp32", model="copy", median_s=t.median_s, min_s=t.min_s, max_s=t.max_s,
        repeats=t.repeats, bytes=2.0 * n * 4,
    )


def read_bandwidth(torch: Any, timer: Timer, device: str, nbytes: int) -> Measurement:
    """Large reduction (sum): bytes = size read once (how weights are read in a decode pass)."""
    n = nbytes // 4
    src = torch.rand(n, device=device, dtype=torch.float32) + 0.5
    t = timer.time(lambda: None, lambda _: src.sum())
    return Measurement(
        kind="bandwidth", dtype="fp32", model="read", median_s=t.median_s, min_s=t.min_s, max_s=t.max_s,
        repeats=t.repeats, bytes=float(n * 4),
    )


def gemv_bandwidth(torch: Any, timer: Timer, device: str, dtype: str, nbytes: int) -> Measurement:
    """A large matrix-vector product y = W·x: bytes = the matrix, read once (how a decode pass
    streams its weights, in the weights' dtype)."""
    dt = tdtype(torch, dtype)
    cols = 4096
    rows = max(nbytes // (cols * BYTES[dtype]), 1)
    w = torch.randn(rows, cols, device=device, dtype=dt)

    def prepare() -> Any:
        return torch.randn(cols, device=device, dtype=dt)

    t = timer.time(prepare, lambda x: torch.mv(w, x))
    return Measurement(
        kind="bandwidth", dtype=dtype, model="gemv", median_s=t.median_s, min_s=t.min_s, max_s=t.max_s,
        repeats=t.repeats, m=1, k=cols, n=rows, flops=2.0 * rows * cols, bytes=float(rows * cols * BYTES[dtype]),
    )


def attention(
    torch: Any, timer: Timer, device: str, dtype: str, batch: int, heads: int, kv_heads: int, head_dim: int,
    queries: int, context: int,
) -> Measurement:
    """Scaled-dot-product attention of `queries` new tokens over `context` cached + themselves.

    FLOPs = 4·B·H·hd·q·(c + q/2) (QKᵀ and AV over the causal span, as the cost model's pair term);
    bytes = K and V read: 2·B·H_kv·(c+q)·hd·b.
    """
    dt = tdtype(torch, dtype)
    total = context + queries
    k = torch.randn(batch, heads, total, head_dim, device=device, dtype=dt)
    v = torch.randn(batch, heads, total, head_dim, device=device, dtype=dt)
    causal = queries > 1 and context == 0
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def prepare() -> Any:
        return torch.randn(batch, heads, queries, head_dim, device=device, dtype=dt)

    t = timer.time(prepare, lambda qt: sdpa(qt, k, v, is_causal=causal))
    pairs = batch * queries * (context + queries / 2.0)
    return Measurement(
        kind="attention", dtype=dtype, median_s=t.median_s, min_s=t.min_s, max_s=t.max_s, repeats=t.repeats,
        batch=batch, context=context, q=queries, m=heads, k=kv_heads, n=head_dim, attention_pairs=pairs,
        flops=4.0 * heads * head_dim * pairs, bytes=float(2 * batch * kv_heads * total * head_dim * BYTES[dtype]),
    )


def launch_overhead(torch: Any, timer: Timer, device: str, chain: int = 200) -> Measurement:
    """A chain of `chain` tiny dependent ops (x = x + 1 on 16 floats): seconds per op in median_s."""
    x0 = torch.rand(16, device=device) + 0.5

    def run(x: Any) -> Any:
        for _ in range(chain):
            x = x + 1.0
        return x

    t = timer.time(lambda: x0, run)
    return Measurement(
        kind="launch", dtype="fp32", median_s=t.median_s / chain, min_s=t.min_s / chain, max_s=t.max_s / chain,
        repeats=t.repeats, n=chain,
    )
