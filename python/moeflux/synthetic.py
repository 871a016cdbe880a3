"""Synthetic Qwen3-Next-family checkpoints in Hugging Face format, written with NumPy only.

Used by ``moeflux demo`` (a random-weight stand-in when no trained model is packaged), by the
benchmarks (real per-layer dims, few layers) and by the tests (tiny models compared with mlx_lm).
Every parameter is random: zero-centred norms are not zero (so ``1 + w`` matters), decays, gates and
routing are non-trivial, ``A_log`` and ``dt_bias`` are in realistic ranges. Quantized input dims
should be multiples of the group size.

* :func:`make_qwen3_next` -- Qwen3-Next (``qwen3_next``: ``in_proj_qkvz``/``in_proj_ba``, per-expert
  tensors, ``mtp.*`` extras); options for dense MLP layers, tied embeddings, transformers-v5 keys,
  bf16, sharding.
* :func:`make_qwen3_5_moe` -- Qwen3.5/3.6 MoE (``in_proj_qkv/z/b/a``): the vision-language wrapper
  (``model.language_model.`` prefix, nested ``text_config``, fused ``experts.gate_up_proj``, vision
  and ``mtp.*`` extras) or the flat text-only save with per-expert tensors.

The same ``seed`` gives the same weights whatever the layout options.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, Path]

EOS_ID = 256
VOCAB = 512


# ---------------------------------------------------------------------------- tokenizer


def _byte_alphabet() -> List[str]:
    """The GPT-2 byte-to-unicode table (byte-level BPE alphabet), in byte order."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def write_tokenizer(dst: PathLike) -> None:
    """A byte-level tokenizer: ids 0..255 are the bytes, 256 is ``<|endoftext|>`` (EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    dst = Path(dst)
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 4096,
                "clean_up_tokenization_spaces": False,
            },
            indent=1,
        )
    )


# ---------------------------------------------------------------------------- random weights


class _Rand:
    """Per-tensor seeded normal draws: a tensor's values depend only on (seed, name)."""

    def __init__(self, seed: int):
        self.seed = seed

    def gen(self, name: str) -> np.random.Generator:
        h = np.frombuffer(name.encode(), dtype=np.uint8).astype(np.uint64)
        key = int((h * np.arange(1, len(h) + 1, dtype=np.uint64) * np.uint64(2654435761)).sum() % (2**32))
        return np.random.default_rng([self.seed, key, len(name)])

    def normal(self, name: str, shape: Sequence[int], std: float, mean: float = 0.0) -> np.ndarray:
        return (mean + std * self.gen(name).standard_normal(shape)).astype(np.float32)

    def uniform(self, name: str, shape: Sequence[int], lo: float, hi: float) -> np.ndarray:
        return self.gen(name).uniform(lo, hi, shape).astype(np.float32)


def _text_settings(
    hidden: int,
    layers: int,
    vocab: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    nk: int,
    nv: int,
    dk: int,
    dv: int,
    experts: int,
    top_k: int,
    moe_inter: int,
    shared_inter: int,
    inter: int,
    interval: int,
    rope_theta: float,
    prf: float,
    eps: float,
) -> Dict[str, object]:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "linear_num_key_heads": nk,
        "linear_num_value_heads": nv,
        "linear_key_head_dim": dk,
        "linear_value_head_dim": dv,
        "linear_conv_kernel_dim": 4,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": moe_inter,
        "shared_expert_intermediate_size": shared_inter,
        "intermediate_size": inter,
        "rms_norm_eps": eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "max_position_embeddings": 4096,
        "bos_token_id": None,
        "eos_token_id": EOS_ID,
        "_interval": interval,
        "_rope_theta": rope_theta,
        "_prf": prf,
    }


def _gen_weights(
    s: Dict[str, object], kinds: List[str], moe: List[bool], seed: int, tie: bool
) -> Dict[str, np.ndarray]:
    """Canonical (Qwen3-Next HF names, per-expert, fused qkvz/ba) fp32 weights."""
    R = _Rand(seed)
    H, V = int(s["hidden_size"]), int(s["vocab_size"])
    nh, nkv, hd = int(s["num_attention_heads"]), int(s["num_key_value_heads"]), int(s["head_dim"])
    nk, nv, dk, dv = (
        int(s[k])
        for k in (
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
        )
    )
    E, inter, S, D = (
        int(s[k])
        for k in (
            "num_experts",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "intermediate_size",
        )
    )
    conv = 2 * nk * dk + nv * dv

    def lin(name: str, out: int, inp: int, gain: float = 1.0) -> None:
        w[name] = R.normal(name, (out, inp), gain / np.sqrt(inp))

    def norm(name: str, dim: int) -> None:  # zero-centred (HF stores w, the model uses 1 + w)
        w[name] = R.normal(name, (dim,), 0.2)

    w: Dict[str, np.ndarray] = {}
    w["model.embed_tokens.weight"] = R.normal("model.embed_tokens.weight", (V, H), 1.0)
    for i, kind in enumerate(kinds):
        p = f"model.layers.{i}"
        norm(f"{p}.input_layernorm.weight", H)
        norm(f"{p}.post_attention_layernorm.weight", H)
        if kind == "linear":
            la = f"{p}.linear_attn"
            lin(f"{la}.in_proj_qkvz.weight", 2 * nk * dk + 2 * nv * dv, H)
            lin(f"{la}.in_proj_ba.weight", 2 * nv, H, gain=2.0)
            w[f"{la}.conv1d.weight"] = R.normal(f"{la}.conv1d.weight", (conv, 1, 4), 0.5)
            w[f"{la}.A_log"] = np.log(R.uniform(f"{la}.A_log", (nv,), 1.0, 16.0))
            w[f"{la}.dt_bias"] = R.normal(f"{la}.dt_bias", (nv,), 0.5, mean=-1.0)
            w[f"{la}.norm.weight"] = R.normal(f"{la}.norm.weight", (dv,), 0.2, mean=1.0)
            lin(f"{la}.out_proj.weight", H, nv * dv)
        else:
            sa = f"{p}.self_attn"
            lin(f"{sa}.q_proj.weight", 2 * nh * hd, H)
            lin(f"{sa}.k_proj.weight", nkv * hd, H)
            lin(f"{sa}.v_proj.weight", nkv * hd, H)
            lin(f"{sa}.o_proj.weight", H, nh * hd)
            norm(f"{sa}.q_norm.weight", hd)
            norm(f"{sa}.k_norm.weight", hd)
        m = f"{p}.mlp"
        if moe[i]:
            lin(f"{m}.gate.weight", E, H, gain=3.0)
            for e in range(E):
                lin(f"{m}.experts.{e}.gate_proj.weight", inter, H)
                lin(f"{m}.experts.{e}.up_proj.weight", inter, H)
                lin(f"{m}.experts.{e}.down_proj.weight", H, inter)
            lin(f"{m}.shared_expert.gate_proj.weight", S, H)
            lin(f"{m}.shared_expert.up_proj.weight", S, H)
            lin(f"{m}.shared_expert.down_proj.weight", H, S)
            lin(f"{m}.shared_expert_gate.weight", 1, H, gain=2.0)
        else:
            lin(f"{m}.gate_proj.weight", D, H)
            lin(f"{m}.up_proj.weight", D, H)
            lin(f"{m}.down_proj.weight", H, D)
    norm("model.norm.weight", H)
    if not tie:
        lin("lm_head.weight", V, H)
    return w


def _save(dst: Path, tensors: Dict[str, np.ndarray], shards: int, dtype: str) -> None:
    from safetensors.numpy import save_file

    if dtype == "bfloat16":
        import ml_dtypes

        tensors = {
            k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v for k, v in tensors.items()
        }
    elif dtype == "float16":
        tensors = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}
    names = sorted(tensors)
    if shards <= 1:
        save_file(
            {k: np.ascontiguousarray(tensors[k]) for k in names},
            str(dst / "model.safetensors"),
            metadata={"format": "pt"},
        )
        return
    weight_map = {}
    per = (len(names) + shards - 1) // shards
    for si in range(shards):
        fname = f"model-{si + 1:05d}-of-{shards:05d}.safetensors"
        part = names[si * per : (si + 1) * per]
        save_file(
            {k: np.ascontiguousarray(tensors[k]) for k in part}, str(dst / fname), metadata={"format": "pt"}
        )
        weight_map.update({k: fname for k in part})
    total = sum(int(v.nbytes) for v in tensors.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )


def _layer_kinds(layers: int, interval: int) -> List[str]:
    return ["linear" if (i + 1) % interval else "full" for i in range(layers)]


def _extras(seed: int, H: int) -> Dict[str, np.ndarray]:
    """Multi-token-prediction tensors every real checkpoint carries (to be skipped)."""
    R = _Rand(seed + 1)
    return {
        "mtp.fc.weight": R.normal("mtp.fc", (H, 2 * H), 0.1),
        "mtp.norm.weight": R.normal("mtp.norm", (H,), 0.1),
        "mtp.layers.0.input_layernorm.weight": R.normal("mtp.l0", (H,), 0.1),
    }


# ---------------------------------------------------------------------------- builders


def make_qwen3_next(
    dst: PathLike,
    *,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 4,
    vocab: int = VOCAB,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int = 64,
    nk: int = 2,
    nv: int = 4,
    dk: int = 64,
    dv: int = 64,
    experts: int = 8,
    top_k: int = 2,
    moe_inter: int = 64,
    shared_inter: int = 128,
    inter: int = 128,
    interval: int = 4,
    mlp_only_layers: Iterable[int] = (),
    decoder_sparse_step: int = 1,
    tie: bool = False,
    v5_keys: bool = False,
    norm_topk_prob: bool = True,
    dtype: str = "float32",
    shards: int = 1,
    rope_theta: float = 1e6,
    partial_rotary_factor: float = 0.25,
    eps: float = 1e-6,
    mtp: bool = True,
    tokenizer: bool = True,
) -> Path:
    """Write a tiny Qwen3-Next checkpoint (HF layout) to ``dst`` and return it."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    s = _text_settings(
        hidden,
        layers,
        vocab,
        heads,
        kv_heads,
        head_dim,
        nk,
        nv,
        dk,
        dv,
        experts,
        top_k,
        moe_inter,
        shared_inter,
        inter,
        interval,
        rope_theta,
        partial_rotary_factor,
        eps,
    )
    only = sorted(set(mlp_only_layers))
    kinds = _layer_kinds(layers, interval)
    moe = [experts > 0 and i not in only and (i + 1) % decoder_sparse_step == 0 for i in range(layers)]
    w = _gen_weights(s, kinds, moe, seed, tie)
    if mtp:
        w.update(_extras(seed, hidden))
    cfg = {k: v for k, v in s.items() if not k.startswith("_")}
    cfg.update(
        {
            "architectures": ["Qwen3NextForCausalLM"],
            "model_type": "qwen3_next",
            "mlp_only_layers": only,
            "decoder_sparse_step": decoder_sparse_step,
            "norm_topk_prob": norm_topk_prob,
            "tie_word_embeddings": tie,
            "torch_dtype": dtype,
        }
    )
    if v5_keys:
        cfg["layer_types"] = ["linear_attention" if k == "linear" else "full_attention" for k in kinds]
        cfg["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "partial_rotary_factor": partial_rotary_factor,
        }
        cfg["dtype"] = cfg.pop("torch_dtype")
    else:
        cfg["full_attention_interval"] = interval
        cfg["rope_theta"] = rope_theta
        cfg["partial_rotary_factor"] = partial_rotary_factor
        cfg["rope_scaling"] = None
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    _save(dst, w, shards, dtype)
    if tokenizer:
        write_tokenizer(dst)
    return dst


def _split_qkvz(w: Dict[str, np.ndarray], la: str, nk: int, nv: int, dk: int, dv: int) -> None:
    """Turn fused per-key-head ``in_proj_qkvz`` / ``in_proj_ba`` into Qwen3.5's flat projections."""
    r = nv // nk
    qkvz = w.pop(f"{la}.in_proj_qkvz.weight").reshape(nk, 2 * dk + 2 * r * dv, -1)
    q, k = qkvz[:, :dk], qkvz[:, dk : 2 * dk]
    v, z = qkvz[:, 2 * dk : 2 * dk + r * dv], qkvz[:, 2 * dk + r * dv :]
    H = qkvz.shape[-1]
    w[f"{la}.in_proj_qkv.weight"] = np.concatenate([q.reshape(-1, H), k.reshape(-1, H), v.reshape(-1, H)])
    w[f"{la}.in_proj_z.weight"] = np.ascontiguousarray(z.reshape(-1, H))
    ba = w.pop(f"{la}.in_proj_ba.weight").reshape(nk, 2 * r, H)
    w[f"{la}.in_proj_b.weight"] = np.ascontiguousarray(ba[:, :r].reshape(-1, H))
    w[f"{la}.in_proj_a.weight"] = np.ascontiguousarray(ba[:, r:].reshape(-1, H))


def make_qwen3_5_moe(
    dst: PathLike,
    *,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 4,
    vocab: int = VOCAB,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int = 64,
    nk: int = 2,
    nv: int = 4,
    dk: int = 64,
    dv: int = 64,
    experts: int = 8,
    top_k: int = 2,
    moe_inter: int = 64,
    shared_inter: int = 128,
    interval: int = 4,
    wrapper: bool = True,
    fused_experts: Optional[bool] = None,
    tie: bool = False,
    dtype: str = "float32",
    shards: int = 1,
    rope_theta: float = 1e6,
    partial_rotary_factor: float = 0.25,
    eps: float = 1e-6,
    extras: bool = True,
    tokenizer: bool = True,
) -> Path:
    """Write a tiny Qwen3.5/3.6 MoE checkpoint. ``wrapper=True``: the hub's vision-language layout
    (``model_type`` qwen3_5_moe, ``text_config``, ``model.language_model.`` names, fused experts by
    default, vision and mtp tensors); ``wrapper=False``: a flat ``qwen3_5_moe_text`` save with
    per-expert tensors by default."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if fused_experts is None:
        fused_experts = wrapper
    s = _text_settings(
        hidden,
        layers,
        vocab,
        heads,
        kv_heads,
        head_dim,
        nk,
        nv,
        dk,
        dv,
        experts,
        top_k,
        moe_inter,
        shared_inter,
        0,
        interval,
        rope_theta,
        partial_rotary_factor,
        eps,
    )
    kinds = _layer_kinds(layers, interval)
    w = _gen_weights(s, kinds, [True] * layers, seed, tie)
    for i, kind in enumerate(kinds):
        if kind == "linear":
            _split_qkvz(w, f"model.layers.{i}.linear_attn", nk, nv, dk, dv)
        if fused_experts:
            m = f"model.layers.{i}.mlp"
            gate = [w.pop(f"{m}.experts.{e}.gate_proj.weight") for e in range(experts)]
            up = [w.pop(f"{m}.experts.{e}.up_proj.weight") for e in range(experts)]
            down = [w.pop(f"{m}.experts.{e}.down_proj.weight") for e in range(experts)]
            w[f"{m}.experts.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)])
            w[f"{m}.experts.down_proj"] = np.stack(down)
    text = {k: v for k, v in s.items() if not k.startswith("_")}
    text.pop("intermediate_size")
    text.update(
        {
            "model_type": "qwen3_5_moe_text",
            "layer_types": ["linear_attention" if k == "linear" else "full_attention" for k in kinds],
            "full_attention_interval": interval,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": rope_theta,
                "partial_rotary_factor": partial_rotary_factor,
                "mrope_section": [3, 3, 2],
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": tie,
            "dtype": dtype,
        }
    )
    if wrapper:
        w = {
            (k if k == "lm_head.weight" else "model.language_model." + k[len("model.") :]): v
            for k, v in w.items()
        }
        if extras:
            w.update(_extras(seed, hidden))
            R = _Rand(seed + 2)
            w["model.visual.patch_embed.proj.weight"] = R.normal("vis.patch", (32, 3, 2, 4, 4), 0.1)
            w["model.visual.blocks.0.norm1.weight"] = R.normal("vis.norm", (32,), 0.1)
        cfg = {
            "architectures": ["Qwen3_5MoeForConditionalGeneration"],
            "model_type": "qwen3_5_moe",
            "text_config": text,
            "vision_config": {"model_type": "qwen3_5_moe_vision", "hidden_size": 32, "depth": 1},
            "tie_word_embeddings": tie,
            "image_token_id": vocab - 4,
            "video_token_id": vocab - 3,
            "vision_start_token_id": vocab - 2,
            "vision_end_token_id": vocab - 1,
        }
    else:
        if extras:
            w.update(_extras(seed, hidden))
        cfg = dict(text)
        cfg["architectures"] = ["Qwen3_5MoeForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    _save(dst, w, shards, dtype)
    if tokenizer:
        write_tokenizer(dst)
    return dst


def make(kind: str, dst: PathLike, **kw) -> Path:
    """``make_qwen3_next`` (kind ``"next"``) or ``make_qwen3_5_moe`` (kind ``"q35"``)."""
    if kind == "next":
        return make_qwen3_next(dst, **kw)
    if kind == "q35":
        return make_qwen3_5_moe(dst, **kw)
    raise ValueError(f"unknown tiny model kind {kind!r} (next or q35)")
