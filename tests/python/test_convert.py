"""`moeflux.convert`: checkpoint -> moeflux model directory.

The strongest check: for tiny random models of every supported layout, the quantized tensors and
expert blocks the converter writes from the Hugging Face weights are bit-identical to the tensors
of mlx_lm's own quantized MLX directory (after the documented row permutation, norm fold and
conv reshape), and converting that MLX directory gives byte-identical files. Expert blocks are
sliced with the engine's own `ExpertLayout.offsets()`. Without mlx, the same files are checked
against the HF weights with an independent formulation of each transformation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import moeflux
from moeflux import ops
from moeflux.checkpoint import Checkpoint, CheckpointError, canonical_name
from moeflux.config import ConfigError, ModelConfig
from moeflux.convert import (
    ConvertError,
    ModelDir,
    as_model_dir,
    ba_row_permutation,
    convert,
    expert_block_bytes,
    expert_stride,
    is_model_dir,
    qkvz_row_permutation,
)

import tiny_models as T

# name -> builder keyword arguments (all share seed 0 unless said otherwise)
VARIANTS = {
    "next": dict(kind="next"),
    "next_dense": dict(kind="next", mlp_only_layers=[0], decoder_sparse_step=2),
    "next_tied_sharded": dict(kind="next", tie=True, shards=3, seed=3),
    "next_bf16": dict(kind="next", dtype="bfloat16", seed=4),
    "q35": dict(kind="q35"),
}
# built on demand by name (not part of the mlx_lm matrix above)
MORE_VARIANTS = {"next_i128": dict(kind="next", moe_inter=128, seed=5)}


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Lazily built tiny checkpoints, cached for the session: models(name) -> Path."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(name: str, **override) -> Path:
        key = (name, tuple(sorted(override.items())))
        if key not in cache:
            kw = dict(VARIANTS.get(name, MORE_VARIANTS.get(name, {})), **override)
            kind = kw.pop("kind", "next")
            d = root / f"{name}-{len(cache)}"
            cache[key] = T.make_qwen3_next(d, **kw) if kind == "next" else T.make_qwen3_5_moe(d, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def mlx_dirs(models, tmp_path_factory):
    """mlx_lm-quantized twins: mlx_dirs(name, bits, group_size) -> Path."""
    root = tmp_path_factory.mktemp("mlx")
    cache = {}

    def get(name: str, bits: int, group_size: int = 64) -> Path:
        key = (name, bits, group_size)
        if key not in cache:
            cache[key] = T.mlx_quantize(models(name), root / f"{name}-{bits}-{group_size}", bits, group_size)
        return cache[key]

    return get


def weight_file(d: Path) -> moeflux.WeightFile:
    return moeflux.WeightFile(str(Path(d) / "weights.bin"))


def hf_tensors(d: Path) -> dict:
    with Checkpoint(d) as ck:
        return {n: ck.get(n) for n in ck.names()}


def assert_same_files(a: Path, b: Path) -> None:
    """Same weight blob, manifest and expert files, byte for byte."""
    assert (a / "weights.bin").read_bytes() == (b / "weights.bin").read_bytes()
    assert json.loads((a / "weights.bin.json").read_text()) == json.loads(
        (b / "weights.bin.json").read_text()
    )
    ea, eb = (
        sorted(p.name for p in (a / "experts").iterdir()),
        sorted(p.name for p in (b / "experts").iterdir()),
    )
    assert ea == eb
    for n in ea:
        assert (a / "experts" / n).read_bytes() == (b / "experts" / n).read_bytes(), n


def scale_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype({"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}[name])


def same_array(got: np.ndarray, want: np.ndarray) -> bool:
    """Exact equality including dtype (bf16 compared bitwise)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if got.dtype.itemsize == 2:
        return bool(np.array_equal(got.view(np.uint16), want.view(np.uint16)))
    return bool(
        np.array_equal(
            got.view(np.uint32) if got.dtype == np.float32 else got,
            want.view(np.uint32) if want.dtype == np.float32 else want,
        )
    )


def expert_part(blob: bytes, e: int, stride: int, ref, rows: int, cols: int, sdtype) -> tuple:
    """(wq, scales, biases) of one projection of expert e, sliced with the engine's offsets."""
    base = e * stride
    groups = cols // ref.group_size
    nw = rows * cols * ref.bits // 32
    wq = np.frombuffer(blob, np.uint32, nw, base + ref.w_off).reshape(rows, -1)
    s = np.frombuffer(blob, sdtype, rows * groups, base + ref.s_off).reshape(rows, groups)
    b = np.frombuffer(blob, sdtype, rows * groups, base + ref.b_off).reshape(rows, groups)
    return wq, s, b


def check_against_mlx(dst: Path, mlx_dir: Path) -> None:
    """Every tensor of mlx_lm's quantized directory appears in DST with identical bits, after the
    documented transformations; DST holds nothing else."""
    cfg = ModelConfig.load(dst)
    md = ModelDir.open(dst)
    wf = weight_file(dst)
    mt = T.mlx_tensors(mlx_dir)
    seen = set()
    perms = {"in_proj_qkvz": qkvz_row_permutation(cfg), "in_proj_ba": ba_row_permutation(cfg)}
    experts = {}
    for src, arr in mt.items():
        name = canonical_name(src)
        assert name is not None, src
        if ".switch_mlp." in name:
            experts[name] = arr
            continue
        want = arr
        module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if module in perms:
            want = arr[perms[module]]
        if name.endswith("conv1d.weight"):
            assert arr.shape[-1] == 1
            want = arr.reshape(arr.shape[0], arr.shape[1])
        if name.endswith(("A_log", "dt_bias")):
            want = arr.astype(np.float32)
        got = wf.array(name)
        assert same_array(got, want), name
        seen.add(name)
    assert seen == set(wf.names())
    # expert blocks
    lay = md.expert_layout
    sdtype = scale_dtype(lay["scale_dtype"])
    off = ops.ExpertLayout(**lay).offsets()
    assert off["block_bytes"] == expert_block_bytes(**lay)
    H, inter = cfg.hidden_size, cfg.moe_intermediate_size
    assert sorted(md.expert_files) == cfg.moe_layers
    for layer, path in md.expert_files.items():
        blob = path.read_bytes()
        assert len(blob) == cfg.num_experts * md.expert_stride
        for e in range(cfg.num_experts):
            for proj, (rows, cols) in (("gate", (inter, H)), ("up", (inter, H)), ("down", (H, inter))):
                got = expert_part(blob, e, md.expert_stride, off[proj], rows, cols, sdtype)
                base = f"model.layers.{layer}.mlp.switch_mlp.{proj}_proj"
                for g, part in zip(got, ("weight", "scales", "biases")):
                    assert same_array(g, experts[f"{base}.{part}"][e]), (layer, e, proj, part)
            pad = blob[e * md.expert_stride + off["block_bytes"] : (e + 1) * md.expert_stride]
            assert pad == b"\0" * len(pad)


# ---------------------------------------------------------------------------- against mlx_lm


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_hf_conversion_is_bit_identical_to_mlx_lm(models, mlx_dirs, tmp_path, name, bits):
    pytest.importorskip("mlx_lm")
    src = models(name)
    mlx_dir = mlx_dirs(name, bits)
    a = convert(src, tmp_path / "from_hf", bits=bits, progress=False)
    check_against_mlx(a, mlx_dir)
    b = convert(mlx_dir, tmp_path / "from_mlx", progress=False)
    assert_same_files(a, b)
    ma, mb = json.loads((a / "moeflux.json").read_text()), json.loads((b / "moeflux.json").read_text())
    assert ma.pop("source") == "hf" and mb.pop("source") == "mlx"
    assert ma == mb and ma["bits"] == bits
    assert json.loads((b / "config.json").read_text()) == json.loads((mlx_dir / "config.json").read_text())


@pytest.mark.parametrize("group_size", [32, 128])
def test_other_group_sizes_match_mlx_lm(models, mlx_dirs, tmp_path, group_size):
    pytest.importorskip("mlx_lm")
    src = models("next_i128")
    mlx_dir = mlx_dirs("next_i128", 4, group_size)
    a = convert(src, tmp_path / "a", bits=4, group_size=group_size, progress=False)
    check_against_mlx(a, mlx_dir)
    meta = json.loads((a / "moeflux.json").read_text())
    assert meta["group_size"] == group_size and meta["expert_layout"]["group_size"] == group_size
    # the router and the shared-expert gate stay at 8 bits, group 64, as mlx_lm does
    ref = weight_file(a).weight_ref("model.layers.0.mlp.gate")
    assert (ref.bits, ref.group_size) == (8, 64)
    assert_same_files(a, convert(mlx_dir, tmp_path / "b", progress=False))


def test_mlx_logits_of_the_fixture_are_usable(models, mlx_dirs):
    pytest.importorskip("mlx_lm")
    ids = list(range(3, 40))
    lg = T.mlx_logits(mlx_dirs("next", 4), ids)
    assert lg.shape == (len(ids), T.VOCAB) and lg.dtype == np.float32 and np.isfinite(lg).all()
    assert lg.std() > 0.1
    # the Qwen3.5 model with the same seed holds the same weights in its own layout
    np.testing.assert_array_equal(lg, T.mlx_logits(mlx_dirs("q35", 4), ids))
    greedy = T.mlx_greedy(mlx_dirs("next", 4), ids[:8], 6)
    assert len(greedy) == 6 and all(0 <= t < T.VOCAB for t in greedy)
    # cached decode agrees with the one-pass forward
    full = T.mlx_logits(mlx_dirs("next", 4), ids[:8] + greedy[:5])
    assert [int(t) for t in full[7:].argmax(-1)] == greedy
    for name in VARIANTS:  # mlx_lm loads and runs every fixture
        lg = T.mlx_logits(mlx_dirs(name, 4), ids)
        assert lg.shape == (len(ids), T.VOCAB) and np.isfinite(lg).all() and lg.std() > 0.1, name


# ---------------------------------------------------------------------------- against the HF weights


def quantized(wf, name):
    return wf.array(name + ".weight"), wf.array(name + ".scales"), wf.array(name + ".biases")


def assert_quantizes_to(wf, name, w, bits=4, group_size=64):
    want = moeflux.quantize(np.ascontiguousarray(w), group_size=group_size, bits=bits)
    got = quantized(wf, name)
    for g, x in zip(got, want):
        assert same_array(g, np.asarray(x)), name
    ref = wf.weight_ref(name)
    assert (ref.bits, ref.group_size) == (bits, group_size)


@pytest.mark.parametrize("bits", [4, 8])
def test_qwen3_next_against_hf_weights(models, tmp_path, bits):
    src = models("next")
    cfg = ModelConfig.load(src)
    hf = hf_tensors(src)
    dst = convert(src, tmp_path / "d", bits=bits, progress=False)
    wf = weight_file(dst)
    nk, dk, dv, r = (
        cfg.linear_num_key_heads,
        cfg.linear_key_head_dim,
        cfg.linear_value_head_dim,
        cfg.v_heads_per_k,
    )
    H = cfg.hidden_size
    # norms: HF `w` -> `1 + w` for the five zero-centred norms, exactly once; gated norm as is
    for name in [
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.2.post_attention_layernorm.weight",
        "model.layers.3.self_attn.q_norm.weight",
        "model.layers.3.self_attn.k_norm.weight",
    ]:
        np.testing.assert_array_equal(wf.array(name), hf[name] + np.float32(1))
    np.testing.assert_array_equal(
        wf.array("model.layers.1.linear_attn.norm.weight"), hf["model.layers.1.linear_attn.norm.weight"]
    )
    la = "model.layers.1.linear_attn"
    np.testing.assert_array_equal(wf.array(f"{la}.conv1d.weight"), hf[f"{la}.conv1d.weight"][:, 0, :])
    assert wf.array(f"{la}.conv1d.weight").shape == (cfg.conv_dim, 4)
    for n in ("A_log", "dt_bias"):
        assert wf.dtype(f"{la}.{n}") == "f32"
        np.testing.assert_array_equal(wf.array(f"{la}.{n}"), hf[f"{la}.{n}"])
    # in_proj_qkvz: per key head [q k v z] -> [Q all | K all | V all | Z all], written independently
    w = hf[f"{la}.in_proj_qkvz.weight"].reshape(nk, 2 * dk + 2 * r * dv, H)
    q, k, v, z = np.split(w, [dk, 2 * dk, 2 * dk + r * dv], axis=1)
    assert_quantizes_to(
        wf, f"{la}.in_proj_qkvz", np.concatenate([t.reshape(-1, H) for t in (q, k, v, z)]), bits
    )
    ba = hf[f"{la}.in_proj_ba.weight"].reshape(nk, 2 * r, H)
    assert_quantizes_to(
        wf, f"{la}.in_proj_ba", np.concatenate([ba[:, :r].reshape(-1, H), ba[:, r:].reshape(-1, H)]), bits
    )
    for n in (
        "model.embed_tokens",
        "lm_head",
        f"{la}.out_proj",
        "model.layers.3.self_attn.q_proj",
        "model.layers.3.self_attn.o_proj",
        "model.layers.2.mlp.shared_expert.down_proj",
    ):
        assert_quantizes_to(wf, n, hf[n + ".weight"], bits)
    for n in ("model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"):
        assert_quantizes_to(wf, n, hf[n + ".weight"], 8, 64)
    # the dequantized embedding is the original within one quantization step
    wq, s, b = quantized(wf, "model.embed_tokens")
    deq = np.asarray(moeflux.dequantize(wq, s, b, group_size=64, bits=bits), dtype=np.float64)
    step = np.abs(s).repeat(64, axis=1)
    assert (np.abs(deq - hf["model.embed_tokens.weight"]) <= step * 1.0001 + 1e-7).all()
    # experts: block e of layer l is [gate|up|down] x [w|s|b] of expert e
    md = ModelDir.open(dst)
    off = ops.ExpertLayout(**md.expert_layout).offsets()
    blob = md.expert_files[2].read_bytes()
    for e in (0, 5, 7):
        for proj, shape in (("gate", (64, H)), ("up", (64, H)), ("down", (H, 64))):
            got = expert_part(blob, e, md.expert_stride, off[proj], shape[0], shape[1], np.float32)
            want = moeflux.quantize(
                hf[f"model.layers.2.mlp.experts.{e}.{proj}_proj.weight"], group_size=64, bits=bits
            )
            for g, x in zip(got, want):
                np.testing.assert_array_equal(g, x)


def test_qwen35_separate_projections_equal_the_permuted_qwen3_next_rows(models, tmp_path):
    """Same seed: the Qwen3.5 model's flat in_proj_qkv/z/b/a are the row ranges of the Qwen3-Next
    model's permuted in_proj_qkvz/ba (quantization is row-wise, so row slices are exact)."""
    cfg = ModelConfig.load(models("next"))
    a = weight_file(convert(models("next"), tmp_path / "next", progress=False))
    b = weight_file(convert(models("q35"), tmp_path / "q35", progress=False))
    la = "model.layers.0.linear_attn"
    C, nv = cfg.conv_dim, cfg.linear_num_value_heads
    for part in ("weight", "scales", "biases"):
        qkvz, ba = a.array(f"{la}.in_proj_qkvz.{part}"), a.array(f"{la}.in_proj_ba.{part}")
        np.testing.assert_array_equal(qkvz[:C], b.array(f"{la}.in_proj_qkv.{part}"))
        np.testing.assert_array_equal(qkvz[C:], b.array(f"{la}.in_proj_z.{part}"))
        np.testing.assert_array_equal(ba[:nv], b.array(f"{la}.in_proj_b.{part}"))
        np.testing.assert_array_equal(ba[nv:], b.array(f"{la}.in_proj_a.{part}"))
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" not in b.names()
    # everything else, experts included, is identical
    names = [n for n in a.names() if "in_proj" not in n]
    for n in names:
        np.testing.assert_array_equal(a.array(n), b.array(n))
    for f in sorted((tmp_path / "next" / "experts").iterdir()):
        assert f.read_bytes() == (tmp_path / "q35" / "experts" / f.name).read_bytes()


def test_layout_variants_convert_identically(models, tmp_path):
    """v5 keys vs legacy keys; flat per-expert Qwen3.5 vs wrapped fused; sharded vs single file."""
    pairs = [
        (models("next"), models("next_v5", kind="next", v5_keys=True)),
        (models("next"), models("next_sh2", kind="next", shards=2)),
        (models("q35"), models("q35_flat", kind="q35", wrapper=False)),
        (models("q35"), models("q35_wrap_per_expert", kind="q35", fused_experts=False)),
    ]
    for i, (x, y) in enumerate(pairs):
        a = convert(x, tmp_path / f"a{i}", progress=False)
        b = convert(y, tmp_path / f"b{i}", progress=False)
        assert_same_files(a, b)


def test_bf16_source_keeps_bf16_and_folds_in_bf16(models, tmp_path):
    import ml_dtypes

    src = models("next_bf16")
    hf = hf_tensors(src)
    wf = weight_file(convert(src, tmp_path / "d", progress=False))
    n = "model.layers.0.input_layernorm.weight"
    assert wf.dtype(n) == "bf16" and wf.dtype("model.embed_tokens.scales") == "bf16"
    want = (hf[n].astype(np.float32) + 1).astype(ml_dtypes.bfloat16)
    assert same_array(wf.array(n), want)
    assert wf.dtype("model.layers.0.linear_attn.A_log") == "f32"
    meta = json.loads((tmp_path / "d" / "moeflux.json").read_text())
    assert meta["expert_layout"]["scale_dtype"] == "bf16"


def test_model_dir_contents(models, tmp_path):
    src = models("next_dense")
    dst = convert(src, tmp_path / "d", progress=False)
    cfg = ModelConfig.load(src)
    assert cfg.dense_layers == [0, 2] and cfg.moe_layers == [1, 3]
    md = ModelDir.open(dst)
    meta = md.meta
    assert meta["format"] == "moeflux-model" and meta["version"] == 1 and meta["source"] == "hf"
    assert (meta["bits"], meta["group_size"]) == (4, 64)
    assert meta["expert_layout"] == {
        "hidden_dim": 128,
        "inter_dim": 64,
        "bits": 4,
        "group_size": 64,
        "scale_dtype": "f32",
    }
    assert meta["expert_stride"] % 4096 == 0 and meta["expert_stride"] >= expert_block_bytes(
        **meta["expert_layout"]
    )
    assert meta["expert_stride"] == expert_stride(**meta["expert_layout"])
    assert meta["expert_files"] == {"1": "experts/layer_001.bin", "3": "experts/layer_003.bin"}
    assert meta["expert_file_bytes"] == 8 * meta["expert_stride"]
    assert meta["layers"] == ["linear_dense", "linear_moe", "linear_dense", "full_moe"]
    assert md.lm_head == "lm_head"
    assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    wf = weight_file(dst)
    assert "model.layers.0.mlp.gate_proj.weight" in wf.names()
    assert "model.layers.0.mlp.gate.weight" not in wf.names()
    assert not any(n.startswith("mtp") or ".experts." in n for n in wf.names())
    assert all(wf.offset(n) % 64 == 0 for n in wf.names())
    tied = ModelDir.open(convert(models("next_tied_sharded"), tmp_path / "t", progress=False))
    assert tied.lm_head == "model.embed_tokens"
    assert not any(n.startswith("lm_head") for n in weight_file(tied.path).names())


def test_progress_goes_to_stderr(models, tmp_path, capfd):
    convert(models("next"), tmp_path / "d", progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert "converting [" in err and "100.0%" in err and "converted" in err


# ---------------------------------------------------------------------------- bad checkpoints


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy checkpoint `src` to `dst` with `edit(tensors)` applied to its single safetensors file."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    edit(t)
    save_file(t, str(dst / "model.safetensors"))
    return dst


def assert_fails_cleanly(src, dst, exc, match, **kw):
    with pytest.raises(exc, match=match):
        convert(src, dst, progress=False, **kw)
    assert not dst.exists()
    assert not list(dst.parent.glob(dst.name + ".partial-*"))


def test_missing_tensor(models, tmp_path):
    src = rewrite(models("next"), tmp_path / "s", lambda t: t.pop("model.layers.1.linear_attn.A_log"))
    assert_fails_cleanly(
        src, tmp_path / "d", CheckpointError, "missing tensor `model.layers.1.linear_attn.A_log`"
    )


def test_missing_expert(models, tmp_path):
    src = rewrite(
        models("next"), tmp_path / "s", lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight")
    )
    assert_fails_cleanly(
        src, tmp_path / "d", CheckpointError, r"missing tensor `model\.layers\.2\.mlp\.experts\.5\.up"
    )


def test_missing_lm_head_of_untied_model(models, tmp_path):
    src = rewrite(models("next"), tmp_path / "s", lambda t: t.pop("lm_head.weight"))
    assert_fails_cleanly(src, tmp_path / "d", CheckpointError, "missing tensor `lm_head.weight`")


def test_wrong_shape(models, tmp_path):
    def edit(t):
        t["model.layers.3.self_attn.k_proj.weight"] = t["model.layers.3.self_attn.k_proj.weight"][:32]

    src = rewrite(models("next"), tmp_path / "s", edit)
    assert_fails_cleanly(
        src,
        tmp_path / "d",
        CheckpointError,
        r"`model\.layers\.3\.self_attn\.k_proj\.weight` has shape \[32, 128\], expected \[64, 128\]",
    )


def test_wrong_dtype(models, tmp_path):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)

    src = rewrite(models("next"), tmp_path / "s", edit)
    assert_fails_cleanly(src, tmp_path / "d", CheckpointError, "has dtype I32, expected a float")


def test_wrong_shape_in_qwen35_wrapper_names_the_source_tensor(models, tmp_path):
    def edit(t):
        k = "model.language_model.layers.1.mlp.experts.down_proj"
        t[k] = np.ascontiguousarray(t[k][:, :, :32])

    src = rewrite(models("q35"), tmp_path / "s", edit)
    assert_fails_cleanly(
        src,
        tmp_path / "d",
        CheckpointError,
        r"`model\.language_model\.layers\.1\.mlp\.experts\.down_proj` has shape \[8, 128, 32\]",
    )


def test_unexpected_tensor(models, tmp_path):
    def edit(t):
        t["model.layers.3.self_attn.q_proj.bias"] = np.zeros(256, np.float32)

    src = rewrite(models("next"), tmp_path / "s", edit)
    assert_fails_cleanly(
        src, tmp_path / "d", CheckpointError, r"1 tensor\(s\) the config does not account for .*q_proj\.bias"
    )


def test_truncated_safetensors(models, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(models("next"), src)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    assert_fails_cleanly(src, tmp_path / "d", CheckpointError, r"model\.safetensors: truncated or corrupt")
    f.write_bytes(data[:5])
    assert_fails_cleanly(src, tmp_path / "d", CheckpointError, "truncated or corrupt")


def test_missing_shard(models, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(models("next_tied_sharded"), src)
    (src / "model-00002-of-00003.safetensors").unlink()
    assert_fails_cleanly(src, tmp_path / "d", CheckpointError, "model-00002-of-00003.safetensors")


def test_index_lists_a_tensor_its_shard_lacks(models, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(models("next_tied_sharded"), src)
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00003.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert_fails_cleanly(src, tmp_path / "d", CheckpointError, "not in their shard")


def test_unknown_architecture(models, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(models("next"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert_fails_cleanly(src, tmp_path / "d", ConfigError, "unsupported architecture model_type='llama'")


def test_config_that_disagrees_with_the_weights(models, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(models("next"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["linear_value_head_dim"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    assert_fails_cleanly(src, tmp_path / "d", CheckpointError, "has shape")


def test_no_config_or_no_weights(tmp_path):
    (tmp_path / "s").mkdir()
    assert_fails_cleanly(tmp_path / "s", tmp_path / "d", ConfigError, "config.json")
    assert_fails_cleanly(tmp_path / "nowhere", tmp_path / "d", CheckpointError, "not a checkpoint directory")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(bits=3), "bits = 3 is not supported"),
        (dict(group_size=16), "group_size = 16 is not supported"),
        # moe_intermediate_size 64 is the input dim of the experts' down_proj
        (dict(group_size=128), "input dimension 64 is not a multiple of the group size 128"),
    ],
)
def test_unsupported_quantization(models, tmp_path, kw, match):
    assert_fails_cleanly(models("next"), tmp_path / "d", ConvertError, match, **kw)


def test_mlx_source_is_not_requantized(mlx_dirs, tmp_path):
    pytest.importorskip("mlx_lm")
    src = mlx_dirs("next", 4)
    assert_fails_cleanly(src, tmp_path / "d", ConvertError, "already quantized at 4 bits", bits=8)
    assert_fails_cleanly(src, tmp_path / "d", ConvertError, "group size 64", group_size=32)
    assert (
        json.loads((convert(src, tmp_path / "ok", bits=4, progress=False) / "moeflux.json").read_text())[
            "bits"
        ]
        == 4
    )


def test_two_files_with_the_same_tensors_are_rejected(models, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(models("q35"), src)
    shutil.copy(
        models("q35_flat", kind="q35", wrapper=False) / "model.safetensors", src / "model-flat.safetensors"
    )
    assert_fails_cleanly(src, tmp_path / "d", CheckpointError, r"tensor `lm_head\.weight` is in both")
    (src / "model-flat.safetensors").unlink()
    src2 = rewrite(
        models("q35"),
        tmp_path / "s2",
        lambda t: t.update({"model.embed_tokens.weight": t["model.language_model.embed_tokens.weight"]}),
    )
    assert_fails_cleanly(
        src2,
        tmp_path / "d",
        CheckpointError,
        r"`model\.embed_tokens\.weight` .* and `model\.language_model\.embed_tokens\.weight` .* both map to",
    )


def test_mixed_layout_is_rejected(models, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.gate.scales"] = np.ones((8, 2), np.float32)

    src = rewrite(models("next"), tmp_path / "s", edit)
    assert_fails_cleanly(src, tmp_path / "d", ConvertError, "mixed layout")


# ---------------------------------------------------------------------------- atomicity


def test_destination_exists(models, tmp_path):
    dst = tmp_path / "d"
    dst.mkdir()
    with pytest.raises(ConvertError, match="destination exists"):
        convert(models("next"), dst, progress=False)
    convert(models("next"), dst, progress=False, overwrite=True)
    assert is_model_dir(dst)
    convert(models("q35"), dst, progress=False, overwrite=True)
    assert ModelDir.open(dst).config.model_type == "qwen3_5_moe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_conversion_leaves_nothing(models, tmp_path, monkeypatch, exc):
    import moeflux.convert as C

    real = C._write_experts

    def failing(planner, tmp, bar):
        assert (tmp / "weights.bin").is_file()  # well into the conversion
        real(planner, tmp, bar)
        raise exc("interrupted")

    monkeypatch.setattr(C, "_write_experts", failing)
    with pytest.raises(exc):
        convert(models("next"), tmp_path / "d", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_conversion_never_leaves_an_openable_directory(models, tmp_path):
    dst = tmp_path / "d"
    script = textwrap.dedent(
        f"""
        import os, signal
        import moeflux.convert as C
        real = C._write_experts
        def killed(planner, tmp, bar):
            real(planner, tmp, bar)
            os.kill(os.getpid(), signal.SIGKILL)
        C._write_experts = killed
        C.convert({str(models("next"))!r}, {str(dst)!r}, progress=False)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not dst.exists()
    (partial,) = list(tmp_path.glob("d.partial-*"))
    assert (partial / "weights.bin").is_file() and not is_model_dir(partial)
    with pytest.raises(ConvertError, match="not a moeflux model directory"):
        ModelDir.open(partial)
    convert(models("next"), dst, progress=False)  # the next conversion succeeds and sweeps the stale one
    assert is_model_dir(dst) and not partial.exists()


def test_model_dir_open_checks_files(models, tmp_path):
    dst = convert(models("next"), tmp_path / "d", progress=False)
    with open(dst / "experts" / "layer_002.bin", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(ConvertError, match="expert file of layer 2 is 4096 bytes"):
        ModelDir.open(dst)
    with pytest.raises(ConvertError, match="checkpoint directory: convert it"):
        ModelDir.open(models("next"))


# ---------------------------------------------------------------------------- opening sources directly


def test_as_model_dir_converts_once_and_caches(models, mlx_dirs, tmp_path):
    pytest.importorskip("mlx_lm")
    src = mlx_dirs("q35", 4)
    cache = tmp_path / "cache"
    d = as_model_dir(src, cache_dir=cache)
    assert is_model_dir(d) and d.parent == cache / "converted"
    stamp = (d / "moeflux.json").stat().st_mtime_ns
    assert as_model_dir(src, cache_dir=cache) == d
    assert (d / "moeflux.json").stat().st_mtime_ns == stamp
    assert as_model_dir(d) == d  # a model directory is used as is
    assert_same_files(d, convert(models("q35"), tmp_path / "ref", progress=False))


def test_as_model_dir_default_cache_from_env(models, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFLUX_CACHE", str(tmp_path / "envcache"))
    d = as_model_dir(models("next"))
    assert str(d).startswith(str(tmp_path / "envcache"))
    with pytest.raises(CheckpointError, match="neither a moeflux model directory nor a checkpoint"):
        as_model_dir(tmp_path)


# ---------------------------------------------------------------------------- streaming


def test_peak_memory_is_a_small_multiple_of_the_largest_tensor(tmp_path):
    """Converting a model whose experts dwarf every other tensor never holds much more than a few
    tensors: traced peak well under the checkpoint size."""
    import tracemalloc

    src = T.make_qwen3_next(tmp_path / "s", experts=64, moe_inter=128, hidden=128, mtp=False, tokenizer=False)
    with Checkpoint(src) as ck:
        total = ck.total_bytes()
        largest = max(ck.nbytes(n) for n in ck.names())
    tracemalloc.start()
    try:
        convert(src, tmp_path / "d", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 40 * largest
    assert peak < 8 * largest, (peak, largest, total)
