"""The model description, parsed at run time from a checkpoint's ``config.json``.

One :class:`ModelConfig` covers the Qwen3-Next family: Qwen3-Next (``model_type`` ``qwen3_next``,
fused ``in_proj_qkvz`` / ``in_proj_ba``) and Qwen3.5 / Qwen3.6 MoE (``qwen3_5_moe`` with the text
settings nested under ``text_config``, or the flat text-only ``qwen3_5_moe_text``; separate
``in_proj_qkv`` / ``in_proj_z`` / ``in_proj_b`` / ``in_proj_a``). Both the transformers-v5 keys
(``layer_types``, ``rope_parameters``) and the legacy hub keys (``full_attention_interval``,
``rope_theta``, ``partial_rotary_factor``) are accepted. Anything the engine cannot run is a
:class:`ConfigError` here, never a crash later.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

try:  # the compiled binding defines the error hierarchy
    from moeflux._core import MoefluxError
except ImportError:  # pragma: no cover - only while the binding is not built

    class MoefluxError(Exception):  # type: ignore[no-redef]
        """Base class of moeflux errors (fallback while the compiled binding is missing)."""


__all__ = [
    "ConfigError",
    "LayerSpec",
    "ModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "NORM_SUFFIXES",
]

PathLike = Union[str, "os.PathLike[str]"]


class ConfigError(MoefluxError, ValueError):
    """An unsupported architecture or an inconsistent ``config.json``."""


#: ``model_type`` values this engine runs, mapped to their linear-attention projection layout.
SUPPORTED_MODEL_TYPES = {
    "qwen3_next": "qkvz",
    "qwen3_5_moe": "separate",
    "qwen3_5_moe_text": "separate",
}

#: Names of the five zero-centred RMSNorm weights (HF stores ``w``, the engine ``1 + w``).
NORM_SUFFIXES = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    ".self_attn.q_norm.weight",
    ".self_attn.k_norm.weight",
)
#: The final norm (the fifth zero-centred norm).
FINAL_NORM = "model.norm.weight"

_LAYER_TYPE_NAMES = {"linear_attention": "linear", "full_attention": "full"}


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer: its token mixer (``"linear"`` GatedDeltaNet or ``"full"`` gated
    attention) and its MLP (``"moe"`` sparse MoE with shared expert, or ``"dense"`` SwiGLU)."""

    index: int
    attention: str
    mlp: str

    @property
    def is_linear(self) -> bool:
        return self.attention == "linear"

    @property
    def is_full(self) -> bool:
        return self.attention == "full"

    @property
    def is_moe(self) -> bool:
        return self.mlp == "moe"

    @property
    def kind(self) -> str:
        """``"linear_moe"``, ``"linear_dense"``, ``"full_moe"`` or ``"full_dense"``."""
        return f"{self.attention}_{self.mlp}"


@dataclass(frozen=True)
class ModelConfig:
    """Everything the converter and the runtime need to know about a model, with derived sizes.

    Build with :meth:`from_dict`, :meth:`from_file` or :meth:`load` (directory or file).
    """

    model_type: str
    """``qwen3_next``, ``qwen3_5_moe`` or ``qwen3_5_moe_text`` (the checkpoint's top level)."""
    proj_layout: str
    """``"qkvz"`` (``in_proj_qkvz`` + ``in_proj_ba``) or ``"separate"`` (``in_proj_qkv/z/b/a``)."""
    wrapped: bool
    """True for the vision-language wrapper (``text_config`` nested, ``model.language_model.``)."""

    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float

    # full (gated) attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    partial_rotary_factor: float
    max_position_embeddings: int

    # linear attention (GatedDeltaNet)
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int

    # MLPs
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    intermediate_size: int
    norm_topk_prob: bool

    tie_word_embeddings: bool
    layers: Tuple[LayerSpec, ...]

    torch_dtype: Optional[str] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: Tuple[int, ...] = ()
    quantization: Optional[Dict[str, Any]] = None
    """The MLX ``quantization`` entry (bits, group_size, per-module overrides) when present."""
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The whole ``config.json`` as read."""

    # ------------------------------------------------------------------ derived sizes

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per head: ``int(head_dim * partial_rotary_factor)``."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def heads_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_proj_dim(self) -> int:
        """Output rows of ``q_proj``: per head ``[q(head_dim) | gate(head_dim)]``."""
        return 2 * self.num_attention_heads * self.head_dim

    @property
    def attn_dim(self) -> int:
        """``num_attention_heads * head_dim`` (input of ``o_proj``)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """``num_key_value_heads * head_dim`` (output of ``k_proj`` / ``v_proj``)."""
        return self.num_key_value_heads * self.head_dim

    @property
    def linear_key_dim(self) -> int:
        """``nk * dk``: width of the Q (and of the K) block of the conv channels."""
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        """``nv * dv``: width of V, of z and of the GatedDeltaNet output."""
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def v_heads_per_k(self) -> int:
        """``r = nv / nk``: value heads per key head (value head ``h`` uses key head ``h // r``)."""
        return self.linear_num_value_heads // self.linear_num_key_heads

    @property
    def conv_dim(self) -> int:
        """Conv channels ``[Q | K | V]`` = ``2 * nk * dk + nv * dv``."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def qkvz_dim(self) -> int:
        """Rows of ``in_proj_qkvz`` (= conv_dim + nv * dv)."""
        return self.conv_dim + self.linear_value_dim

    @property
    def ba_dim(self) -> int:
        """Rows of ``in_proj_ba`` (= 2 * nv)."""
        return 2 * self.linear_num_value_heads

    @property
    def full_attention_layers(self) -> List[int]:
        return [spec.index for spec in self.layers if spec.is_full]

    @property
    def linear_attention_layers(self) -> List[int]:
        return [spec.index for spec in self.layers if spec.is_linear]

    @property
    def moe_layers(self) -> List[int]:
        return [spec.index for spec in self.layers if spec.is_moe]

    @property
    def dense_layers(self) -> List[int]:
        return [spec.index for spec in self.layers if not spec.is_moe]

    def layer(self, i: int) -> LayerSpec:
        return self.layers[i]

    def inv_freq(self):
        """RoPE inverse frequencies ``theta^(-arange(0, rd, 2) / rd)`` as float32 ``[rd/2]``."""
        import numpy as np

        rd = self.rotary_dim
        exps = np.arange(0, rd, 2, dtype=np.float64) / rd
        return (1.0 / (self.rope_theta**exps)).astype(np.float32)

    # ------------------------------------------------------------------ parsing

    @classmethod
    def load(cls, path: PathLike) -> "ModelConfig":
        """Parse ``path`` (a ``config.json`` or a directory holding one). A directory's
        ``generation_config.json`` supplies ``eos_token_id`` when config.json has none."""
        p = Path(path)
        if p.is_dir():
            cfg = cls.from_file(p / "config.json")
            if not cfg.eos_token_ids:
                gen = p / "generation_config.json"
                if gen.is_file():
                    try:
                        eos = _eos_list(json.loads(gen.read_text()).get("eos_token_id"), str(gen))
                    except (ValueError, OSError):
                        eos = ()
                    if eos:
                        cfg = dataclasses.replace(cfg, eos_token_ids=eos)
            return cfg
        return cls.from_file(p)

    @classmethod
    def from_file(cls, path: PathLike) -> "ModelConfig":
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such file (a checkpoint directory needs a config.json)") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read: {e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: expected a JSON object at the top level")
        return cls.from_dict(d, source=str(p))

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Parse a config dict (the content of ``config.json``)."""
        return _parse(d, source)

    def to_summary(self) -> Dict[str, Any]:
        """A short JSON-able description (for logs and ``moeflux.json``)."""
        return {
            "model_type": self.model_type,
            "proj_layout": self.proj_layout,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "layers": [spec.kind for spec in self.layers],
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
        }


# ---------------------------------------------------------------------- helpers


class _Reader:
    """Typed access to one config dict with error messages naming the source and the key."""

    def __init__(self, d: Dict[str, Any], source: str):
        self.d = d
        self.source = source

    def err(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {msg}")

    def has(self, key: str) -> bool:
        return key in self.d and self.d[key] is not None

    def int(self, key: str, default: Optional[int] = None, minimum: int = 1) -> int:
        if not self.has(key):
            if default is None:
                raise self.err(f"missing required key `{key}`")
            return default
        v = self.d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            raise self.err(f"`{key}` must be an integer, got {v!r}")
        v = int(v)
        if v < minimum:
            raise self.err(f"`{key}` must be >= {minimum}, got {v}")
        return v

    def float(self, key: str, default: Optional[float] = None) -> float:
        if not self.has(key):
            if default is None:
                raise self.err(f"missing required key `{key}`")
            return float(default)
        v = self.d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.err(f"`{key}` must be a number, got {v!r}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        v = self.d[key]
        if not isinstance(v, bool):
            raise self.err(f"`{key}` must be true or false, got {v!r}")
        return v


def _eos_list(v: Any, source: str) -> Tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, bool):
        raise ConfigError(f"{source}: `eos_token_id` must be an integer or a list of integers")
    if isinstance(v, int):
        return (v,)
    if isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return tuple(v)
    raise ConfigError(f"{source}: `eos_token_id` must be an integer or a list of integers, got {v!r}")


def _text_dict(d: Dict[str, Any], source: str) -> Tuple[str, Dict[str, Any], bool]:
    """``(model_type, text settings, wrapped)``: unwraps the Qwen3.5 ``text_config``."""
    mt = d.get("model_type")
    if mt is None:
        arch = d.get("architectures")
        raise ConfigError(
            f"{source}: no `model_type` (architectures: {arch!r}); cannot tell the architecture"
        )
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: unsupported architecture model_type={mt!r} "
            f"(architectures {d.get('architectures')!r}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if mt == "qwen3_5_moe" and "text_config" in d:
        tc = d["text_config"]
        if not isinstance(tc, dict):
            raise ConfigError(f"{source}: `text_config` must be an object")
        inner = tc.get("model_type")
        if inner is not None and inner not in ("qwen3_5_moe_text", "qwen3_5_moe"):
            raise ConfigError(
                f"{source}: unsupported text_config.model_type={inner!r} (expected qwen3_5_moe_text)"
            )
        return mt, tc, True
    return mt, d, False


def _rope(r: _Reader, mt: str) -> Tuple[float, float]:
    """``(rope_theta, partial_rotary_factor)`` from ``rope_parameters`` (v5) or the legacy keys."""
    d = r.d
    params = d.get("rope_parameters")
    legacy_scaling = d.get("rope_scaling")
    theta: Optional[float] = None
    prf: Optional[float] = None
    rope_type = "default"
    if params is not None:
        if not isinstance(params, dict):
            raise r.err(f"`rope_parameters` must be an object, got {params!r}")
        # transformers may nest per-layer-type parameters: {"full_attention": {...}}
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            params = params["full_attention"]
        pr = _Reader(params, f"{r.source} rope_parameters")
        if pr.has("rope_theta"):
            theta = pr.float("rope_theta")
        if pr.has("partial_rotary_factor"):
            prf = pr.float("partial_rotary_factor")
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if legacy_scaling is not None:
        if not isinstance(legacy_scaling, dict):
            raise r.err(f"`rope_scaling` must be an object or null, got {legacy_scaling!r}")
        lt = legacy_scaling.get("rope_type", legacy_scaling.get("type", "default")) or "default"
        if lt != "default":
            rope_type = lt
    if rope_type not in ("default", "mrope"):
        raise r.err(f"RoPE type {rope_type!r} is not supported (only plain RoPE, `default`)")
    if r.has("rope_theta"):
        t = r.float("rope_theta")
        if theta is not None and t != theta:
            raise r.err(f"`rope_theta` = {t} disagrees with rope_parameters.rope_theta = {theta}")
        theta = t
    if r.has("partial_rotary_factor"):
        p = r.float("partial_rotary_factor")
        if prf is not None and p != prf:
            raise r.err(
                f"`partial_rotary_factor` = {p} disagrees with rope_parameters.partial_rotary_factor = {prf}"
            )
        prf = p
    if theta is None:
        raise r.err("missing `rope_theta` (neither rope_parameters.rope_theta nor the legacy top-level key)")
    if prf is None:
        prf = 0.25  # the default of both transformers and mlx_lm
    if not theta > 0:
        raise r.err(f"rope_theta must be positive, got {theta}")
    if not 0.0 < prf <= 1.0:
        raise r.err(f"partial_rotary_factor must be in (0, 1], got {prf}")
    return theta, prf


def _layer_attention(r: _Reader, n_layers: int) -> List[str]:
    lt = r.d.get("layer_types")
    if lt is not None:
        if not isinstance(lt, list) or len(lt) != n_layers:
            raise r.err(f"`layer_types` must be a list of {n_layers} entries (num_hidden_layers), got {lt!r}")
        out = []
        for i, t in enumerate(lt):
            if t not in _LAYER_TYPE_NAMES:
                raise r.err(f"layer_types[{i}] = {t!r} is not supported (linear_attention or full_attention)")
            out.append(_LAYER_TYPE_NAMES[t])
        if r.has("full_attention_interval"):
            k = r.int("full_attention_interval")
            legacy = ["linear" if (i + 1) % k else "full" for i in range(n_layers)]
            if legacy != out:
                raise r.err(f"`layer_types` disagrees with full_attention_interval = {k}")
        return out
    k = r.int("full_attention_interval", 4)
    return ["linear" if (i + 1) % k else "full" for i in range(n_layers)]


def _layer_mlp(r: _Reader, mt: str, n_layers: int, num_experts: int) -> List[str]:
    if mt == "qwen3_next":
        only = r.d.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in only
        ):
            raise r.err(f"`mlp_only_layers` must be a list of layer indices, got {only!r}")
        bad = [i for i in only if not 0 <= i < n_layers]
        if bad:
            raise r.err(f"`mlp_only_layers` has indices outside [0, {n_layers}): {bad}")
        step = r.int("decoder_sparse_step", 1)
        return [
            "moe" if (i not in only and num_experts > 0 and (i + 1) % step == 0) else "dense"
            for i in range(n_layers)
        ]
    # Qwen3.5 MoE: every layer is sparse (transformers and mlx_lm ignore the Qwen3-Next keys)
    return ["moe" if num_experts > 0 else "dense"] * n_layers


def _parse(d: Dict[str, Any], source: str) -> ModelConfig:
    mt, td, wrapped = _text_dict(d, source)
    r = _Reader(td, source + (" text_config" if wrapped else ""))

    act = td.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise r.err(f"hidden_act {act!r} is not supported (only silu)")
    if r.bool("attention_bias", False):
        raise r.err("attention_bias = true is not supported (Qwen3-Next attention has no biases)")

    hidden = r.int("hidden_size")
    n_layers = r.int("num_hidden_layers")
    vocab = r.int("vocab_size")
    eps = r.float("rms_norm_eps", 1e-6)
    if not eps > 0:
        raise r.err(f"rms_norm_eps must be positive, got {eps}")

    n_heads = r.int("num_attention_heads")
    n_kv = r.int("num_key_value_heads", n_heads)
    head_dim = r.int("head_dim", hidden // n_heads if hidden % n_heads == 0 and hidden >= n_heads else None)
    if n_heads % n_kv:
        raise r.err(f"num_attention_heads = {n_heads} is not a multiple of num_key_value_heads = {n_kv}")
    theta, prf = _rope(r, mt)
    max_pos = r.int("max_position_embeddings", 32768)

    nk = r.int("linear_num_key_heads")
    nv = r.int("linear_num_value_heads")
    dk = r.int("linear_key_head_dim")
    dv = r.int("linear_value_head_dim")
    kernel = r.int("linear_conv_kernel_dim", 4)
    if nv % nk:
        raise r.err(f"linear_num_value_heads = {nv} is not a multiple of linear_num_key_heads = {nk}")
    if kernel != 4:
        raise r.err(f"linear_conv_kernel_dim = {kernel} is not supported (the conv op has kernel 4)")

    num_experts = r.int("num_experts", 0, minimum=0)
    attention = _layer_attention(r, n_layers)
    mlp = _layer_mlp(r, mt, n_layers, num_experts)
    any_moe = "moe" in mlp
    any_dense = "dense" in mlp
    top_k = r.int("num_experts_per_tok", 0 if not any_moe else None, minimum=0)
    moe_inter = r.int("moe_intermediate_size", 0 if not any_moe else None, minimum=0)
    shared_inter = r.int("shared_expert_intermediate_size", 0 if not any_moe else None, minimum=0)
    dense_inter = r.int("intermediate_size", 0 if not any_dense else None, minimum=0)
    if any_moe:
        if not 1 <= top_k <= num_experts:
            raise r.err(f"num_experts_per_tok = {top_k} must be in [1, num_experts = {num_experts}]")
        if moe_inter < 1:
            raise r.err("moe_intermediate_size must be positive for a model with MoE layers")
        if shared_inter < 1:
            raise r.err(
                "shared_expert_intermediate_size must be positive: MoE blocks without a shared expert "
                "are not supported"
            )
    if any_dense and dense_inter < 1:
        raise r.err("intermediate_size must be positive for a model with dense MLP layers")
    # Qwen3.5 always renormalises the top-k weights; transformers' Qwen3-Next default is true.
    norm_topk = True if mt != "qwen3_next" else r.bool("norm_topk_prob", True)

    if head_dim % 2:
        raise r.err(f"head_dim = {head_dim} must be even")
    rd = int(head_dim * prf)
    if rd < 2 or rd % 2 or rd > head_dim:
        raise r.err(
            f"rotary dim head_dim * partial_rotary_factor = {head_dim} * {prf} must be an even number in [2, head_dim]"
        )

    # tie_word_embeddings: the text settings win, then the wrapper's (mlx_lm reads text_config)
    tie_default = bool(d.get("tie_word_embeddings", False)) if wrapped else False
    tie = r.bool("tie_word_embeddings", tie_default)

    dtype = td.get("torch_dtype", td.get("dtype", d.get("torch_dtype", d.get("dtype"))))
    bos = td.get("bos_token_id", d.get("bos_token_id"))
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
        bos = None
    eos = _eos_list(td.get("eos_token_id", d.get("eos_token_id")), source)
    quant = d.get("quantization", td.get("quantization"))
    if quant is not None and not isinstance(quant, dict):
        raise ConfigError(f"{source}: `quantization` must be an object, got {quant!r}")

    layers = tuple(LayerSpec(i, attention[i], mlp[i]) for i in range(n_layers))
    return ModelConfig(
        model_type=mt,
        proj_layout=SUPPORTED_MODEL_TYPES[mt],
        wrapped=wrapped,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        vocab_size=vocab,
        rms_norm_eps=eps,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rope_theta=theta,
        partial_rotary_factor=prf,
        max_position_embeddings=max_pos,
        linear_num_key_heads=nk,
        linear_num_value_heads=nv,
        linear_key_head_dim=dk,
        linear_value_head_dim=dv,
        linear_conv_kernel_dim=kernel,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared_inter,
        intermediate_size=dense_inter,
        norm_topk_prob=norm_topk,
        tie_word_embeddings=tie,
        layers=layers,
        torch_dtype=dtype if isinstance(dtype, str) else None,
        bos_token_id=bos,
        eos_token_ids=eos,
        quantization=quant,
        raw=d,
    )
