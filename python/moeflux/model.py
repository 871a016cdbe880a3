"""The model runtime: a Qwen3-Next-family model as op graphs, planned once and replayed per step.

``Model.open(path)`` reads a moeflux model directory (see ``docs/model-format.md``), allocates the
persistent state (KV caches for full-attention layers, conv and delta-net states for linear layers)
and the chunk-sized scratch buffers, builds the step graph for a chunk, plans it with
``commit_plan`` and replays it: a prefill chunk or a decode token only uploads token ids, patches the
position fields of the full-attention ops, executes, and downloads logits.

Two MoE paths (env ``MOEFLUX_MOE_GATHER``, default on): ``MoeGatherIdFuse`` routes on the device inside
one graph per step; with ``MOEFLUX_MOE_GATHER=0`` each MoE layer ends a graph segment, the host reads
the router's top-k back, builds expert buckets and runs ``MoeBatchedPermuteFuse``. Two GatedDeltaNet
forms (env ``MOEFLUX_DELTA_NET=chunkwise|step``; default chunkwise for multi-token chunks and the
per-token step for decode). All choices give the same tokens.

Expert I/O (``expert_io=`` or env ``MOEFLUX_EXPERT_IO=mmap|pread|auto``, default ``auto``): ``mmap``
maps every layer's expert file and the kernels read experts in place; ``pread`` streams experts from
the files into a budgeted cache (``expert_cache_gb=`` or ``MOEFLUX_EXPERT_CACHE_GB``; a
``moeflux.ExpertStore``) and runs the bucket path with the cache slots as expert blocks. ``auto`` picks
``mmap`` when the experts plus the other weights fit in ``auto_ram_fraction`` (default 0.75, env
``MOEFLUX_EXPERT_AUTO_RAM_FRACTION``) of the machine's RAM and no smaller cache budget was asked for,
``pread`` otherwise. Buckets are ordered by top-k rank, then expert, so each token sums its experts in
the same order as ``MoeGatherIdFuse``: every path gives bitwise the same logits. In pread decode,
background reads are queued for a layer's experts of the previous token (before its graph segment
runs) and, with ``spec_prefetch`` (default on), for the next MoE layer's experts as predicted by its
router applied to the current layer's input (issued while the current layer's experts compute).
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core, ops
from ._core import Backend, MoefluxError, WeightFile
from ._graph import Graph
from .convert import ModelDir, as_model_dir

__all__ = ["Model", "ModelError", "GenerationStats"]

PathLike = Union[str, "os.PathLike[str]"]
F32 = 4
STATE_MAGIC = b"MOEFLUXS"
STATE_VERSION = 1
EXPERT_IO_MODES = ("auto", "mmap", "pread")
#: ``auto`` streams (pread) when experts + other weights exceed this fraction of RAM.
AUTO_RAM_FRACTION = 0.75
#: Default pread cache budget: this fraction of the RAM left after the non-expert weights.
DEFAULT_CACHE_RAM_FRACTION = 0.5
GB = 1e9


class ModelError(MoefluxError, ValueError):
    """A model directory that cannot be opened or a request the model cannot serve."""


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return v not in ("0", "false", "False", "no", "off")


def _env_float(name: str) -> Optional[float]:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        raise ModelError(f"{name}={v!r} is not a number") from None


def ram_bytes() -> int:
    """Physical memory of this machine in bytes (0 when unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


@dataclass
class GenerationStats:
    """Timings of the last ``generate``/``logits`` call."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class _Step:
    """The graph segments of one step of ``n`` tokens, with the position patches to apply."""

    n: int
    head: str  # "last" or "all"
    segments: List[Any] = field(default_factory=list)  # Graph or a host callable
    patches: List[Tuple[Graph, int, str, int]] = field(default_factory=list)


class _Weights:
    """Name lookups in the model's weight file: quantized matrices, row slices, float vectors."""

    def __init__(self, wf: WeightFile):
        self.wf = wf
        self.names = set(wf.names())

    def matrix(self, name: str) -> Tuple[ops.WeightRef, int, int]:
        """``(ref, rows, cols)`` of the quantized matrix ``name``."""
        if f"{name}.weight" not in self.names:
            raise ModelError(f"weight file has no quantized matrix `{name}` (expected `{name}.weight`)")
        ref = self.wf.weight_ref(name)
        rows, packed_cols = self.wf.shape(f"{name}.weight")
        cols = packed_cols * 32 // ref.bits
        return ref, rows, cols

    def rows(self, name: str, start: int, count: int) -> Tuple[ops.WeightRef, int]:
        """A row slice of a quantized matrix (exact: quantization groups run along rows)."""
        ref, rows, cols = self.matrix(name)
        if start + count > rows:
            raise ModelError(f"`{name}` has {rows} rows; rows {start}..{start + count} requested")
        ssize = 4 if ref.scale_dtype == "f32" else 2
        w_row = cols * ref.bits // 8
        s_row = cols // ref.group_size * ssize
        sliced = ops.WeightRef(
            w_off=ref.w_off + start * w_row,
            s_off=ref.s_off + start * s_row,
            b_off=ref.b_off + start * s_row,
            bits=ref.bits,
            group_size=ref.group_size,
            scale_dtype=ref.scale_dtype,
        )
        return sliced, cols

    def vector(self, name: str, length: int) -> Tuple[int, str]:
        """``(offset, dtype)`` of a float vector of ``length`` elements."""
        if name not in self.names:
            raise ModelError(f"weight file has no tensor `{name}`")
        shape = tuple(self.wf.shape(name))
        if int(np.prod(shape)) != length:
            raise ModelError(f"`{name}` has shape {shape}, expected {length} elements")
        dtype = self.wf.dtype(name)
        if dtype not in ("f32", "bf16", "f16"):
            raise ModelError(f"`{name}` has dtype {dtype}; float vectors must be f32, bf16 or f16")
        return self.wf.offset(name), dtype


def _resolve(path: PathLike) -> Path:
    if str(path) == "demo":
        from .demo import demo_model_dir

        return demo_model_dir()
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"{p}: not a directory")
    return p


class Model:
    """A model opened on a backend. Not thread-safe: one generation at a time per model.

    Expert I/O keywords (see the module docs): ``expert_io`` (``auto``/``mmap``/``pread``),
    ``expert_cache_gb`` (pread cache budget), ``auto_ram_fraction``, ``io_threads`` (background
    readers), ``cache_policy`` (``lru``/``lfu``), ``prefetch`` (previous token's experts) and
    ``spec_prefetch`` (next layer's predicted experts). pread mode always runs the bucket MoE path.

    Example:
        >>> m = Model.open("demo")                     # doctest: +SKIP
        >>> for text in m.generate("def add(a, b):", max_new_tokens=16):
        ...     print(text, end="")                   # doctest: +SKIP
    """

    def __init__(
        self,
        path: PathLike,
        backend: str = "cpu",
        *,
        chunk_size: int = 64,
        max_seq_len: Optional[int] = None,
        moe_gather: Optional[bool] = None,
        delta_net: Optional[str] = None,
        plan: bool = True,
        expert_io: Optional[str] = None,
        expert_cache_gb: Optional[float] = None,
        auto_ram_fraction: Optional[float] = None,
        io_threads: int = 8,
        cache_policy: str = "lru",
        prefetch: bool = True,
        spec_prefetch: bool = True,
    ):
        self.path = _resolve(path)
        # A moeflux directory opens as is; an MLX or Hugging Face checkpoint is re-packed once into
        # the conversion cache (MLX tensors are taken as they are, no re-quantization).
        self.dir = ModelDir.open(as_model_dir(self.path))
        self.path = self.dir.path
        self.meta = self.dir.meta
        self.config = self.dir.config
        if chunk_size < 1:
            raise ModelError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        limit = self.config.max_position_embeddings or 4096
        self.max_seq_len = int(max_seq_len or min(limit, 4096))
        self.moe_gather = _env_flag("MOEFLUX_MOE_GATHER", True) if moe_gather is None else bool(moe_gather)
        self.delta_net = (delta_net or os.environ.get("MOEFLUX_DELTA_NET") or "auto").lower()
        if self.delta_net not in ("auto", "chunkwise", "step"):
            raise ModelError(f"delta_net must be auto, chunkwise or step, got {self.delta_net!r}")

        weights = str(self.dir.weights_path)
        self.backend = Backend(backend, weights=weights)
        self.w = _Weights(WeightFile(weights))
        self._tokenizer = _load_tokenizer(self.path)
        self._experts: Dict[int, Any] = {}
        self.store: Optional[_core.ExpertStore] = None
        self.prefetch = bool(prefetch)
        self.spec_prefetch = bool(prefetch and spec_prefetch)
        self._last_experts: Dict[int, List[int]] = {}
        self._io_tokens = 0
        self._open_experts(expert_io, expert_cache_gb, auto_ram_fraction, io_threads, cache_policy)
        moe = list(self.config.moe_layers)
        # The MoE layer after each one, whose experts decode predicts from this layer's input.
        self._next_moe: Dict[int, int] = dict(zip(moe, moe[1:])) if self.store is not None else {}
        self._alloc()
        self._steps: Dict[Tuple[int, str], _Step] = {}
        self.position = 0
        self.stats = GenerationStats()
        self.plan_report = None
        if plan:
            # Plan once on the largest step; every other step has the same structure, and each
            # execute re-checks the layout.
            self.plan_report = self.backend.commit_plan(self._concat(self._step(self.chunk_size, "all")))

    @classmethod
    def open(cls, path: PathLike, backend: str = "cpu", **kwargs: Any) -> "Model":
        """Open a moeflux model directory (or ``"demo"``). Keyword arguments as for ``Model``."""
        return cls(path, backend, **kwargs)

    # ------------------------------------------------------------------ setup

    def _open_experts(self, mode: Optional[str], cache_gb: Optional[float], ram_fraction: Optional[float],
                      io_threads: int, policy: str) -> None:
        """mmap: map each MoE layer's expert file read-only and register it zero-copy. pread: open
        the files behind an ``ExpertStore`` whose slot buffer the MoE ops read."""
        self.layout = None
        self.expert_io = "none"
        self.expert_io_reason = "no MoE layers"
        self.expert_bytes = 0
        if not self.config.moe_layers:
            return
        self.layout = ops.ExpertLayout(**self.dir.expert_layout)
        self.expert_stride = self.dir.expert_stride
        files = self.dir.expert_files
        self.expert_bytes = self.expert_stride * self.config.num_experts * len(files)
        mode = (mode or os.environ.get("MOEFLUX_EXPERT_IO") or "auto").lower()
        if mode not in EXPERT_IO_MODES:
            raise ModelError(f"expert_io must be one of {', '.join(EXPERT_IO_MODES)}, got {mode!r}")
        if cache_gb is None:
            cache_gb = _env_float("MOEFLUX_EXPERT_CACHE_GB")
        if cache_gb is not None and cache_gb <= 0:
            raise ModelError(f"expert_cache_gb must be positive, got {cache_gb}")
        frac = ram_fraction if ram_fraction is not None else _env_float("MOEFLUX_EXPERT_AUTO_RAM_FRACTION")
        frac = AUTO_RAM_FRACTION if frac is None else float(frac)
        ram = ram_bytes()
        weights = self.dir.weights_path.stat().st_size
        need = self.expert_bytes + weights
        if mode == "auto":
            if cache_gb is not None and cache_gb * GB < self.expert_bytes:
                mode, why = "pread", f"a {cache_gb:g} GB expert cache was asked for"
            elif ram and need > frac * ram:
                mode, why = "pread", f"experts + weights {need / GB:.2f} GB > {frac:g} x RAM {ram / GB:.1f} GB"
            else:
                mode, why = "mmap", f"experts + weights {need / GB:.2f} GB fit in {frac:g} x RAM {ram / GB:.1f} GB"
            why = f"auto: {why}"
        else:
            why = "asked for"
        self.expert_io, self.expert_io_reason = mode, why
        if mode == "mmap":
            for i, path in files.items():
                self._experts[i] = self.backend.register_file(str(path), role="expert_base", label=f"L{i}.experts")
            return
        if cache_gb is not None:
            budget = int(cache_gb * GB)
        else:
            budget = int(DEFAULT_CACHE_RAM_FRACTION * max(ram - weights, 0)) if ram else self.expert_bytes
        slots = max(1, min(budget // self.expert_stride, self.config.num_experts * len(files)))
        self.store = _core.ExpertStore(self.backend, {i: str(p) for i, p in files.items()}, self.expert_stride,
                                 self.config.num_experts, slots, io_threads=io_threads, policy=policy,
                                 label="experts.slots")
        # Streaming needs the host to know which experts a layer uses: the bucket path.
        self.moe_gather = False

    def _expert_base(self, i: int) -> Any:
        return self.store.buffer if self.store is not None else self._experts[i]

    @property
    def expert_cache_bytes(self) -> int:
        """Bytes of the pread expert cache (0 in mmap mode)."""
        return self.store.slots * self.store.stride if self.store is not None else 0

    def expert_stats(self) -> Optional[Dict[str, Any]]:
        """Expert I/O statistics of the pread cache since open or ``reset_expert_stats`` (None in
        mmap mode): the ``ExpertStore.stats()`` counters plus ``tokens`` (run through the model),
        ``stall_ms_per_token``, ``read_mb_per_token``, ``cache_bytes``, ``expert_bytes``, ``slots``,
        ``direct_io``, ``policy`` and ``mode``."""
        if self.store is None:
            return None
        st = dict(self.store.stats())
        t = max(self._io_tokens, 1)
        st.update(
            tokens=self._io_tokens,
            stall_ms_per_token=1e3 * st["stall_s"] / t,
            read_mb_per_token=st["bytes_read"] / 1e6 / t,
            cache_bytes=self.expert_cache_bytes,
            expert_bytes=self.expert_bytes,
            slots=self.store.slots,
            direct_io=self.store.direct_io,
            mode=self.expert_io,
        )
        return st

    def reset_expert_stats(self) -> None:
        """Zero the expert I/O counters (the cache keeps its contents)."""
        if self.store is not None:
            self.store.reset_stats()
        self._io_tokens = 0

    def _alloc(self) -> None:
        cfg, be, C = self.config, self.backend, self.chunk_size
        H = cfg.hidden_size

        def buf(nbytes: int, role: str, label: str, persistent: bool = False):
            return be.alloc(max(int(nbytes), 4), role=role, label=label, persistent=persistent)

        self.token_ids = buf(C * 4, "token_ids", "token_ids", True)
        self.inv_freq = buf(max(cfg.rotary_dim // 2, 1) * F32, "inv_freq", "inv_freq", True)
        if cfg.full_attention_layers:
            be.upload(self.inv_freq, cfg.inv_freq())
        self.res = buf(C * H * F32, "residual", "residual", True)
        self.logits_all = buf(C * cfg.vocab_size * F32, "logits", "logits.all", True)
        self.logits_last = buf(cfg.vocab_size * F32, "logits", "logits.last", True)
        self.state: Dict[str, Any] = {}
        for spec in cfg.layers:
            i = spec.index
            if spec.is_full:
                kv = self.max_seq_len * cfg.kv_dim * F32
                self.state[f"L{i}.k_cache"] = buf(kv, "kv_cache_k", f"L{i}.k_cache", True)
                self.state[f"L{i}.v_cache"] = buf(kv, "kv_cache_v", f"L{i}.v_cache", True)
            else:
                self.state[f"L{i}.conv"] = buf(3 * cfg.conv_dim * F32, "conv_state", f"L{i}.conv_state", True)
                nv, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
                self.state[f"L{i}.delta"] = buf(nv * dk * dv * F32, "delta_state", f"L{i}.delta_state", True)
        # Per-layer scratch: transient, so commit_plan folds it into a few physical buffers.
        self.scratch: Dict[str, Any] = {}
        for spec in cfg.layers:
            i, s = spec.index, self.scratch

            def t(name: str, floats: int, role: str = "act", s: Dict[str, Any] = s, i: int = i) -> None:
                s[f"L{i}.{name}"] = buf(C * floats * F32, role, f"L{i}.{name}")

            t("normed", H, "normed")
            t("hmid", H, "residual")
            t("attn_out", H)
            if spec.is_linear:
                nv = cfg.linear_num_value_heads
                t("qkv", cfg.conv_dim)
                t("z", cfg.linear_value_dim)
                t("b", nv)
                t("a", nv)
                t("conv_out", cfg.conv_dim)
                t("g", nv)
                t("beta", nv)
                t("core", cfg.linear_value_dim)
                t("gated", cfg.linear_value_dim)
            else:
                t("q_proj", cfg.q_proj_dim)
                t("q", cfg.attn_dim)
                t("gate", cfg.attn_dim)
                t("k", cfg.kv_dim)
                t("v", cfg.kv_dim)
                t("attn", cfg.attn_dim)
            t("normed2", H, "normed")
            if spec.is_moe:
                E, k, inter = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
                t("router", E, "router_logits")
                t("idx", k, "router_idx")
                t("rw", k, "router_weight")
                t("moe_sum", H, "moe_sum")
                s[f"L{i}.htpe"] = buf(E * 4, "moe_index", f"L{i}.htpe")
                t("hids", k, "moe_index")
                t("gate_mid", k * inter, "moe_scratch")
                t("up_mid", k * inter, "moe_scratch")
                t("act_mid", k * inter, "moe_scratch")
                t("down_mid", k * H, "moe_scratch")
                # Buckets are (rank, expert) pairs: at most min(C, E) * k of them.
                s[f"L{i}.slots"] = buf(min(C, E) * k * 4, "moe_index", f"L{i}.slots")
                t("tok_idx", k, "moe_index")
                t("tok_w", k, "router_weight")
                if i in self._next_moe and self.spec_prefetch:
                    t("spec_router", E, "router_logits")
                    t("spec_idx", k, "router_idx")
                    t("spec_w", k, "router_weight")
                Is = cfg.shared_expert_intermediate_size
                t("sh_gate", Is)
                t("sh_up", Is)
                t("sh_act", Is)
                t("sh_out", H)
                t("sh_g", 1)
            else:
                Id = cfg.intermediate_size
                t("mlp_gate", Id)
                t("mlp_up", Id)
                t("mlp_act", Id)
                t("mlp_out", H)
        self.final_normed = buf(C * H * F32, "normed", "final.normed")

    # ------------------------------------------------------------------ graph building

    def _delta_form(self, n: int) -> str:
        if self.delta_net == "auto":
            return "chunkwise" if n > 1 else "step"
        return self.delta_net

    def _step(self, n: int, head: str) -> _Step:
        key = (n, head)
        if key not in self._steps:
            self._steps[key] = self._build(n, head)
        return self._steps[key]

    def _concat(self, step: _Step) -> Graph:
        """All graph segments of a step as one graph (what the planner sees)."""
        g = Graph()
        for seg in step.segments:
            if isinstance(seg, Graph):
                g.extend(seg.ops)
            else:
                g.extend(seg.plan_ops())
        return g

    def _build(self, n: int, head: str) -> _Step:
        cfg, w, s = self.config, self.w, self.scratch
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        step = _Step(n=n, head=head)
        g = Graph()
        emb, vocab, emb_cols = w.matrix("model.embed_tokens")
        if emb_cols != H or vocab < cfg.vocab_size:
            raise ModelError(f"model.embed_tokens is [{vocab}, {emb_cols}], expected [{cfg.vocab_size}, {H}]")
        g.add(ops.EmbedGatherNTokens(token_ids=self.token_ids, weight=emb, hidden_out=self.res,
                                     hidden_dim=H, n_tokens=n, vocab=vocab, label="embed"))

        def matvec(name: str, x: Any, y: Any, rows: Optional[Tuple[int, int]] = None, label: str = "") -> None:
            if rows is None:
                ref, out_dim, in_dim = w.matrix(name)
            else:
                ref, in_dim = w.rows(name, rows[0], rows[1])
                out_dim = rows[1]
            g.add(ops.MatvecNTokens(weight=ref, input=x, input_off=0, output=y, output_off=0,
                                    in_dim=in_dim, out_dim=out_dim, n_tokens=n, label=label or name))

        def norm(name: str, x: Any, out: Any, dim: int, label: str) -> None:
            off, dt = w.vector(name, dim)
            g.add(ops.RmsNormBf16NTokens(x=x, weight_off=off, out=out, dim=dim, n_tokens=n, eps=eps,
                                         weight_dtype=dt, label=label))

        for spec in cfg.layers:
            i = spec.index
            p = f"model.layers.{i}"
            L = lambda name, i=i: s[f"L{i}.{name}"]  # noqa: E731
            norm(f"{p}.input_layernorm.weight", self.res, L("normed"), H, f"L{i}.input_norm")
            if spec.is_linear:
                self._linear_attention(g, i, n, matvec)
            else:
                self._full_attention(g, step, i, n, matvec)
            g.add(ops.ResidualAddNTokens(a=self.res, b=L("attn_out"), out=L("hmid"), n_tokens=n, dim=H,
                                         label=f"L{i}.attn_residual"))
            norm(f"{p}.post_attention_layernorm.weight", L("hmid"), L("normed2"), H, f"L{i}.post_norm")
            if spec.is_moe:
                g = self._moe(g, step, i, n, matvec)
            else:
                m = f"{p}.mlp"
                matvec(f"{m}.gate_proj", L("normed2"), L("mlp_gate"))
                matvec(f"{m}.up_proj", L("normed2"), L("mlp_up"))
                g.add(ops.SwigluFusedBatched(gate=L("mlp_gate"), up=L("mlp_up"), out=L("mlp_act"),
                                             total=n * cfg.intermediate_size, label=f"L{i}.mlp_swiglu"))
                matvec(f"{m}.down_proj", L("mlp_act"), L("mlp_out"))
                g.add(ops.ResidualAddNTokens(a=L("hmid"), b=L("mlp_out"), out=self.res, n_tokens=n, dim=H,
                                             label=f"L{i}.mlp_residual"))
        norm("model.norm.weight", self.res, self.final_normed, H, "final_norm")
        ref, V, cols = w.matrix(self.dir.lm_head)
        if head == "all":
            g.add(ops.MatvecNTokens(weight=ref, input=self.final_normed, input_off=0, output=self.logits_all,
                                    output_off=0, in_dim=cols, out_dim=V, n_tokens=n, label="lm_head"))
        else:
            g.add(ops.MatvecNTokens(weight=ref, input=self.final_normed, input_off=(n - 1) * H * F32,
                                    output=self.logits_last, output_off=0, in_dim=cols, out_dim=V, n_tokens=1,
                                    label="lm_head"))
        step.segments.append(g)
        return step

    def _linear_attention(self, g: Graph, i: int, n: int, matvec: Callable[..., None]) -> None:
        cfg, w, s = self.config, self.w, self.scratch
        L = lambda name: s[f"L{i}.{name}"]  # noqa: E731
        p = f"model.layers.{i}.linear_attn"
        nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        conv, vdim = cfg.conv_dim, cfg.linear_value_dim
        if cfg.proj_layout == "qkvz":
            matvec(f"{p}.in_proj_qkvz", L("normed"), L("qkv"), rows=(0, conv), label=f"L{i}.in_proj_qkv")
            matvec(f"{p}.in_proj_qkvz", L("normed"), L("z"), rows=(conv, vdim), label=f"L{i}.in_proj_z")
            matvec(f"{p}.in_proj_ba", L("normed"), L("b"), rows=(0, nv), label=f"L{i}.in_proj_b")
            matvec(f"{p}.in_proj_ba", L("normed"), L("a"), rows=(nv, nv), label=f"L{i}.in_proj_a")
        else:
            matvec(f"{p}.in_proj_qkv", L("normed"), L("qkv"), label=f"L{i}.in_proj_qkv")
            matvec(f"{p}.in_proj_z", L("normed"), L("z"), label=f"L{i}.in_proj_z")
            matvec(f"{p}.in_proj_b", L("normed"), L("b"), label=f"L{i}.in_proj_b")
            matvec(f"{p}.in_proj_a", L("normed"), L("a"), label=f"L{i}.in_proj_a")
        off, dt = w.vector(f"{p}.conv1d.weight", conv * 4)
        g.add(ops.Conv1dStepNTokens(qkv_in=L("qkv"), conv_state=self.state[f"L{i}.conv"], weight_off=off,
                                    conv_out=L("conv_out"), conv_dim=conv, n_tokens=n, weight_dtype=dt,
                                    label=f"L{i}.conv1d"))
        g.add(ops.RmsNormQkNTokens(x=L("conv_out"), num_k_heads=nk, key_dim=dk, key_offset_per_token=nk * dk,
                                   per_token_total=conv, n_tokens=n, label=f"L{i}.qk_norm"))
        a_off, a_dt = w.vector(f"{p}.A_log", nv)
        d_off, d_dt = w.vector(f"{p}.dt_bias", nv)
        if a_dt != d_dt:
            raise ModelError(f"{p}: A_log ({a_dt}) and dt_bias ({d_dt}) must share a dtype")
        g.add(ops.ComputeDecayBetaNTokens(alpha_in=L("a"), beta_in=L("b"), a_log_off=a_off, dt_bias_off=d_off,
                                          g_decay_out=L("g"), beta_gate_out=L("beta"), num_v_heads=nv,
                                          n_tokens=n, weight_dtype=a_dt, label=f"L{i}.decay_beta"))
        common = dict(state=self.state[f"L{i}.delta"], conv_out=L("conv_out"), g_decay=L("g"), beta_gate=L("beta"),
                      output=L("core"), num_v_heads=nv, value_dim=dv, k_heads_per_v=nv // nk, key_dim=dk,
                      n_tokens=n, label=f"L{i}.delta_net")
        if self._delta_form(n) == "chunkwise":
            g.add(ops.GatedDeltaNetChunkwise(chunk_size=min(64, max(n, 1)), **common))
        else:
            g.add(ops.GatedDeltaNetStepNTokens(**common))
        off, dt = w.vector(f"{p}.norm.weight", dv)
        g.add(ops.GatedRmsNormNTokens(values=L("core"), z=L("z"), weight_off=off, output=L("gated"),
                                      num_v_heads=nv, value_dim=dv, n_tokens=n, eps=cfg.rms_norm_eps,
                                      weight_dtype=dt, label=f"L{i}.gated_norm"))
        matvec(f"{p}.out_proj", L("gated"), L("attn_out"), label=f"L{i}.out_proj")

    def _full_attention(self, g: Graph, step: _Step, i: int, n: int, matvec: Callable[..., None]) -> None:
        cfg, w, s = self.config, self.w, self.scratch
        L = lambda name: s[f"L{i}.{name}"]  # noqa: E731
        p = f"model.layers.{i}.self_attn"
        nh, hd, rd = cfg.num_attention_heads, cfg.head_dim, cfg.rotary_dim
        matvec(f"{p}.q_proj", L("normed"), L("q_proj"), label=f"L{i}.q_proj")
        g.add(ops.SplitQGate(q_proj=L("q_proj"), q_out=L("q"), gate_out=L("gate"), num_heads=nh, head_dim=hd,
                             n_tokens=n, label=f"L{i}.split_q_gate"))
        matvec(f"{p}.k_proj", L("normed"), L("k"), label=f"L{i}.k_proj")
        matvec(f"{p}.v_proj", L("normed"), L("v"), label=f"L{i}.v_proj")
        for which, heads in (("q", nh), ("k", cfg.num_key_value_heads)):
            off, dt = w.vector(f"{p}.{which}_norm.weight", hd)
            g.add(ops.RmsNormPerHeadNTokens(x=L(which), weight_off=off, num_heads=heads, head_dim=hd, n_tokens=n,
                                            eps=cfg.rms_norm_eps, weight_dtype=dt, label=f"L{i}.{which}_norm"))
        for which, heads in (("q", nh), ("k", cfg.num_key_value_heads)):
            step.patches.append((g, len(g), "start_pos", 0))
            g.add(ops.RopeNTokens(x=L(which), inv_freq=self.inv_freq, n_tokens=n, num_heads=heads, head_dim=hd,
                                  rotary_dim=rd, start_pos=0, label=f"L{i}.rope_{which}"))
        step.patches.append((g, len(g), "kv_start", 0))
        g.add(ops.KvCacheAppendNTokens(k_src=L("k"), v_src=L("v"), k_cache=self.state[f"L{i}.k_cache"],
                                       v_cache=self.state[f"L{i}.v_cache"], kv_dim=cfg.kv_dim, n_tokens=n,
                                       kv_start=0, label=f"L{i}.kv_append"))
        step.patches.append((g, len(g), "kv_start", 0))
        step.patches.append((g, len(g), "kv_len_total", n))
        g.add(ops.SdpaCausalTiled(q=L("q"), k=self.state[f"L{i}.k_cache"], v=self.state[f"L{i}.v_cache"],
                                  attn_out=L("attn"), n_tokens=n, num_heads=nh, heads_per_kv=cfg.heads_per_kv,
                                  head_dim=hd, kv_dim=cfg.kv_dim, kv_start=0, kv_len_total=n,
                                  softmax_scale=float(hd) ** -0.5, label=f"L{i}.sdpa"))
        g.add(ops.SigmoidGateNTokens(x=L("attn"), gate=L("gate"), dim=cfg.attn_dim, n_tokens=n,
                                     label=f"L{i}.attn_gate"))
        matvec(f"{p}.o_proj", L("attn"), L("attn_out"), label=f"L{i}.o_proj")

    def _moe(self, g: Graph, step: _Step, i: int, n: int, matvec: Callable[..., None]) -> Graph:
        """Append layer i's MoE block; returns the graph that later ops go into (a new segment
        in bucket mode)."""
        cfg, s = self.config, self.scratch
        L = lambda name: s[f"L{i}.{name}"]  # noqa: E731
        p = f"model.layers.{i}.mlp"
        H, E, k = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok
        Is = cfg.shared_expert_intermediate_size
        matvec(f"{p}.gate", L("normed2"), L("router"), label=f"L{i}.router")
        g.add(ops.MoeSoftmaxTopK(logits=L("router"), indices_out=L("idx"), weights_out=L("rw"), n_tokens=n,
                                 n_experts=E, k=k, label=f"L{i}.topk"))
        if cfg.norm_topk_prob:
            g.add(ops.MoeNormalizeWeights(weights=L("rw"), n_tokens=n, k=k, label=f"L{i}.topk_norm"))
        if n == 1 and self.spec_prefetch and i in self._next_moe:
            # Decode, pread: the next MoE layer's router on this layer's input predicts its experts
            # (the residual stream changes little in one layer); the host prefetches them.
            matvec(f"model.layers.{self._next_moe[i]}.mlp.gate", L("normed2"), L("spec_router"),
                   label=f"L{i}.spec_router")
            g.add(ops.MoeSoftmaxTopK(logits=L("spec_router"), indices_out=L("spec_idx"), weights_out=L("spec_w"),
                                     n_tokens=n, n_experts=E, k=k, label=f"L{i}.spec_topk"))
        matvec(f"{p}.shared_expert.gate_proj", L("normed2"), L("sh_gate"), label=f"L{i}.shared_gate_proj")
        matvec(f"{p}.shared_expert.up_proj", L("normed2"), L("sh_up"), label=f"L{i}.shared_up_proj")
        g.add(ops.SwigluFusedBatched(gate=L("sh_gate"), up=L("sh_up"), out=L("sh_act"), total=n * Is,
                                     label=f"L{i}.shared_swiglu"))
        matvec(f"{p}.shared_expert.down_proj", L("sh_act"), L("sh_out"), label=f"L{i}.shared_down_proj")
        matvec(f"{p}.shared_expert_gate", L("normed2"), L("sh_g"), label=f"L{i}.shared_expert_gate")
        combine = ops.MoeCombineResidualNTokens(h_mid=L("hmid"), moe_sum=L("moe_sum"), shared_out=L("sh_out"),
                                                shared_gate=L("sh_g"), hidden_out=self.res, n_tokens=n, dim=H,
                                                label=f"L{i}.moe_combine")
        if self.moe_gather:
            g.add(ops.MoeGatherIdFuse(expert_base=self._expert_base(i), expert_stride=self.expert_stride,
                                      layout=self.layout, indices=L("idx"), weights=L("rw"), mlp_in=L("normed2"),
                                      out_sum=L("moe_sum"), htpe=L("htpe"), hids=L("hids"),
                                      gate_mid=L("gate_mid"), up_mid=L("up_mid"), down_mid=L("down_mid"),
                                      n_tokens=n, n_experts=E, k=k, label=f"L{i}.moe"))
            g.add(combine)
            return g
        step.segments.append(g)
        step.segments.append(_BucketMoe(self, i, n))
        nxt = Graph([combine])
        return nxt

    # ------------------------------------------------------------------ running

    def reset(self) -> None:
        """Forget the sequence: position 0, zero KV caches and recurrent states."""
        for b in self.state.values():
            self.backend.upload(b, np.zeros(b.nbytes, np.uint8))
        self.position = 0

    def _run(self, ids: np.ndarray, head: str) -> np.ndarray:
        """Run ``ids`` (len <= chunk_size) at the current position; returns logits."""
        n = len(ids)
        if self.position + n > self.max_seq_len:
            raise ModelError(f"sequence of {self.position + n} tokens exceeds max_seq_len {self.max_seq_len}")
        step = self._step(n, head)
        self.backend.upload(self.token_ids, ids.astype(np.uint32))
        pos = self.position
        for graph, idx, fld, off in step.patches:
            graph.compile().set_u32(idx, fld, pos + off)
        segs = step.segments
        for si, seg in enumerate(segs):
            if isinstance(seg, Graph):
                nxt = segs[si + 1] if si + 1 < len(segs) else None
                if isinstance(nxt, _BucketMoe):
                    nxt.prefetch()  # overlaps the reads with this segment's compute
                self.backend.execute(seg, label=f"step{n}")
            else:
                seg.run(pos)
        self.position += n
        if self.store is not None:
            self._io_tokens += n
        if head == "all":
            return self.backend.download(self.logits_all, shape=(n, self.config.vocab_size))
        return self.backend.download(self.logits_last, shape=(self.config.vocab_size,))

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.config.vocab_size)][0])
            raise ModelError(f"token id {bad} is outside the vocabulary (size {self.config.vocab_size})")
        return arr

    def prefill(self, ids: Sequence[int], head: str = "last") -> np.ndarray:
        """Feed ``ids`` in chunks at the current position; logits of the last token (``head="last"``)
        or of every token (``"all"``, shape ``[len(ids), vocab]``)."""
        arr = self._check_ids(ids)
        if arr.size == 0:
            raise ModelError("prefill needs at least one token")
        outs = []
        for start in range(0, arr.size, self.chunk_size):
            chunk = arr[start:start + self.chunk_size]
            last = start + self.chunk_size >= arr.size
            if head == "all":
                outs.append(self._run(chunk, "all"))
            elif last:
                outs.append(self._run(chunk, "last"))
            else:
                self._run(chunk, "last")
        return np.concatenate(outs, axis=0) if head == "all" else outs[-1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits ``[len(ids), vocab]`` of a fresh sequence (resets the state first)."""
        self.reset()
        t0 = time.perf_counter()
        out = self.prefill(ids, head="all")
        self.stats = GenerationStats(prompt_tokens=len(out), prefill_s=time.perf_counter() - t0)
        return out

    def decode(self, token: int) -> np.ndarray:
        """Feed one token at the current position; its next-token logits."""
        return self._run(self._check_ids([token]), "last")

    # ------------------------------------------------------------------ text and generation

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def encode(self, text: str) -> List[int]:
        if self._tokenizer is None:
            raise ModelError(f"{self.path}: no tokenizer.json; pass token ids instead of text")
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode_text(self, ids: Sequence[int]) -> str:
        if self._tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(
        self,
        prompt: Union[str, Sequence[int]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: Optional[int] = 0,
        stop: Optional[Sequence[Union[str, int]]] = None,
        *,
        ids: Optional[bool] = None,
    ) -> Iterator[Union[str, int]]:
        """Stream a continuation of ``prompt`` (text or token ids).

        Yields text pieces when the prompt is text and a tokenizer is present, token ids otherwise
        (``ids=True`` forces ids). Stops at ``max_new_tokens``, an EOS token of the config, or any
        ``stop`` entry (token ids or strings). ``temperature=0`` is greedy.
        """
        if max_new_tokens < 0:
            raise ModelError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0 or not (0 < top_p <= 1) or top_k < 0:
            raise ModelError(f"bad sampling parameters: temperature={temperature}, top_k={top_k}, top_p={top_p}")
        text_mode = isinstance(prompt, str) and not ids
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(self._check_ids(prompt))
        if not prompt_ids:
            raise ModelError("the prompt encodes to no tokens")
        stop_ids = {s for s in (stop or []) if isinstance(s, int)} | set(self.config.eos_token_ids)
        stop_strs = [s for s in (stop or []) if isinstance(s, str)]
        rng = np.random.default_rng(seed)
        self.reset()
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids)
        stats.prefill_s = time.perf_counter() - t0
        self.stats = stats
        out_ids: List[int] = []
        emitted = ""
        t0 = time.perf_counter()
        for _ in range(max_new_tokens):
            tok = _sample(logits, temperature, top_k, top_p, rng)
            if tok in stop_ids:
                break
            out_ids.append(tok)
            stats.generated_tokens += 1
            if text_mode:
                text = self.decode_text(out_ids)
                piece, emitted = text[len(emitted):], text
                hit = next((s for s in stop_strs if s in emitted), None)
                if hit is not None:
                    cut = emitted.index(hit)
                    tail = piece[: max(0, len(piece) - (len(emitted) - cut))]
                    if tail:
                        yield tail
                    break
                if piece:
                    yield piece
            else:
                yield tok
            if stats.generated_tokens == max_new_tokens or self.position >= self.max_seq_len:
                break
            logits = self.decode(tok)
            stats.decode_s = time.perf_counter() - t0
        stats.decode_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ state snapshots

    def save_state(self, path: Optional[PathLike] = None) -> bytes:
        """Snapshot position, KV caches (rows in use) and recurrent states; bytes, also written to
        ``path`` when given."""
        header = {"version": STATE_VERSION, "position": self.position, "model": str(self.config.to_summary()),
                  "buffers": []}
        blobs = []
        for name, b in sorted(self.state.items()):
            data = self.backend.download(b, dtype=np.uint8)
            if name.endswith("_cache"):
                data = data[: self.position * self.config.kv_dim * F32]
            header["buffers"].append([name, int(data.size)])
            blobs.append(data.tobytes())
        h = json.dumps(header).encode()
        out = STATE_MAGIC + struct.pack("<Q", len(h)) + h + b"".join(blobs)
        if path is not None:
            tmp = Path(f"{path}.partial")
            tmp.write_bytes(out)
            tmp.replace(path)
        return out

    def load_state(self, data: Union[bytes, PathLike]) -> None:
        """Restore a snapshot from ``save_state`` (bytes or a file path)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = Path(data).read_bytes()
        data = bytes(data)
        if data[:8] != STATE_MAGIC or len(data) < 16:
            raise ModelError("not a moeflux state snapshot")
        (hlen,) = struct.unpack("<Q", data[8:16])
        try:
            header = json.loads(data[16:16 + hlen])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError("corrupted state snapshot header") from None
        if header.get("version") != STATE_VERSION or header.get("model") != str(self.config.to_summary()):
            raise ModelError("state snapshot is from another model or format version")
        pos = int(header["position"])
        if pos > self.max_seq_len:
            raise ModelError(f"snapshot position {pos} exceeds max_seq_len {self.max_seq_len}")
        at = 16 + hlen
        entries = header["buffers"]
        if sorted(n for n, _ in entries) != sorted(self.state):
            raise ModelError("state snapshot buffers do not match this model")
        self.reset()
        for name, size in entries:
            chunk = data[at:at + size]
            if len(chunk) != size:
                raise ModelError("truncated state snapshot")
            self.backend.upload(self.state[name], np.frombuffer(chunk, np.uint8))
            at += size
        self.position = pos


class _BucketMoe:
    """Host step of the bucket MoE path: read the router's top-k back, bucket the assignments by
    (top-k rank, expert) and run ``MoeBatchedPermuteFuse`` on the buckets.

    Rank-major buckets make every token sum its experts in top-k order, as ``MoeGatherIdFuse``
    does, so the paths agree bitwise (each expert row is computed independently of its batch).
    With an ``ExpertStore`` (pread mode) the experts of the chunk are acquired once each (read on
    a miss) and the op reads them from the cache slots. When a chunk needs more distinct experts
    than the cache holds, they are processed in batches that fit (cached ones first); the op then
    only computes the expert outputs and the host sums them in the same order."""

    def __init__(self, model: Model, layer: int, n: int):
        self.m, self.i, self.n = model, layer, n

    def _op(self, slots: Sequence[int], offsets: Sequence[int]) -> Any:
        m, i, n = self.m, self.i, self.n
        L = lambda name: m.scratch[f"L{i}.{name}"]  # noqa: E731
        return ops.MoeBatchedPermuteFuse(
            expert_base=m._expert_base(i), expert_stride=m.expert_stride, layout=m.layout,
            expert_indices=L("slots"), expert_slots=tuple(slots), bucket_input=L("normed2"),
            bucket_gate=L("gate_mid"), bucket_up=L("up_mid"), bucket_act=L("act_mid"),
            bucket_out=L("down_mid"), bucket_token_idx=L("tok_idx"), bucket_weights=L("tok_w"),
            out_sum=L("moe_sum"), n_tokens=n, buckets=tuple(offsets), label=f"L{i}.moe_buckets")

    def plan_ops(self) -> List[Any]:
        """A representative op for the planner (same buffers as every real step)."""
        return [self._op([0], [0, 0])]

    def prefetch(self) -> None:
        """Decode: queue reads of this layer's experts of the previous token (likely again)."""
        m = self.m
        if m.store is None or not m.prefetch or self.n != 1:
            return
        prev = m._last_experts.get(self.i)
        if prev:
            m.store.prefetch(self.i, prev)

    def _execute(self, assign: np.ndarray, idx: np.ndarray, wts: np.ndarray, slot_of: Dict[int, int]) -> None:
        """Run the op on assignments ``assign`` (rank-major order), expert ``e`` at slot ``slot_of[e]``."""
        m, i = self.m, self.i
        k = m.config.num_experts_per_tok
        e = idx[assign]
        j = assign % k
        new = np.ones(assign.size, dtype=bool)
        new[1:] = (e[1:] != e[:-1]) | (j[1:] != j[:-1])
        starts = np.flatnonzero(new)
        slots = [slot_of[int(x)] for x in e[starts]]
        offsets = starts.tolist() + [int(assign.size)]
        be = m.backend
        be.upload(m.scratch[f"L{i}.slots"], np.asarray(slots, dtype=np.uint32))
        be.upload(m.scratch[f"L{i}.tok_idx"], (assign // k).astype(np.uint32))
        be.upload(m.scratch[f"L{i}.tok_w"], wts[assign].astype(np.float32))
        be.execute(Graph([self._op(slots, offsets)]), label=f"L{i}.moe_buckets")

    def run(self, pos: int) -> None:
        m, i, n = self.m, self.i, self.n
        k = m.config.num_experts_per_tok
        be = m.backend
        idx = be.download(m.scratch[f"L{i}.idx"], dtype=np.uint32, shape=(n * k,))
        wts = be.download(m.scratch[f"L{i}.rw"], dtype=np.float32, shape=(n * k,))
        a = np.arange(n * k)
        order = np.lexsort((a, idx, a % k))  # by rank, then expert, then token
        store = m.store
        if store is None:
            self._execute(order, idx, wts, {int(e): int(e) for e in np.unique(idx)})
            return
        distinct = [int(e) for e in np.unique(idx)]
        m._last_experts[i] = idx[(n - 1) * k:].tolist()  # the last token's: the next decode step's guess
        if len(distinct) <= store.slots:
            slots = store.acquire(i, distinct)
            try:
                if n == 1 and m.spec_prefetch and i in m._next_moe:
                    # Read the next layer's predicted experts while this layer computes.
                    spec = be.download(m.scratch[f"L{i}.spec_idx"], dtype=np.uint32, shape=(k,))
                    store.prefetch(m._next_moe[i], spec.tolist())
                self._execute(order, idx, wts, dict(zip(distinct, slots)))
            finally:
                store.release(slots)
            return
        # More experts than slots: batches of cached-first experts; y rows per assignment, then the
        # exact sum of MoeBatchedPermuteFuse (0 + w*y over ranks in order, f32) on the host.
        H = m.config.hidden_size
        resident = store.resident(i, distinct)
        ordered = [e for e, r in zip(distinct, resident) if r] + [e for e, r in zip(distinct, resident) if not r]
        ys = np.empty((n * k, H), dtype=np.float32)
        cap = store.slots
        for b0 in range(0, len(ordered), cap):
            batch = ordered[b0:b0 + cap]
            sub = order[np.isin(idx[order], batch)]
            slots = store.acquire(i, batch)
            try:
                self._execute(sub, idx, wts, dict(zip(batch, slots)))
                ys[sub] = be.download(m.scratch[f"L{i}.down_mid"], shape=(sub.size, H))
            finally:
                store.release(slots)
        w = wts.reshape(n, k)
        yk = ys.reshape(n, k, H)
        out = np.zeros((n, H), dtype=np.float32)
        for j in range(k):
            out += w[:, j:j + 1] * yk[:, j, :]
        be.upload(m.scratch[f"L{i}.moe_sum"], out)


def _sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if top_k > 0 and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def _load_tokenizer(path: Path) -> Any:
    tj = path / "tokenizer.json"
    if not tj.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        return None
    return Tokenizer.from_file(str(tj))
