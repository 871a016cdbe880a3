"""The 23 moeflux ops as frozen dataclasses, one per Rust ``Op`` variant.

Field names, order and types mirror ``src/graph/op.rs`` exactly (``tests/python/test_schema.py``
checks them against ``moeflux._core.op_schema()``). Buffer fields take :class:`moeflux.BufId`
(the role each accepts is listed in its docstring and checked when the graph is compiled);
integer fields take ints, float fields floats, ``weight_dtype``/``scale_dtype`` one of
``"f32"``, ``"bf16"``, ``"f16"``. Every op ends with ``label``, used in errors, dumps and timings.

Example:
    >>> import numpy as np, moeflux
    >>> from moeflux import ops
    >>> be = moeflux.Backend("cpu")
    >>> x = be.alloc(16, role="act", label="x")
    >>> be.upload(x, np.arange(4, dtype=np.float32))
    >>> be.execute(moeflux.Graph([ops.ZeroBuffer(x, n_bytes=8, label="clear")]))
    >>> be.download(x)
    array([0., 0., 2., 3.], dtype=float32)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from . import _core

if TYPE_CHECKING:
    from ._core import BufId

__all__ = [
    "WeightRef",
    "ExpertLayout",
    "Op",
    "OPS",
    "RmsNormBf16NTokens",
    "RmsNormQkNTokens",
    "RmsNormPerHeadNTokens",
    "RopeNTokens",
    "SplitQGate",
    "ResidualAddNTokens",
    "ZeroBuffer",
    "MatvecNTokens",
    "SwigluFusedBatched",
    "SdpaCausalTiled",
    "SigmoidGateNTokens",
    "KvCacheAppendNTokens",
    "MoeSoftmaxTopK",
    "MoeNormalizeWeights",
    "MoeBatchedPermuteFuse",
    "MoeGatherIdFuse",
    "MoeCombineResidualNTokens",
    "Conv1dStepNTokens",
    "ComputeDecayBetaNTokens",
    "GatedDeltaNetStepNTokens",
    "GatedDeltaNetChunkwise",
    "GatedRmsNormNTokens",
    "EmbedGatherNTokens",
]


@dataclass(frozen=True)
class WeightRef:
    """An MLX-affine quantized ``[out_dim, in_dim]`` matrix in the weight file.

    Packed u32 words at ``w_off`` (``[out, in * bits / 32]``), scales at ``s_off`` and biases at
    ``b_off`` (``[out, in / group_size]`` of ``scale_dtype``). ``Backend.weight_ref(name)`` and
    ``WeightFile.weight_ref(name)`` build one from the tensors ``name.weight/.scales/.biases``.

    Args:
        w_off: byte offset of the packed words.
        s_off: byte offset of the scales.
        b_off: byte offset of the biases.
        bits: bits per code (4 or 8 for matvecs).
        group_size: columns sharing one scale and bias.
        scale_dtype: element type of scales and biases: ``"f32"``, ``"bf16"`` or ``"f16"``.

    Example:
        >>> WeightRef(0, 4096, 4352, bits=4, group_size=64)
        WeightRef(w_off=0, s_off=4096, b_off=4352, bits=4, group_size=64, scale_dtype='bf16')
    """

    w_off: int
    s_off: int
    b_off: int
    bits: int
    group_size: int
    scale_dtype: str = "bf16"


@dataclass(frozen=True)
class ExpertLayout:
    """Shape and format of one expert block.

    A block is ``[gate.w|gate.s|gate.b|up.w|up.s|up.b|down.w|down.s|down.b]`` packed without
    padding; gate and up are ``[inter_dim, hidden_dim]``, down is ``[hidden_dim, inter_dim]``, all
    quantized with the same bits, group size and scale dtype.

    Args:
        hidden_dim: model width (gate/up input, down output).
        inter_dim: expert intermediate width.
        bits: bits per code.
        group_size: columns sharing one scale and bias.
        scale_dtype: element type of scales and biases.

    Example:
        >>> o = ExpertLayout(hidden_dim=128, inter_dim=64, bits=4, group_size=64).offsets()
        >>> o["up"].w_off, o["block_bytes"]
        (4608, 13824)
    """

    hidden_dim: int
    inter_dim: int
    bits: int
    group_size: int
    scale_dtype: str = "bf16"

    def offsets(self) -> dict[str, Any]:
        """Offsets of the parts relative to the block start (computed by the Rust core).

        Returns:
            ``{"gate": WeightRef, "up": WeightRef, "down": WeightRef, "block_bytes": int}``.
        """
        return _core.expert_offsets(self)


def _as_tuple(value: Any) -> Any:
    """Lists (and other iterables of ints) become tuples so ops stay immutable and hashable;
    anything else is left for the Rust side to reject with a clear error."""
    if isinstance(value, (tuple, str, bytes)):
        return value
    try:
        return tuple(operator.index(v) for v in value)
    except TypeError:
        return value


@dataclass(frozen=True)
class RmsNormBf16NTokens:
    """`out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w` with `w[dim]` (`weight_dtype`) from the weight file.

    Args:
        x: buffer (``residual`` | ``act``), read.
        weight_off: byte offset of the weight vector in the weight file.
        out: buffer (``normed``), written.
        dim: floats per token row.
        n_tokens: number of tokens (rows).
        eps: added to the mean square before the reciprocal square root.
        weight_dtype: element type of the weight vector(s) in the file: ``"f32"``, ``"bf16"`` or ``"f16"``.
        label: name used in errors, dumps and timings.
    """

    x: BufId
    weight_off: int
    out: BufId
    dim: int
    n_tokens: int
    eps: float
    weight_dtype: str = "bf16"
    label: str = ""


@dataclass(frozen=True)
class RmsNormQkNTokens:
    """In place, per token and key head of a `q|k|v` slot of `per_token_total` floats: `q = q *
    rsqrt(sum(q^2) + 1e-6) / sqrt(key_dim)` at offset 0 and `k = k * rsqrt(sum(k^2) + 1e-6)` at
    `key_offset_per_token`.

    Args:
        x: buffer (``act``), read and written.
        num_k_heads: key heads per token.
        key_dim: dims per key head.
        key_offset_per_token: float offset of k inside a token slot.
        per_token_total: floats per token slot (q|k|v).
        n_tokens: number of tokens (rows).
        label: name used in errors, dumps and timings.
    """

    x: BufId
    num_k_heads: int
    key_dim: int
    key_offset_per_token: int
    per_token_total: int
    n_tokens: int
    label: str = ""


@dataclass(frozen=True)
class RmsNormPerHeadNTokens:
    """In place, per (token, head): RMSNorm over `head_dim` times a shared `w[head_dim]`.

    Args:
        x: buffer (``act``), read and written.
        weight_off: byte offset of the weight vector in the weight file.
        num_heads: heads per token.
        head_dim: dims per head.
        n_tokens: number of tokens (rows).
        eps: added to the mean square before the reciprocal square root.
        weight_dtype: element type of the weight vector(s) in the file: ``"f32"``, ``"bf16"`` or ``"f16"``.
        label: name used in errors, dumps and timings.
    """

    x: BufId
    weight_off: int
    num_heads: int
    head_dim: int
    n_tokens: int
    eps: float
    weight_dtype: str = "bf16"
    label: str = ""


@dataclass(frozen=True)
class RopeNTokens:
    """In place NeoX rotation of the first `rotary_dim` channels of each head at position `start_pos + t`:
    pairs `(i, i + rotary_dim/2)` rotate by `pos * inv_freq[i]`.

    Args:
        x: buffer (``act``), read and written.
        inv_freq: buffer (``inv_freq``), read.
        n_tokens: number of tokens (rows).
        num_heads: heads per token.
        head_dim: dims per head.
        rotary_dim: rotated channels per head (even, at most head_dim).
        start_pos: position of the first token.
        label: name used in errors, dumps and timings.
    """

    x: BufId
    inv_freq: BufId
    n_tokens: int
    num_heads: int
    head_dim: int
    rotary_dim: int
    start_pos: int
    label: str = ""


@dataclass(frozen=True)
class SplitQGate:
    """De-interleave per-head `[q | gate]` rows of `q_proj` `[T, H, 2*head_dim]`.

    Args:
        q_proj: buffer (``act``), read.
        q_out: buffer (``act``), written.
        gate_out: buffer (``act``), written.
        num_heads: heads per token.
        head_dim: dims per head.
        n_tokens: number of tokens (rows).
        label: name used in errors, dumps and timings.

    Example:
        >>> import numpy as np, moeflux
        >>> be = moeflux.Backend("cpu")
        >>> qp, q, g = be.alloc(16, role="act"), be.alloc(8, role="act"), be.alloc(8, role="act")
        >>> be.upload(qp, np.array([1, 2, 3, 4], np.float32))  # 1 token, 1 head, head_dim 2
        >>> be.execute([SplitQGate(qp, q, g, num_heads=1, head_dim=2, n_tokens=1)])
        >>> be.download(q), be.download(g)
        (array([1., 2.], dtype=float32), array([3., 4.], dtype=float32))
    """

    q_proj: BufId
    q_out: BufId
    gate_out: BufId
    num_heads: int
    head_dim: int
    n_tokens: int
    label: str = ""


@dataclass(frozen=True)
class ResidualAddNTokens:
    """`out = a + b` over `[n_tokens, dim]`.

    Args:
        a: buffer (``residual``), read.
        b: buffer (``act``), read.
        out: buffer (``residual``), written.
        n_tokens: number of tokens (rows).
        dim: floats per token row.
        label: name used in errors, dumps and timings.

    Example:
        >>> import numpy as np, moeflux
        >>> be = moeflux.Backend("cpu")
        >>> a, out = be.alloc(8, role="residual"), be.alloc(8, role="residual")
        >>> b = be.alloc(8, role="act")
        >>> be.upload(a, np.array([1, 2], np.float32))
        >>> be.upload(b, np.array([10, 20], np.float32))
        >>> be.execute(moeflux.Graph([ResidualAddNTokens(a, b, out, n_tokens=1, dim=2, label="add")]))
        >>> be.download(out)
        array([11., 22.], dtype=float32)
    """

    a: BufId
    b: BufId
    out: BufId
    n_tokens: int
    dim: int
    label: str = ""


@dataclass(frozen=True)
class ZeroBuffer:
    """Set the first `n_bytes` of `buf` to zero.

    Args:
        buf: buffer (any role), written.
        n_bytes: bytes to zero, from the start of the buffer.
        label: name used in errors, dumps and timings.

    Example:
        >>> import numpy as np, moeflux
        >>> be = moeflux.Backend("cpu")
        >>> ids = be.alloc(8, role="token_ids")
        >>> be.upload(ids, np.array([7, 9], np.uint32))
        >>> be.execute([ZeroBuffer(ids, n_bytes=4)])
        >>> be.download(ids, dtype=np.uint32)
        array([0, 9], dtype=uint32)
    """

    buf: BufId
    n_bytes: int
    label: str = ""


@dataclass(frozen=True)
class MatvecNTokens:
    """`y[t] = dequant(W) x[t]` for a 4- or 8-bit `[out_dim, in_dim]` matrix; rows of `x` start at byte
    `input_off`, rows of `y` at byte `output_off`.

    Args:
        weight: the quantized matrix in the weight file.
        input: buffer (``normed`` | ``act`` | ``moe_scratch``), read.
        input_off: byte offset of the first input row.
        output: buffer (``act`` | ``router_logits`` | ``logits`` | ``moe_scratch``), written.
        output_off: byte offset of the first output row.
        in_dim: columns of the matrix (input floats per token).
        out_dim: rows of the matrix (output floats per token).
        n_tokens: number of tokens (rows).
        label: name used in errors, dumps and timings.
    """

    weight: WeightRef
    input: BufId
    input_off: int
    output: BufId
    output_off: int
    in_dim: int
    out_dim: int
    n_tokens: int
    label: str = ""


@dataclass(frozen=True)
class SwigluFusedBatched:
    """`out = silu(gate) * up` over `total` elements.

    Args:
        gate: buffer (``act`` | ``moe_scratch``), read.
        up: buffer (``act`` | ``moe_scratch``), read.
        out: buffer (``act`` | ``moe_scratch``), written.
        total: number of elements.
        label: name used in errors, dumps and timings.
    """

    gate: BufId
    up: BufId
    out: BufId
    total: int
    label: str = ""


@dataclass(frozen=True)
class SdpaCausalTiled:
    """Causal attention of token t (position `kv_start + t`) over cache rows `[0, kv_start + t]`, GQA by
    `kv_head = h / heads_per_kv`; q and out are `[T, num_heads * head_dim]`.

    Args:
        q: buffer (``act``), read.
        k: buffer (``kv_cache_k``), read.
        v: buffer (``kv_cache_v``), read.
        attn_out: buffer (``act``), written.
        n_tokens: number of tokens (rows).
        num_heads: heads per token.
        heads_per_kv: query heads per key/value head (GQA group size).
        head_dim: dims per head.
        kv_dim: floats per cache row.
        kv_start: cache row (position) of the first token.
        kv_len_total: rows the k/v caches hold (at least kv_start + n_tokens).
        softmax_scale: scale applied to q.k before the softmax (usually 1/sqrt(head_dim)).
        label: name used in errors, dumps and timings.
    """

    q: BufId
    k: BufId
    v: BufId
    attn_out: BufId
    n_tokens: int
    num_heads: int
    heads_per_kv: int
    head_dim: int
    kv_dim: int
    kv_start: int
    kv_len_total: int
    softmax_scale: float
    label: str = ""


@dataclass(frozen=True)
class SigmoidGateNTokens:
    """`x *= sigmoid(gate)` in place over `[n_tokens, dim]`.

    Args:
        x: buffer (``act``), read and written.
        gate: buffer (``act``), read.
        dim: floats per token row.
        n_tokens: number of tokens (rows).
        label: name used in errors, dumps and timings.

    Example:
        >>> import numpy as np, moeflux
        >>> be = moeflux.Backend("cpu")
        >>> x, gate = be.alloc(8, role="act"), be.alloc(8, role="act")
        >>> be.upload(x, np.array([2, 4], np.float32))  # gate stays 0: sigmoid(0) = 0.5
        >>> be.execute([SigmoidGateNTokens(x, gate, dim=2, n_tokens=1)])
        >>> be.download(x)
        array([1., 2.], dtype=float32)
    """

    x: BufId
    gate: BufId
    dim: int
    n_tokens: int
    label: str = ""


@dataclass(frozen=True)
class KvCacheAppendNTokens:
    """Copy `n_tokens` rows of `kv_dim` into the caches at rows `kv_start..`.

    Args:
        k_src: buffer (``act``), read.
        v_src: buffer (``act``), read.
        k_cache: buffer (``kv_cache_k``), read and written.
        v_cache: buffer (``kv_cache_v``), read and written.
        kv_dim: floats per cache row.
        n_tokens: number of tokens (rows).
        kv_start: cache row (position) of the first token.
        label: name used in errors, dumps and timings.

    Example:
        >>> import numpy as np, moeflux
        >>> be = moeflux.Backend("cpu")
        >>> k_src, v_src = be.alloc(8, role="act"), be.alloc(8, role="act")
        >>> k_cache, v_cache = be.alloc(32, role="kv_cache_k"), be.alloc(32, role="kv_cache_v")
        >>> be.upload(k_src, np.array([5, 6], np.float32))
        >>> op = KvCacheAppendNTokens(k_src, v_src, k_cache, v_cache, kv_dim=2, n_tokens=1, kv_start=2)
        >>> be.execute([op])
        >>> be.download(k_cache, shape=(4, 2))[2]
        array([5., 6.], dtype=float32)
    """

    k_src: BufId
    v_src: BufId
    k_cache: BufId
    v_cache: BufId
    kv_dim: int
    n_tokens: int
    kv_start: int
    label: str = ""


@dataclass(frozen=True)
class MoeSoftmaxTopK:
    """Softmax over `n_experts` logits per token, then the top `k` (ties: lower index first).

    Args:
        logits: buffer (``router_logits``), read.
        indices_out: buffer (``router_idx``), written.
        weights_out: buffer (``router_weight``), written.
        n_tokens: number of tokens (rows).
        n_experts: number of experts.
        k: experts per token (top k).
        label: name used in errors, dumps and timings.
    """

    logits: BufId
    indices_out: BufId
    weights_out: BufId
    n_tokens: int
    n_experts: int
    k: int
    label: str = ""


@dataclass(frozen=True)
class MoeNormalizeWeights:
    """`w /= sum(w)` per token when the sum is positive.

    Args:
        weights: buffer (``router_weight``), read and written.
        n_tokens: number of tokens (rows).
        k: experts per token (top k).
        label: name used in errors, dumps and timings.
    """

    weights: BufId
    n_tokens: int
    k: int
    label: str = ""


@dataclass(frozen=True)
class MoeBatchedPermuteFuse:
    """Routed experts over host-built buckets. Bucket `b` holds the assignments `buckets[b]..buckets[b+1]`
    (CSR offsets, `n_buckets + 1` entries) and uses the expert block at `expert_base + expert_slots[b] *
    expert_stride`; `expert_indices` is the device copy of `expert_slots`. Assignment `j` takes row
    `bucket_token_idx[j]` of `bucket_input`, runs the SwiGLU expert (scratch rows `j` of
    `bucket_gate/up/act` `[total, inter]` and `bucket_out` `[total, hidden]`) and adds
    `bucket_weights[j] * y` to row `bucket_token_idx[j]` of `out_sum`, which is overwritten (zeroed
    first) over `[n_tokens, hidden]`.

    Args:
        expert_base: buffer (``expert_base``), read.
        expert_stride: bytes from one expert block to the next (at least the block size, a multiple of 4).
        layout: shape and quantization of one expert block.
        expert_indices: buffer (``moe_index``), read.
        expert_slots: expert block index of each bucket.
        bucket_input: buffer (``normed``), read.
        bucket_gate: buffer (``moe_scratch``), written.
        bucket_up: buffer (``moe_scratch``), written.
        bucket_act: buffer (``moe_scratch``), written.
        bucket_out: buffer (``moe_scratch``), written.
        bucket_token_idx: buffer (``moe_index``), read.
        bucket_weights: buffer (``router_weight``), read.
        out_sum: buffer (``moe_sum``), written.
        n_tokens: number of tokens (rows).
        buckets: CSR offsets of the buckets into the assignments (len(expert_slots) + 1 entries).
        label: name used in errors, dumps and timings.
    """

    expert_base: BufId
    expert_stride: int
    layout: ExpertLayout
    expert_indices: BufId
    expert_slots: tuple[int, ...]
    bucket_input: BufId
    bucket_gate: BufId
    bucket_up: BufId
    bucket_act: BufId
    bucket_out: BufId
    bucket_token_idx: BufId
    bucket_weights: BufId
    out_sum: BufId
    n_tokens: int
    buckets: tuple[int, ...]
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "expert_slots", _as_tuple(self.expert_slots))
        object.__setattr__(self, "buckets", _as_tuple(self.buckets))


@dataclass(frozen=True)
class MoeGatherIdFuse:
    """Routed experts with routing on the device: count tokens per expert into `htpe` `[n_experts]`, gather
    assignment ids sorted by expert into `hids` `[n_tokens*k]`, run the grouped gate/up (`gate_mid`,
    `up_mid` `[n_tokens*k, inter]`) and down (`down_mid` `[n_tokens*k, hidden]`) GEMMs, and combine the
    top-k into `out_sum` (overwritten). Expert `e` lives at `expert_base + e * expert_stride`.

    Args:
        expert_base: buffer (``expert_base``), read.
        expert_stride: bytes from one expert block to the next (at least the block size, a multiple of 4).
        layout: shape and quantization of one expert block.
        indices: buffer (``router_idx``), read.
        weights: buffer (``router_weight``), read.
        mlp_in: buffer (``normed``), read.
        out_sum: buffer (``moe_sum``), written.
        htpe: buffer (``moe_index``), written.
        hids: buffer (``moe_index``), written.
        gate_mid: buffer (``moe_scratch``), written.
        up_mid: buffer (``moe_scratch``), written.
        down_mid: buffer (``moe_scratch``), written.
        n_tokens: number of tokens (rows).
        n_experts: number of experts.
        k: experts per token (top k).
        label: name used in errors, dumps and timings.
    """

    expert_base: BufId
    expert_stride: int
    layout: ExpertLayout
    indices: BufId
    weights: BufId
    mlp_in: BufId
    out_sum: BufId
    htpe: BufId
    hids: BufId
    gate_mid: BufId
    up_mid: BufId
    down_mid: BufId
    n_tokens: int
    n_experts: int
    k: int
    label: str = ""


@dataclass(frozen=True)
class MoeCombineResidualNTokens:
    """`hidden_out = h_mid + moe_sum + sigmoid(shared_gate[t]) * shared_out` over `[n_tokens, dim]`.

    Args:
        h_mid: buffer (``residual``), read.
        moe_sum: buffer (``moe_sum``), read.
        shared_out: buffer (``act``), read.
        shared_gate: buffer (``act``), read.
        hidden_out: buffer (``residual``), written.
        n_tokens: number of tokens (rows).
        dim: floats per token row.
        label: name used in errors, dumps and timings.
    """

    h_mid: BufId
    moe_sum: BufId
    shared_out: BufId
    shared_gate: BufId
    hidden_out: BufId
    n_tokens: int
    dim: int
    label: str = ""


@dataclass(frozen=True)
class Conv1dStepNTokens:
    """Depthwise causal conv (kernel 4, weights `[conv_dim, 4]`, tap 3 on the current token) then SiLU;
    `conv_state` `[3, conv_dim]` holds the previous 3 inputs, oldest first, and is advanced.

    Args:
        qkv_in: buffer (``act``), read.
        conv_state: buffer (``conv_state``), read and written.
        weight_off: byte offset of the weight vector in the weight file.
        conv_out: buffer (``act``), written.
        conv_dim: channels.
        n_tokens: number of tokens (rows).
        weight_dtype: element type of the weight vector(s) in the file: ``"f32"``, ``"bf16"`` or ``"f16"``.
        label: name used in errors, dumps and timings.
    """

    qkv_in: BufId
    conv_state: BufId
    weight_off: int
    conv_out: BufId
    conv_dim: int
    n_tokens: int
    weight_dtype: str = "bf16"
    label: str = ""


@dataclass(frozen=True)
class ComputeDecayBetaNTokens:
    """`g_decay = exp(-exp(A_log) * softplus(alpha + dt_bias))`, `beta_gate = sigmoid(beta)`, over
    `[n_tokens, num_v_heads]`; `A_log` and `dt_bias` are `[num_v_heads]` (`weight_dtype`).

    Args:
        alpha_in: buffer (``act``), read.
        beta_in: buffer (``act``), read.
        a_log_off: byte offset of ``A_log[num_v_heads]`` in the weight file.
        dt_bias_off: byte offset of ``dt_bias[num_v_heads]`` in the weight file.
        g_decay_out: buffer (``act``), written.
        beta_gate_out: buffer (``act``), written.
        num_v_heads: value heads.
        n_tokens: number of tokens (rows).
        weight_dtype: element type of the weight vector(s) in the file: ``"f32"``, ``"bf16"`` or ``"f16"``.
        label: name used in errors, dumps and timings.
    """

    alpha_in: BufId
    beta_in: BufId
    a_log_off: int
    dt_bias_off: int
    g_decay_out: BufId
    beta_gate_out: BufId
    num_v_heads: int
    n_tokens: int
    weight_dtype: str = "bf16"
    label: str = ""


@dataclass(frozen=True)
class GatedDeltaNetStepNTokens:
    """The GatedDeltaNet recurrence token by token. `conv_out` rows are `q|k|v` with `num_k_heads =
    num_v_heads / k_heads_per_v` key heads of `key_dim` and `num_v_heads` value heads of `value_dim`;
    value head `h` uses key head `h / k_heads_per_v`. State `[num_v_heads, key_dim, value_dim]` f32 is
    updated in place; output `[T, num_v_heads*value_dim]`.

    Args:
        state: buffer (``delta_state``), read and written.
        conv_out: buffer (``act``), read.
        g_decay: buffer (``act``), read.
        beta_gate: buffer (``act``), read.
        output: buffer (``act``), written.
        num_v_heads: value heads.
        value_dim: dims per value head.
        k_heads_per_v: value heads per key head (num_v_heads / num_k_heads).
        key_dim: dims per key head.
        n_tokens: number of tokens (rows).
        label: name used in errors, dumps and timings.
    """

    state: BufId
    conv_out: BufId
    g_decay: BufId
    beta_gate: BufId
    output: BufId
    num_v_heads: int
    value_dim: int
    k_heads_per_v: int
    key_dim: int
    n_tokens: int
    label: str = ""


@dataclass(frozen=True)
class GatedDeltaNetChunkwise:
    """The same recurrence in chunks of `chunk_size` tokens (WY form); same result.

    Args:
        state: buffer (``delta_state``), read and written.
        conv_out: buffer (``act``), read.
        g_decay: buffer (``act``), read.
        beta_gate: buffer (``act``), read.
        output: buffer (``act``), written.
        num_v_heads: value heads.
        value_dim: dims per value head.
        k_heads_per_v: value heads per key head (num_v_heads / num_k_heads).
        key_dim: dims per key head.
        n_tokens: number of tokens (rows).
        chunk_size: tokens per chunk (1..=1024).
        label: name used in errors, dumps and timings.
    """

    state: BufId
    conv_out: BufId
    g_decay: BufId
    beta_gate: BufId
    output: BufId
    num_v_heads: int
    value_dim: int
    k_heads_per_v: int
    key_dim: int
    n_tokens: int
    chunk_size: int
    label: str = ""


@dataclass(frozen=True)
class GatedRmsNormNTokens:
    """`out = rmsnorm(v) * w * silu(z)` per (token, value head) over `value_dim`.

    Args:
        values: buffer (``act``), read.
        z: buffer (``act``), read.
        weight_off: byte offset of the weight vector in the weight file.
        output: buffer (``act``), written.
        num_v_heads: value heads.
        value_dim: dims per value head.
        n_tokens: number of tokens (rows).
        eps: added to the mean square before the reciprocal square root.
        weight_dtype: element type of the weight vector(s) in the file: ``"f32"``, ``"bf16"`` or ``"f16"``.
        label: name used in errors, dumps and timings.
    """

    values: BufId
    z: BufId
    weight_off: int
    output: BufId
    num_v_heads: int
    value_dim: int
    n_tokens: int
    eps: float
    weight_dtype: str = "bf16"
    label: str = ""


@dataclass(frozen=True)
class EmbedGatherNTokens:
    """Dequantize rows `token_ids[t]` of a quantized `[vocab, hidden_dim]` table; ids are checked against
    the vocabulary size `vocab`.

    Args:
        token_ids: buffer (``token_ids``), read.
        weight: the quantized matrix in the weight file.
        hidden_out: buffer (``residual``), written.
        hidden_dim: floats per output row.
        n_tokens: number of tokens (rows).
        vocab: rows of the table; every id must be below it.
        label: name used in errors, dumps and timings.
    """

    token_ids: BufId
    weight: WeightRef
    hidden_out: BufId
    hidden_dim: int
    n_tokens: int
    vocab: int
    label: str = ""


Op = Union[
    RmsNormBf16NTokens,
    RmsNormQkNTokens,
    RmsNormPerHeadNTokens,
    RopeNTokens,
    SplitQGate,
    ResidualAddNTokens,
    ZeroBuffer,
    MatvecNTokens,
    SwigluFusedBatched,
    SdpaCausalTiled,
    SigmoidGateNTokens,
    KvCacheAppendNTokens,
    MoeSoftmaxTopK,
    MoeNormalizeWeights,
    MoeBatchedPermuteFuse,
    MoeGatherIdFuse,
    MoeCombineResidualNTokens,
    Conv1dStepNTokens,
    ComputeDecayBetaNTokens,
    GatedDeltaNetStepNTokens,
    GatedDeltaNetChunkwise,
    GatedRmsNormNTokens,
    EmbedGatherNTokens,
]
"""Any op of the table."""

OPS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        RmsNormBf16NTokens,
        RmsNormQkNTokens,
        RmsNormPerHeadNTokens,
        RopeNTokens,
        SplitQGate,
        ResidualAddNTokens,
        ZeroBuffer,
        MatvecNTokens,
        SwigluFusedBatched,
        SdpaCausalTiled,
        SigmoidGateNTokens,
        KvCacheAppendNTokens,
        MoeSoftmaxTopK,
        MoeNormalizeWeights,
        MoeBatchedPermuteFuse,
        MoeGatherIdFuse,
        MoeCombineResidualNTokens,
        Conv1dStepNTokens,
        ComputeDecayBetaNTokens,
        GatedDeltaNetStepNTokens,
        GatedDeltaNetChunkwise,
        GatedRmsNormNTokens,
        EmbedGatherNTokens,
    )
}
"""Op classes by name, in table order."""
