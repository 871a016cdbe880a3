"""Checkpoint -> moeflux model directory (``docs/model-format.md``), streaming and atomic.

Sources: a Hugging Face checkpoint (bf16/fp16/fp32 safetensors, sharded or not; Qwen3-Next with
per-expert tensors, Qwen3.5/3.6 MoE wrapper with fused or per-expert experts) is quantized here,
bit-exactly like mlx_lm (``moeflux.quantize``); an mlx-community-style quantized directory is taken
as is (no re-quantization; its norms already hold ``1 + w``). Tensors are read and written one at a
time (experts one by one), so peak memory is a small multiple of the largest single tensor.
The directory is built under ``DST.partial-<pid>``, ``moeflux.json`` is written last, and the
directory is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from .checkpoint import Checkpoint, CheckpointError
from .config import ModelConfig, MoefluxError

__all__ = [
    "ConvertError",
    "ModelDir",
    "as_model_dir",
    "ba_row_permutation",
    "convert",
    "expert_block_bytes",
    "expert_stride",
    "is_model_dir",
    "qkvz_row_permutation",
]

PathLike = Union[str, "os.PathLike[str]"]

FORMAT = "moeflux-model"
VERSION = 1
MARKER = "moeflux.json"
WEIGHTS = "weights.bin"
PAGE = 4096
ALIGN = 64
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
#: mlx_lm keeps the router and the shared-expert gate at 8 bits, group 64, whatever the model's bits.
GATE_BITS = 8
GATE_GROUP_SIZE = 64

#: Files copied from SRC besides config.json (tokenizer and generation settings).
COPY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.json",
    "chat_template.jinja",
)

_NP_TO_MANIFEST = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "uint32": "u32", "uint8": "u8"}
_ST_TO_DTYPE = {"F32": "f32", "BF16": "bf16", "F16": "f16"}
_DTYPE_SIZE = {"f32": 4, "bf16": 2, "f16": 2}


class ConvertError(MoefluxError, ValueError):
    """A conversion that cannot be done: unsupported bits/group size, a Linear whose input
    dimension is not a multiple of the group size, a destination that exists, a mixed layout."""


# ---------------------------------------------------------------------------- layout helpers


def qkvz_row_permutation(cfg: ModelConfig) -> np.ndarray:
    """Row order turning Qwen3-Next ``in_proj_qkvz`` (per key head ``[q(dk) k(dk) v(r*dv) z(r*dv)]``)
    into ``[Q all | K all | V all | Z all]``: ``new_rows = old_rows[perm]``."""
    nk, dk, r, dv = (
        cfg.linear_num_key_heads,
        cfg.linear_key_head_dim,
        cfg.v_heads_per_k,
        cfg.linear_value_head_dim,
    )
    group = 2 * dk + 2 * r * dv
    base = np.arange(nk, dtype=np.int64)[:, None] * group
    parts = [(0, dk), (dk, dk), (2 * dk, r * dv), (2 * dk + r * dv, r * dv)]
    return np.concatenate(
        [(base + start + np.arange(n, dtype=np.int64)[None, :]).reshape(-1) for start, n in parts]
    )


def ba_row_permutation(cfg: ModelConfig) -> np.ndarray:
    """Row order turning ``in_proj_ba`` (per key head ``[b(r) a(r)]``) into ``[B all | A all]``."""
    nk, r = cfg.linear_num_key_heads, cfg.v_heads_per_k
    base = np.arange(nk, dtype=np.int64)[:, None] * (2 * r)
    return np.concatenate(
        [(base + start + np.arange(r, dtype=np.int64)[None, :]).reshape(-1) for start in (0, r)]
    )


def expert_block_bytes(hidden_dim: int, inter_dim: int, bits: int, group_size: int, scale_dtype: str) -> int:
    """Bytes of one packed expert block ``[gate|up|down] x [w|s|b]`` (as ``ExpertLayout.offsets``)."""
    ss = _DTYPE_SIZE[scale_dtype]

    def part(rows: int, cols: int) -> int:
        return rows * cols * bits // 8 + 2 * rows * (cols // group_size) * ss

    return 2 * part(inter_dim, hidden_dim) + part(hidden_dim, inter_dim)


def expert_stride(hidden_dim: int, inter_dim: int, bits: int, group_size: int, scale_dtype: str) -> int:
    """The expert block size rounded up to a 4096-byte page."""
    b = expert_block_bytes(hidden_dim, inter_dim, bits, group_size, scale_dtype)
    return (b + PAGE - 1) // PAGE * PAGE


# ---------------------------------------------------------------------------- quantized matrices


@dataclass
class _QMat:
    wq: np.ndarray  # uint32 [rows, cols * bits / 32]
    scales: np.ndarray  # [rows, cols / group_size]
    biases: np.ndarray
    bits: int
    group_size: int

    def take_rows(self, perm: np.ndarray) -> "_QMat":
        return _QMat(self.wq[perm], self.scales[perm], self.biases[perm], self.bits, self.group_size)

    def block_bytes(self) -> bytes:
        return b"".join(_le(a).tobytes() for a in (self.wq, self.scales, self.biases))


def _le(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def _quantize(w: np.ndarray, group_size: int, bits: int) -> _QMat:
    """``mx.quantize``-compatible affine quantization through the engine (``moeflux.quantize``)."""
    q = _quantizer()
    wq, s, b = q(np.ascontiguousarray(w), group_size=group_size, bits=bits)
    return _QMat(np.asarray(wq), np.asarray(s), np.asarray(b), bits, group_size)


_QUANTIZE: Optional[Callable[..., Any]] = None


def _quantizer() -> Callable[..., Any]:
    if _QUANTIZE is not None:
        return _QUANTIZE
    try:
        from moeflux._core import quantize  # type: ignore[attr-defined]
    except ImportError:
        try:
            import moeflux

            quantize = moeflux.quantize  # type: ignore[attr-defined]
        except (ImportError, AttributeError):
            raise ConvertError("quantizing needs the compiled moeflux extension (moeflux._core)") from None
    return quantize


# ---------------------------------------------------------------------------- weight blob writer


class _BlobWriter:
    """Writes the engine's weight file (``weights.bin`` + ``weights.bin.json``, format
    ``moeflux-weights`` v1, 64-byte aligned tensors; see ``src/weights/file.rs``)."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.offset = 0
        self.tensors: Dict[str, Dict[str, Any]] = {}

    def add(
        self, name: str, arr: np.ndarray, bits: Optional[int] = None, group_size: Optional[int] = None
    ) -> None:
        if name in self.tensors:
            raise ConvertError(f"internal: tensor `{name}` written twice")
        arr = _le(arr)
        dt = _NP_TO_MANIFEST.get(arr.dtype.name)
        if dt is None:
            raise ConvertError(f"internal: tensor `{name}` has unsupported dtype {arr.dtype}")
        pad = (-self.offset) % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        data = arr.tobytes()
        self.f.write(data)
        info: Dict[str, Any] = {
            "offset": self.offset,
            "size": len(data),
            "shape": list(arr.shape),
            "dtype": dt,
        }
        if bits is not None:
            info["bits"] = int(bits)
            info["group_size"] = int(group_size)  # type: ignore[arg-type]
        self.tensors[name] = info
        self.offset += len(data)

    def add_qmat(self, module: str, q: _QMat) -> None:
        self.add(f"{module}.weight", q.wq.astype(np.uint32, copy=False), q.bits, q.group_size)
        self.add(f"{module}.scales", q.scales)
        self.add(f"{module}.biases", q.biases)

    def finish(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        manifest = {
            "format": "moeflux-weights",
            "version": 1,
            "file_size": self.offset,
            "tensors": self.tensors,
        }
        with open(str(self.path) + ".json", "w") as f:
            json.dump(manifest, f, indent=None, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


# ---------------------------------------------------------------------------- progress


class _Progress:
    """A one-line progress printer on stderr (bytes of source tensors processed)."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total = max(int(total), 1)
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.last = 0.0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def advance(self, nbytes: int, label: str) -> None:
        self.done += int(nbytes)
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < (0.1 if self.tty else 2.0) and self.done < self.total:
            return
        self.last = now
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 24)
        el = now - self.t0
        rate = self.done / el / 1e6 if el > 0 else 0.0
        line = f"converting [{bar:<24}] {frac * 100:5.1f}% {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB {rate:.0f} MB/s {label}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            el = time.monotonic() - self.t0
            end = "\n" if self.tty else ""
            self.stream.write(f"{end}converted {self.done / 1e9:.2f} GB in {el:.1f} s\n")
            self.stream.flush()


# ---------------------------------------------------------------------------- planning


@dataclass
class _Job:
    label: str
    nbytes: int
    run: Callable[[], None]


class _Planner:
    """Validates every tensor of the checkpoint against the config (existence, shape, dtype,
    quantizability) before anything is written, and builds the list of write jobs."""

    def __init__(self, ck: Checkpoint, cfg: ModelConfig, bits: Optional[int], group_size: Optional[int]):
        self.ck = ck
        self.cfg = cfg
        self.used: set = set()
        self.jobs: List[_Job] = []
        self.expert_jobs: List[Tuple[int, Callable[[int], Tuple[_QMat, _QMat, _QMat]], int]] = []
        self.layout = self._detect_layout()
        self.fold_norms = self.layout == "hf"
        self.bits, self.group_size = self._resolve_bits(bits, group_size)
        self.writer: Optional[_BlobWriter] = None
        self.expert_layout: Optional[Dict[str, Any]] = None

    # ---- source layout and quantization parameters

    def _detect_layout(self) -> str:
        ck, cfg = self.ck, self.cfg
        quantized = any(n.endswith(".scales") for n in ck.names())
        stacked = any(".switch_mlp." in n for n in ck.names())
        conv_kind = None
        for i in cfg.linear_attention_layers:
            name = f"model.layers.{i}.linear_attn.conv1d.weight"
            if name in ck:
                shape = ck.shape(name)
                if len(shape) == 3 and shape[1] == 1 and shape[2] != 1:
                    conv_kind = "hf"
                elif len(shape) == 3 and shape[2] == 1 and shape[1] != 1:
                    conv_kind = "mlx"
                else:
                    raise CheckpointError(
                        f"{ck.path}: `{ck.source_name(name)}` has shape {list(shape)}; expected [C, 1, K] "
                        "(Hugging Face) or [C, K, 1] (MLX)"
                    )
                break
        if conv_kind is None:
            return "mlx" if (quantized or stacked or self.cfg.quantization is not None) else "hf"
        if conv_kind == "hf" and (quantized or stacked):
            raise ConvertError(
                f"{ck.path}: mixed layout: conv1d weights are in Hugging Face form [C, 1, K] but the checkpoint "
                "also holds MLX tensors (`*.scales` or `switch_mlp`)"
            )
        return conv_kind

    def _resolve_bits(self, bits: Optional[int], group_size: Optional[int]) -> Tuple[int, int]:
        src_bits = src_gs = None
        if self.layout == "mlx":
            q = self.cfg.quantization or {}
            src_bits, src_gs = q.get("bits"), q.get("group_size")
            if any(n.endswith(".scales") for n in self.ck.names()):
                if bits is not None and src_bits is not None and bits != src_bits:
                    raise ConvertError(
                        f"{self.ck.path} is already quantized at {src_bits} bits; re-quantizing to {bits} bits is "
                        "not supported (convert the original Hugging Face checkpoint instead)"
                    )
                if group_size is not None and src_gs is not None and group_size != src_gs:
                    raise ConvertError(
                        f"{self.ck.path} is already quantized with group size {src_gs}; re-quantizing with "
                        f"group size {group_size} is not supported"
                    )
        b = bits if bits is not None else (src_bits if isinstance(src_bits, int) else 4)
        g = group_size if group_size is not None else (src_gs if isinstance(src_gs, int) else 64)
        if b not in SUPPORTED_BITS:
            raise ConvertError(
                f"bits = {b} is not supported (supported: {', '.join(map(str, SUPPORTED_BITS))})"
            )
        if g not in SUPPORTED_GROUP_SIZES:
            raise ConvertError(
                f"group_size = {g} is not supported (supported: {', '.join(map(str, SUPPORTED_GROUP_SIZES))})"
            )
        return b, g

    # ---- tensor kinds

    def _use(self, *names: str) -> None:
        self.used.update(names)

    def _float_dtype(self, name: str) -> str:
        dt = self.ck.dtype(name)
        if dt not in _ST_TO_DTYPE:
            raise CheckpointError(
                f"{self.ck.path}: tensor `{self.ck.source_name(name)}` has dtype {dt}, expected F32, F16 or BF16"
            )
        return _ST_TO_DTYPE[dt]

    def _infer_quant(self, module: str, w_shape, s_shape, rows: int, cols: int) -> Tuple[int, int]:
        """(bits, group_size) of a pre-quantized ``[.., rows, cols]`` matrix from its shapes."""
        ck = self.ck
        pw, ng = w_shape[-1], s_shape[-1]
        if w_shape[-2] != rows or s_shape[-2] != rows or pw * 32 % cols or cols % ng:
            raise CheckpointError(
                f"{ck.path}: quantized `{module}` has weight {list(w_shape)} and scales {list(s_shape)}, "
                f"which do not describe a [{rows}, {cols}] matrix"
            )
        qb, qg = pw * 32 // cols, cols // ng
        if qb not in SUPPORTED_BITS or qg not in SUPPORTED_GROUP_SIZES:
            raise ConvertError(
                f"{ck.path}: `{module}` is quantized with bits = {qb}, group_size = {qg}, which the engine does "
                f"not support (bits {SUPPORTED_BITS}, group sizes {SUPPORTED_GROUP_SIZES})"
            )
        return qb, qg

    def _check_quantizable(self, module: str, cols: int, group_size: int) -> None:
        if cols % group_size:
            raise ConvertError(
                f"`{module}`: input dimension {cols} is not a multiple of the group size {group_size}; "
                "every Linear must be quantizable (choose another --group-size)"
            )

    def linear(
        self, module: str, rows: int, cols: int, perm: Optional[np.ndarray] = None, gate: bool = False
    ) -> None:
        """A Linear (or the embedding) ``[rows, cols]`` -> quantized ``module.{weight,scales,biases}``."""
        ck = self.ck
        wname = f"{module}.weight"
        if f"{module}.scales" in ck:
            sname, bname = f"{module}.scales", f"{module}.biases"
            w_shape, s_shape = ck.shape(wname), ck.shape(sname)
            if len(w_shape) != 2 or ck.dtype(wname) != "U32":
                raise CheckpointError(
                    f"{ck.path}: quantized `{ck.source_name(wname)}` must be a 2-D U32 tensor"
                )
            if ck.shape(bname) != s_shape:
                raise CheckpointError(
                    f"{ck.path}: `{module}` scales {list(s_shape)} and biases "
                    f"{list(ck.shape(bname))} differ in shape"
                )
            self._float_dtype(sname)
            qb, qg = self._infer_quant(module, w_shape, s_shape, rows, cols)
            self._use(wname, sname, bname)

            def run() -> None:
                q = _QMat(ck.get(wname), ck.get(sname), ck.get(bname), qb, qg)
                if perm is not None:
                    q = q.take_rows(perm)
                self.writer.add_qmat(module, q)

            nbytes = ck.nbytes(wname) + 2 * ck.nbytes(sname)
        else:
            ck.expect(wname, (rows, cols), float_only=True)
            bits, gs = (GATE_BITS, GATE_GROUP_SIZE) if gate else (self.bits, self.group_size)
            self._check_quantizable(module, cols, self.group_size)
            self._check_quantizable(module, cols, gs)
            self._use(wname)

            def run() -> None:
                w = ck.get(wname)
                if perm is not None:
                    w = w[perm]
                self.writer.add_qmat(module, _quantize(w, gs, bits))

            nbytes = ck.nbytes(wname)
        self.jobs.append(_Job(module, nbytes, run))

    def norm(self, name: str, dim: int, zero_centred: bool) -> None:
        ck = self.ck
        ck.expect(name, (dim,), float_only=True)
        self._use(name)
        fold = zero_centred and self.fold_norms

        def run() -> None:
            w = ck.get(name)
            if fold:
                w = (w.astype(np.float32) + np.float32(1.0)).astype(w.dtype)
            self.writer.add(name, w)

        self.jobs.append(_Job(name, ck.nbytes(name), run))

    def conv(self, name: str) -> None:
        ck, cfg = self.ck, self.cfg
        c, k = cfg.conv_dim, cfg.linear_conv_kernel_dim
        ck.expect(name, (c, 1, k) if self.layout == "hf" else (c, k, 1), float_only=True)
        self._use(name)
        self.jobs.append(
            _Job(name, ck.nbytes(name), lambda: self.writer.add(name, ck.get(name).reshape(c, k)))
        )

    def vector_f32(self, name: str, dim: int) -> None:
        ck = self.ck
        ck.expect(name, (dim,), float_only=True)
        self._use(name)
        self.jobs.append(
            _Job(name, ck.nbytes(name), lambda: self.writer.add(name, ck.get(name).astype(np.float32)))
        )

    # ---- experts

    def experts(self, layer: int) -> None:
        ck, cfg = self.ck, self.cfg
        p = f"model.layers.{layer}.mlp"
        E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        shapes = {"gate_proj": (inter, H), "up_proj": (inter, H), "down_proj": (H, inter)}
        projs = ("gate_proj", "up_proj", "down_proj")
        nbytes = 0
        if f"{p}.switch_mlp.gate_proj.weight" in ck:
            quantized = f"{p}.switch_mlp.gate_proj.scales" in ck
            fmt: Dict[str, Tuple[int, int]] = {}
            dtypes = set()
            for n in projs:
                base = f"{p}.switch_mlp.{n}"
                rows, cols = shapes[n]
                if quantized:
                    w_shape, s_shape = ck.shape(f"{base}.weight"), ck.shape(f"{base}.scales")
                    if (
                        len(w_shape) != 3
                        or w_shape[0] != E
                        or s_shape[0] != E
                        or ck.dtype(f"{base}.weight") != "U32"
                    ):
                        raise CheckpointError(
                            f"{ck.path}: `{ck.source_name(base + '.weight')}` has shape "
                            f"{list(w_shape)}; expected [{E}, {rows}, packed] U32"
                        )
                    if ck.shape(f"{base}.biases") != s_shape:
                        raise CheckpointError(f"{ck.path}: `{base}` scales and biases differ in shape")
                    fmt[n] = self._infer_quant(base, w_shape, s_shape, rows, cols)
                    dtypes.add(self._float_dtype(f"{base}.scales"))
                    self._use(f"{base}.weight", f"{base}.scales", f"{base}.biases")
                    nbytes += ck.nbytes(f"{base}.weight") + 2 * ck.nbytes(f"{base}.scales")
                else:
                    ck.expect(f"{base}.weight", (E, rows, cols), float_only=True)
                    self._check_quantizable(f"{base}", cols, self.group_size)
                    dtypes.add(self._float_dtype(f"{base}.weight"))
                    self._use(f"{base}.weight")
                    nbytes += ck.nbytes(f"{base}.weight")
            if quantized:
                if len(set(fmt.values())) != 1:
                    raise ConvertError(
                        f"{ck.path}: experts of layer {layer} mix quantizations {fmt}; one expert "
                        "block needs one bits/group size"
                    )
                bits, gs = next(iter(fmt.values()))
            else:
                bits, gs = self.bits, self.group_size

            def read(e: int) -> Tuple[_QMat, _QMat, _QMat]:
                out = []
                for n in projs:
                    base = f"{p}.switch_mlp.{n}"
                    if quantized:
                        out.append(
                            _QMat(
                                ck.get_index(f"{base}.weight", e),
                                ck.get_index(f"{base}.scales", e),
                                ck.get_index(f"{base}.biases", e),
                                bits,
                                gs,
                            )
                        )
                    else:
                        out.append(_quantize(ck.get_index(f"{base}.weight", e), gs, bits))
                return out[0], out[1], out[2]

        elif f"{p}.experts.gate_up_proj" in ck or f"{p}.experts.gate_up_proj.weight" in ck:
            gu = f"{p}.experts.gate_up_proj"
            gu = gu if gu in ck else gu + ".weight"
            dn = f"{p}.experts.down_proj"
            dn = dn if dn in ck or dn + ".weight" not in ck else dn + ".weight"
            ck.expect(gu, (E, 2 * inter, H), float_only=True)
            ck.expect(dn, (E, H, inter), float_only=True)
            self._check_quantizable(gu, H, self.group_size)
            self._check_quantizable(dn, inter, self.group_size)
            dtypes = {self._float_dtype(gu), self._float_dtype(dn)}
            self._use(gu, dn)
            nbytes = ck.nbytes(gu) + ck.nbytes(dn)
            bits, gs = self.bits, self.group_size

            def read(e: int) -> Tuple[_QMat, _QMat, _QMat]:
                g_u = ck.get_index(gu, e)
                return (
                    _quantize(g_u[:inter], gs, bits),
                    _quantize(g_u[inter:], gs, bits),
                    _quantize(ck.get_index(dn, e), gs, bits),
                )

        else:
            dtypes = set()
            for e in range(E):
                for n in projs:
                    name = f"{p}.experts.{e}.{n}.weight"
                    ck.expect(name, shapes[n], float_only=True)
                    dtypes.add(self._float_dtype(name))
                    self._use(name)
                    nbytes += ck.nbytes(name)
            self._check_quantizable(f"{p}.experts.*.gate_proj", H, self.group_size)
            self._check_quantizable(f"{p}.experts.*.down_proj", inter, self.group_size)
            bits, gs = self.bits, self.group_size

            def read(e: int) -> Tuple[_QMat, _QMat, _QMat]:
                return tuple(  # type: ignore[return-value]
                    _quantize(ck.get(f"{p}.experts.{e}.{n}.weight"), gs, bits) for n in projs
                )

        if len(dtypes) != 1:
            raise ConvertError(f"{ck.path}: experts of layer {layer} mix dtypes {sorted(dtypes)}")
        layout = {
            "hidden_dim": H,
            "inter_dim": inter,
            "bits": bits,
            "group_size": gs,
            "scale_dtype": dtypes.pop(),
        }
        if self.expert_layout is None:
            self.expert_layout = layout
        elif self.expert_layout != layout:
            raise ConvertError(
                f"{ck.path}: experts of layer {layer} are {layout} but earlier layers are {self.expert_layout}; "
                "all expert blocks must share one layout"
            )
        self.expert_jobs.append((layer, read, nbytes))

    # ---- the whole model

    def plan(self) -> None:
        ck, cfg = self.ck, self.cfg
        H, V = cfg.hidden_size, cfg.vocab_size
        self.linear("model.embed_tokens", V, H)
        if cfg.tie_word_embeddings:
            for suffix in (".weight", ".scales", ".biases"):
                if "lm_head" + suffix in ck:
                    self._use("lm_head" + suffix)  # mlx_lm drops it too; the embedding is the output matrix
        for spec in cfg.layers:
            p = f"model.layers.{spec.index}"
            self.norm(f"{p}.input_layernorm.weight", H, True)
            self.norm(f"{p}.post_attention_layernorm.weight", H, True)
            if spec.is_linear:
                la = f"{p}.linear_attn"
                nv, vd = cfg.linear_num_value_heads, cfg.linear_value_dim
                if cfg.proj_layout == "qkvz":
                    self.linear(f"{la}.in_proj_qkvz", cfg.qkvz_dim, H, perm=qkvz_row_permutation(cfg))
                    self.linear(f"{la}.in_proj_ba", cfg.ba_dim, H, perm=ba_row_permutation(cfg))
                else:
                    self.linear(f"{la}.in_proj_qkv", cfg.conv_dim, H)
                    self.linear(f"{la}.in_proj_z", vd, H)
                    self.linear(f"{la}.in_proj_b", nv, H)
                    self.linear(f"{la}.in_proj_a", nv, H)
                self.conv(f"{la}.conv1d.weight")
                self.vector_f32(f"{la}.A_log", nv)
                self.vector_f32(f"{la}.dt_bias", nv)
                self.norm(f"{la}.norm.weight", cfg.linear_value_head_dim, False)
                self.linear(f"{la}.out_proj", H, vd)
            else:
                sa = f"{p}.self_attn"
                self.linear(f"{sa}.q_proj", cfg.q_proj_dim, H)
                self.linear(f"{sa}.k_proj", cfg.kv_dim, H)
                self.linear(f"{sa}.v_proj", cfg.kv_dim, H)
                self.linear(f"{sa}.o_proj", H, cfg.attn_dim)
                self.norm(f"{sa}.q_norm.weight", cfg.head_dim, True)
                self.norm(f"{sa}.k_norm.weight", cfg.head_dim, True)
            m = f"{p}.mlp"
            if spec.is_moe:
                S = cfg.shared_expert_intermediate_size
                self.linear(f"{m}.gate", cfg.num_experts, H, gate=True)
                self.linear(f"{m}.shared_expert.gate_proj", S, H)
                self.linear(f"{m}.shared_expert.up_proj", S, H)
                self.linear(f"{m}.shared_expert.down_proj", H, S)
                self.linear(f"{m}.shared_expert_gate", 1, H, gate=True)
                self.experts(spec.index)
            else:
                inter = cfg.intermediate_size
                self.linear(f"{m}.gate_proj", inter, H)
                self.linear(f"{m}.up_proj", inter, H)
                self.linear(f"{m}.down_proj", H, inter)
        self.norm("model.norm.weight", H, True)
        if not cfg.tie_word_embeddings:
            self.linear("lm_head", V, H)
        extra = [n for n in ck.names() if n not in self.used]
        if extra:
            shown = ", ".join(f"`{ck.source_name(n)}`" for n in extra[:6])
            raise CheckpointError(
                f"{ck.path}: {len(extra)} tensor(s) the config does not account for (unsupported variant or "
                f"config mismatch): {shown}" + (" ..." if len(extra) > 6 else "")
            )

    def total_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs) + sum(n for _, _, n in self.expert_jobs)


# ---------------------------------------------------------------------------- the conversion


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(dst: Path) -> None:
    for p in dst.parent.glob(dst.name + ".partial-*"):
        tail = p.name.rsplit("-", 1)[-1]
        if tail.isdigit() and int(tail) != os.getpid() and not _pid_alive(int(tail)):
            shutil.rmtree(p, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def convert(
    src: PathLike,
    dst: PathLike,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert checkpoint directory ``src`` into the moeflux model directory ``dst``; return ``dst``.

    ``bits`` (4 or 8) and ``group_size`` (32, 64 or 128) default to 4 and 64 for a Hugging Face
    source and to the source's own for an MLX-quantized one (passing different values for an
    already quantized source is a :class:`ConvertError`: no re-quantization). ``progress`` prints
    a progress line on stderr. ``dst`` must not exist unless ``overwrite``; it is built as
    ``dst.partial-<pid>`` and renamed when complete, so an interrupted conversion never leaves a
    directory that opens. Raises :class:`~moeflux.config.ConfigError`,
    :class:`~moeflux.checkpoint.CheckpointError` or :class:`ConvertError` before writing anything
    when the source is unusable.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a checkpoint directory")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ConvertError(f"{dst}: destination is the source")
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst}: destination exists (remove it or pass overwrite=True)")
    cfg = ModelConfig.load(src)
    with Checkpoint(src) as ck:
        planner = _Planner(ck, cfg, bits, group_size)
        planner.plan()
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(dst)
        tmp = dst.parent / f"{dst.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        bar = _Progress(planner.total_bytes(), progress)
        try:
            tmp.mkdir()
            (tmp / "experts").mkdir()
            shutil.copyfile(src / "config.json", tmp / "config.json")
            for name in COPY_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
            writer = _BlobWriter(tmp / WEIGHTS)
            planner.writer = writer
            try:
                for job in planner.jobs:
                    job.run()
                    bar.advance(job.nbytes, job.label)
                writer.finish()
            finally:
                writer.close()
            meta = _write_experts(planner, tmp, bar)
            meta.update(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "bits": planner.bits,
                    "group_size": planner.group_size,
                    "source": planner.layout,
                    "model_type": cfg.model_type,
                    "proj_layout": cfg.proj_layout,
                    "num_experts": cfg.num_experts,
                    "lm_head": "model.embed_tokens" if cfg.tie_word_embeddings else "lm_head",
                    "layers": [spec.kind for spec in cfg.layers],
                }
            )
            _write_json(tmp / MARKER, meta)  # last: a directory without it never opens
            if dst.exists():
                old = dst.parent / f"{dst.name}.old-{os.getpid()}"
                os.rename(dst, old)
                os.rename(tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            bar.close()
    return dst


def _write_experts(planner: _Planner, tmp: Path, bar: _Progress) -> Dict[str, Any]:
    cfg = planner.cfg
    files: Dict[str, str] = {}
    lay = planner.expert_layout
    if lay is None:
        return {"expert_layout": None, "expert_stride": 0, "expert_files": {}, "expert_file_bytes": 0}
    block = expert_block_bytes(**lay)
    stride = expert_stride(**lay)
    pad = b"\0" * (stride - block)
    for layer, read, nbytes in planner.expert_jobs:
        rel = f"experts/layer_{layer:03d}.bin"
        with open(tmp / rel, "wb") as f:
            for e in range(cfg.num_experts):
                parts = read(e)
                data = b"".join(q.block_bytes() for q in parts)
                if len(data) != block:
                    raise ConvertError(
                        f"internal: expert {e} of layer {layer} packs to {len(data)} bytes, not {block}"
                    )
                f.write(data)
                f.write(pad)
                bar.advance(nbytes // cfg.num_experts, f"layer {layer} experts {e + 1}/{cfg.num_experts}")
            f.flush()
            os.fsync(f.fileno())
        files[str(layer)] = rel
    return {
        "expert_layout": lay,
        "expert_stride": stride,
        "expert_files": files,
        "expert_file_bytes": stride * cfg.num_experts,
    }


# ---------------------------------------------------------------------------- reading model dirs


def is_model_dir(path: PathLike) -> bool:
    """True when ``path`` holds a complete moeflux model directory (its ``moeflux.json`` marker)."""
    p = Path(path) / MARKER
    if not p.is_file():
        return False
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


@dataclass(frozen=True)
class ModelDir:
    """A validated moeflux model directory: its marker, config and file paths."""

    path: Path
    meta: Dict[str, Any]
    config: ModelConfig

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    @property
    def bits(self) -> int:
        return int(self.meta["bits"])

    @property
    def group_size(self) -> int:
        return int(self.meta["group_size"])

    @property
    def expert_stride(self) -> int:
        return int(self.meta["expert_stride"])

    @property
    def expert_layout(self) -> Optional[Dict[str, Any]]:
        """``{"hidden_dim", "inter_dim", "bits", "group_size", "scale_dtype"}``: the keyword
        arguments of ``moeflux.ops.ExpertLayout``."""
        return self.meta.get("expert_layout")

    @property
    def expert_files(self) -> Dict[int, Path]:
        return {int(k): self.path / v for k, v in self.meta.get("expert_files", {}).items()}

    @property
    def lm_head(self) -> str:
        """Name of the quantized output matrix: ``lm_head`` or, when tied, ``model.embed_tokens``."""
        return self.meta.get(
            "lm_head", "model.embed_tokens" if self.config.tie_word_embeddings else "lm_head"
        )

    @classmethod
    def open(cls, path: PathLike) -> "ModelDir":
        """Open and check ``path``: marker format and version, config, weight file and manifest
        present, one expert file of ``num_experts * expert_stride`` bytes per MoE layer."""
        p = Path(path)
        marker = p / MARKER
        if not marker.is_file():
            hint = ""
            if (p / "config.json").is_file():
                hint = " (a checkpoint directory: convert it with `moeflux convert`, or use as_model_dir)"
            raise ConvertError(f"{p}: not a moeflux model directory, no {MARKER}{hint}")
        try:
            meta = json.loads(marker.read_text())
        except ValueError as e:
            raise ConvertError(f"{marker}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ConvertError(f"{marker}: format is not {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise ConvertError(
                f"{marker}: version {meta.get('version')!r} is not supported (expected {VERSION})"
            )
        cfg = ModelConfig.load(p)
        for f in (p / WEIGHTS, p / (WEIGHTS + ".json")):
            if not f.is_file():
                raise ConvertError(f"{p}: missing {f.name}")
        md = cls(p, meta, cfg)
        files = md.expert_files
        if sorted(files) != cfg.moe_layers:
            raise ConvertError(
                f"{marker}: expert files for layers {sorted(files)}, but the config's MoE layers are "
                f"{cfg.moe_layers}"
            )
        if files:
            lay = md.expert_layout or {}
            want = expert_stride(**lay)
            if md.expert_stride != want:
                raise ConvertError(
                    f"{marker}: expert_stride {md.expert_stride} does not match the layout ({want})"
                )
            size = md.expert_stride * cfg.num_experts
            for layer, f in files.items():
                if not f.is_file() or f.stat().st_size != size:
                    got = f.stat().st_size if f.is_file() else "missing"
                    raise ConvertError(f"{f}: expert file of layer {layer} is {got} bytes, expected {size}")
        return md


# ---------------------------------------------------------------------------- opening sources directly


def _source_fingerprint(src: Path, bits: Optional[int], group_size: Optional[int]) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT}/{VERSION}/{bits}/{group_size}\n".encode())
    h.update((src / "config.json").read_bytes())
    for f in sorted(list(src.glob("*.safetensors")) + list(src.glob("*.json"))):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    """``$MOEFLUX_CACHE``, else ``$XDG_CACHE_HOME/moeflux``, else ``~/.cache/moeflux``."""
    env = os.environ.get("MOEFLUX_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "moeflux"


def as_model_dir(
    src: PathLike,
    cache_dir: Optional[PathLike] = None,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    progress: bool = False,
) -> Path:
    """A moeflux model directory for ``src``: ``src`` itself when it already is one, else a
    conversion of it cached under ``cache_dir`` (default :func:`default_cache_dir`) / ``converted``
    and keyed by the source's config, file names, sizes and mtimes plus ``bits``/``group_size``.

    For an MLX-quantized source this is a re-packing (no re-quantization): non-expert tensors are
    copied into ``weights.bin`` and the stacked ``switch_mlp`` experts regrouped into per-layer
    expert files, which the runtime needs because an expert's nine parts are not contiguous in an
    MLX file. A Hugging Face source is quantized (``bits`` default 4). Concurrent callers are
    safe: the conversion is atomic and the loser of a race uses the winner's directory.
    """
    src = Path(src)
    if is_model_dir(src):
        return src
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: neither a moeflux model directory nor a checkpoint (no config.json)")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dst = root / "converted" / f"{src.resolve().name}-{_source_fingerprint(src, bits, group_size)}"
    if is_model_dir(dst):
        return dst
    try:
        convert(src, dst, bits=bits, group_size=group_size, progress=progress)
    except (ConvertError, OSError):
        if is_model_dir(dst):  # another process finished first
            return dst
        raise
    return dst
