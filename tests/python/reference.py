"""Independent float64 NumPy references for the 23 ops, written from the model math, not the kernels.

Every function takes and returns float64 arrays (ids as int64) shaped logically; callers convert
the f32 device buffers. Quantized matrices are decoded here from raw bytes (packed u32 words,
scales and biases), so the weight file format is checked too.
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------
# Element types and MLX affine quantization


def decode_floats(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Decode little-endian bytes (uint8 array) of `dtype` ("f32" | "bf16" | "f16") to float64."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if dtype in ("f32", "float32"):
        return raw.view("<f4").astype(np.float64)
    if dtype in ("f16", "float16"):
        return raw.view("<f2").astype(np.float64)
    if dtype in ("bf16", "bfloat16"):
        # bf16 is the high half of an f32.
        hi = raw.view("<u2").astype(np.uint32) << np.uint32(16)
        return hi.view("<f4").astype(np.float64)
    raise ValueError(f"unknown float dtype {dtype!r}")


def dtype_size(dtype: str) -> int:
    return {"f32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "f16": 2, "float16": 2}[dtype]


def unpack_words(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Unpack `[rows, cols*bits/32]` u32 words into `[rows, cols]` integer codes: element j of a
    word sits in bits `[j*bits, (j+1)*bits)`, least significant first."""
    if bits not in (2, 3, 4, 5, 6, 8) or 32 % bits:
        raise ValueError(f"unsupported bits {bits}")
    per = 32 // bits
    words = np.asarray(words, dtype=np.uint64)
    rows = words.shape[0]
    assert words.shape[1] * per == cols, (words.shape, cols, bits)
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))[None, None, :]
    mask = np.uint64((1 << bits) - 1)
    codes = (words[:, :, None] >> shifts) & mask
    return codes.reshape(rows, cols).astype(np.int64)


def dequant(words, scales, biases, rows: int, cols: int, group_size: int, bits: int) -> np.ndarray:
    """`w[r, c] = scales[r, c // g] * q[r, c] + biases[r, c // g]` in float64."""
    q = unpack_words(np.asarray(words).reshape(rows, cols * bits // 32), bits, cols)
    s = np.asarray(scales, dtype=np.float64).reshape(rows, cols // group_size)
    b = np.asarray(biases, dtype=np.float64).reshape(rows, cols // group_size)
    return s.repeat(group_size, axis=1) * q + b.repeat(group_size, axis=1)


def dequant_bytes(
    blob: np.ndarray,
    w_off: int,
    s_off: int,
    b_off: int,
    bits: int,
    group_size: int,
    scale_dtype: str,
    rows: int,
    cols: int,
) -> np.ndarray:
    """Dequantize a `[rows, cols]` matrix whose parts sit at byte offsets of `blob` (uint8)."""
    blob = np.asarray(blob, dtype=np.uint8)
    nw = rows * cols * bits // 8
    ns = rows * (cols // group_size) * dtype_size(scale_dtype)
    words = blob[w_off : w_off + nw].copy().view("<u4")
    assert words.size * 4 == nw, "packed words run past the blob"
    scales = decode_floats(blob[s_off : s_off + ns], scale_dtype)
    biases = decode_floats(blob[b_off : b_off + ns], scale_dtype)
    assert scales.size * dtype_size(scale_dtype) == ns and biases.size == scales.size
    return dequant(words, scales, biases, rows, cols, group_size, bits)


def expert_layout(hidden: int, inter: int, bits: int, group_size: int, scale_dtype: str) -> dict:
    """Byte offsets of the nine parts of an expert block `[gate.w|gate.s|gate.b|up.w|up.s|up.b|
    down.w|down.s|down.b]` (gate/up `[inter, hidden]`, down `[hidden, inter]`), packed without
    padding. Returns {"gate": (w, s, b), "up": ..., "down": ..., "block_bytes": n}."""
    ss = dtype_size(scale_dtype)
    out = {}
    at = 0
    for name, rows, cols in (("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)):
        w = at
        at += rows * cols * bits // 8
        s = at
        at += rows * (cols // group_size) * ss
        b = at
        at += rows * (cols // group_size) * ss
        out[name] = (w, s, b)
    out["block_bytes"] = at
    return out


def expert_weights(
    blob: np.ndarray, base: int, hidden: int, inter: int, bits: int, group_size: int, scale_dtype: str
) -> tuple:
    """Dequantized (gate [I,H], up [I,H], down [H,I]) of the expert block at byte `base`."""
    lay = expert_layout(hidden, inter, bits, group_size, scale_dtype)
    mats = []
    for name, rows, cols in (("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)):
        w, s, b = lay[name]
        mats.append(
            dequant_bytes(blob, base + w, base + s, base + b, bits, group_size, scale_dtype, rows, cols)
        )
    return tuple(mats)


# ---------------------------------------------------------------------------------------------
# Scalar helpers


def sigmoid(x):
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def silu(x):
    x = np.asarray(x, dtype=np.float64)
    return x * sigmoid(x)


def softplus(x):
    return np.logaddexp(0.0, np.asarray(x, dtype=np.float64))


def softmax(x, axis=-1):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _f64(x):
    return np.array(x, dtype=np.float64, copy=True)


# ---------------------------------------------------------------------------------------------
# The 23 ops


def rms_norm(x, w, eps):
    """RmsNormBf16NTokens: x [T, D], w [D]."""
    x = _f64(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, dtype=np.float64)


def rms_norm_qk(x, num_k_heads, key_dim, key_offset, per_token_total):
    """RmsNormQkNTokens: x [T, per_token_total]; returns the whole updated slot array."""
    x = _f64(x).reshape(-1, per_token_total)
    n = num_k_heads * key_dim

    def l2(v):
        return v / np.sqrt(np.sum(v * v, axis=-1, keepdims=True) + 1e-6)

    q = x[:, :n].reshape(-1, num_k_heads, key_dim)
    k = x[:, key_offset : key_offset + n].reshape(-1, num_k_heads, key_dim)
    x[:, :n] = (l2(q) / np.sqrt(key_dim)).reshape(-1, n)
    x[:, key_offset : key_offset + n] = l2(k).reshape(-1, n)
    return x


def rms_norm_per_head(x, w, num_heads, head_dim, eps):
    """RmsNormPerHeadNTokens: x [T, H*hd]."""
    x = _f64(x).reshape(-1, num_heads, head_dim)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, dtype=np.float64)
    return y.reshape(-1, num_heads * head_dim)


def rope(x, inv_freq, num_heads, head_dim, rotary_dim, start_pos, f32_angle=False):
    """RopeNTokens (NeoX half split): x [T, H*hd]; channels >= rotary_dim pass through. The angle
    is `pos * inv_freq` exactly, or with `f32_angle` rounded as the float32 product (what
    transformers computes)."""
    x = _f64(x).reshape(-1, num_heads, head_dim)
    t = x.shape[0]
    half = rotary_dim // 2
    freq = np.asarray(inv_freq)[:half]
    if f32_angle:
        pos32 = np.float32(start_pos) + np.arange(t, dtype=np.float32)
        ang = (pos32[:, None] * freq.astype(np.float32)[None, :]).astype(np.float64)[:, None, :]
    else:
        pos = (start_pos + np.arange(t, dtype=np.float64))[:, None, None]
        ang = pos * freq.astype(np.float64)[None, None, :]
    c, s = np.cos(ang), np.sin(ang)
    a = x[:, :, :half].copy()
    b = x[:, :, half:rotary_dim].copy()
    x[:, :, :half] = a * c - b * s
    x[:, :, half:rotary_dim] = b * c + a * s
    return x.reshape(t, num_heads * head_dim)


def split_q_gate(q_proj, num_heads, head_dim):
    """SplitQGate: q_proj [T, H, 2*hd] -> (q [T, H*hd], gate [T, H*hd])."""
    x = _f64(q_proj).reshape(-1, num_heads, 2 * head_dim)
    t = x.shape[0]
    return x[:, :, :head_dim].reshape(t, -1), x[:, :, head_dim:].reshape(t, -1)


def residual_add(a, b):
    return _f64(a) + _f64(b)


def zero_buffer(raw: np.ndarray, n_bytes: int) -> np.ndarray:
    """ZeroBuffer on a uint8 image of the buffer."""
    out = np.array(raw, dtype=np.uint8, copy=True)
    out[:n_bytes] = 0
    return out


def matvec(w, x):
    """MatvecNTokens: y[t] = W x[t] with W [out, in] (already dequantized), x [T, in]."""
    return _f64(x) @ np.asarray(w, dtype=np.float64).T


def swiglu(gate, up):
    return silu(gate) * _f64(up)


def sdpa_causal(q, k_cache, v_cache, num_heads, heads_per_kv, head_dim, kv_start, scale):
    """SdpaCausalTiled: q [T, H*hd]; caches [rows, kv_dim]; token t sees rows [0, kv_start + t]."""
    q = _f64(q).reshape(-1, num_heads, head_dim)
    kc = _f64(k_cache)
    vc = _f64(v_cache)
    t_n = q.shape[0]
    out = np.zeros_like(q)
    for t in range(t_n):
        n = kv_start + t + 1
        for h in range(num_heads):
            g = h // heads_per_kv
            keys = kc[:n, g * head_dim : (g + 1) * head_dim]
            vals = vc[:n, g * head_dim : (g + 1) * head_dim]
            p = softmax(keys @ q[t, h] * scale)
            out[t, h] = p @ vals
    return out.reshape(t_n, num_heads * head_dim)


def sigmoid_gate(x, gate):
    return _f64(x) * sigmoid(gate)


def kv_append(k_cache, v_cache, k_src, v_src, kv_start):
    """KvCacheAppendNTokens on [rows, kv_dim] caches; returns new (k_cache, v_cache)."""
    kc, vc = _f64(k_cache), _f64(v_cache)
    t = np.asarray(k_src).shape[0]
    kc[kv_start : kv_start + t] = k_src
    vc[kv_start : kv_start + t] = v_src
    return kc, vc


def softmax_topk(logits, k):
    """MoeSoftmaxTopK: (indices [T, k] int64, weights [T, k]) ordered by descending probability,
    ties to the lower expert index."""
    p = softmax(logits, axis=-1)
    t_n, e = p.shape
    idx = np.zeros((t_n, k), dtype=np.int64)
    w = np.zeros((t_n, k))
    for t in range(t_n):
        order = sorted(range(e), key=lambda i: (-p[t, i], i))[:k]
        idx[t] = order
        w[t] = p[t, order]
    return idx, w


def normalize_weights(w):
    """MoeNormalizeWeights: rows with a positive sum are divided by it, others left alone."""
    w = _f64(w)
    s = w.sum(axis=-1)
    pos = s > 0
    w[pos] = w[pos] / s[pos][:, None]
    return w


def expert_mlp(x, gate, up, down):
    """SwiGLU expert on rows x [n, H]: down(silu(gate x) * up x); also returns (g, u, act)."""
    x = _f64(x)
    g = x @ gate.T
    u = x @ up.T
    act = silu(g) * u
    return act @ down.T, g, u, act


def moe_batched(x, experts_by_slot: dict, expert_slots, buckets, token_idx, weights):
    """MoeBatchedPermuteFuse: returns (out_sum [T, H], gate, up, act, out rows per assignment)."""
    x = _f64(x)
    t_n, h = x.shape
    out = np.zeros((t_n, h))
    total = buckets[-1]
    rows = {"gate": [None] * total, "up": [None] * total, "act": [None] * total, "out": [None] * total}
    for b, slot in enumerate(expert_slots):
        gate, up, down = experts_by_slot[slot]
        for j in range(buckets[b], buckets[b + 1]):
            tok = token_idx[j]
            y, g, u, a = expert_mlp(x[tok : tok + 1], gate, up, down)
            rows["gate"][j], rows["up"][j], rows["act"][j], rows["out"][j] = g[0], u[0], a[0], y[0]
            out[tok] += weights[j] * y[0]
    stacked = {name: (np.stack(v) if total else np.zeros((0, 0))) for name, v in rows.items()}
    return out, stacked


def moe_gather(x, experts: list, indices, weights):
    """MoeGatherIdFuse: out[t] = sum_j weights[t, j] * expert_{indices[t, j]}(x[t]); also the
    per-expert counts."""
    x = _f64(x)
    t_n, h = x.shape
    out = np.zeros((t_n, h))
    counts = np.zeros(len(experts), dtype=np.int64)
    for t in range(t_n):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            counts[e] += 1
            y = expert_mlp(x[t : t + 1], *experts[e])[0]
            out[t] += weights[t, j] * y[0]
    return out, counts


def moe_combine(h_mid, moe_sum, shared_out, shared_gate):
    """MoeCombineResidualNTokens: shared_gate [T] (one scalar per token)."""
    g = sigmoid(np.asarray(shared_gate, dtype=np.float64).reshape(-1))[:, None]
    return _f64(h_mid) + _f64(moe_sum) + g * _f64(shared_out)


def conv1d_step(x, state, w):
    """Conv1dStepNTokens: x [T, C], state [3, C] (oldest first), w [C, 4] with tap 3 on the
    current token. Returns (out [T, C] after SiLU, new state [3, C])."""
    x = _f64(x)
    hist = np.concatenate([_f64(state), x], axis=0)  # [3 + T, C]
    w = np.asarray(w, dtype=np.float64)
    t_n = x.shape[0]
    out = np.zeros_like(x)
    for t in range(t_n):
        win = hist[t : t + 4]  # rows t..t+3, the last is token t
        out[t] = silu(np.sum(win.T * w, axis=1))
    return out, hist[-3:].copy()


def decay_beta(alpha, beta, a_log, dt_bias):
    """ComputeDecayBetaNTokens: alpha/beta [T, nv]; returns (g_decay, beta_gate)."""
    a_log = np.asarray(a_log, dtype=np.float64)[None, :]
    dt_bias = np.asarray(dt_bias, dtype=np.float64)[None, :]
    g = np.exp(-np.exp(a_log) * softplus(_f64(alpha) + dt_bias))
    return g, sigmoid(beta)


def gated_delta_net(state, conv_out, g_decay, beta, num_v_heads, value_dim, k_heads_per_v, key_dim):
    """GatedDeltaNet recurrence token by token. state [nv, dk, dv]; conv_out rows q|k|v with
    nk = nv / k_heads_per_v key heads; value head h uses key head h // k_heads_per_v.
    Per token: S *= g; kv = k^T S; delta = beta (v - kv); S += k (outer) delta; o = q^T S.
    Returns (output [T, nv*dv], new state)."""
    nv, dv, dk = num_v_heads, value_dim, key_dim
    nk = nv // k_heads_per_v
    s = _f64(state).reshape(nv, dk, dv)
    x = _f64(conv_out).reshape(-1, 2 * nk * dk + nv * dv)
    g = _f64(g_decay).reshape(-1, nv)
    bt = _f64(beta).reshape(-1, nv)
    t_n = x.shape[0]
    out = np.zeros((t_n, nv, dv))
    for t in range(t_n):
        q = x[t, : nk * dk].reshape(nk, dk)
        k = x[t, nk * dk : 2 * nk * dk].reshape(nk, dk)
        v = x[t, 2 * nk * dk :].reshape(nv, dv)
        for h in range(nv):
            kh = h // k_heads_per_v
            s[h] *= g[t, h]
            kv = k[kh] @ s[h]
            delta = bt[t, h] * (v[h] - kv)
            s[h] += np.outer(k[kh], delta)
            out[t, h] = q[kh] @ s[h]
    return out.reshape(t_n, nv * dv), s


def gated_rms_norm(values, z, w, num_v_heads, value_dim, eps):
    """GatedRmsNormNTokens: rmsnorm(v) * w * silu(z) per (token, value head)."""
    v = _f64(values).reshape(-1, num_v_heads, value_dim)
    zz = _f64(z).reshape(-1, num_v_heads, value_dim)
    y = v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * np.asarray(w, dtype=np.float64) * silu(zz)
    return y.reshape(v.shape[0], -1)


def embed_gather(table, ids):
    """EmbedGatherNTokens: rows ids[t] of the dequantized table [vocab, H]."""
    return np.asarray(table, dtype=np.float64)[np.asarray(ids, dtype=np.int64)]


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (ref must be non-zero)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    assert denom > 0, "reference is all zeros"
    return float(np.linalg.norm(out - ref) / denom)


def quantize_mlx(w, group_size: int, bits: int):
    """MLX affine quantization of a float32 `[rows, cols]` matrix, computed in float32 as the
    format description states (used to build expert blocks and to self-test `dequant`). Returns
    (words u32 [rows, cols*bits/32], scales f32, biases f32)."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    g = w.reshape(rows, cols // group_size, group_size)
    n_bins = np.float32((1 << bits) - 1)
    mn = g.min(axis=-1)
    mx = g.max(axis=-1)
    mask = np.abs(mn) > np.abs(mx)
    s = np.maximum((mx - mn) / n_bins, np.float32(1e-7)).astype(np.float32)
    s = np.where(mask, s, -s).astype(np.float32)
    edge = np.where(mask, mn, mx).astype(np.float32)
    q0 = np.rint(edge / s).astype(np.float32)
    nz = q0 != 0
    s = np.where(nz, edge / np.where(nz, q0, np.float32(1)), s).astype(np.float32)
    bias = np.where(nz, edge, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint((g - bias[..., None]) / s[..., None]), 0, n_bins).astype(np.uint64)
    q = q.reshape(rows, cols // (32 // bits), 32 // bits)
    shifts = np.arange(32 // bits, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(q << shifts[None, None, :], axis=-1).astype(np.uint32)
    return words, s, bias
