"""The shipped demo model (``moeflux/demo_model``): reference logits, pinned greedy output, ``moeflux demo``.

The references run on the *dequantized* shipped weights, written back as a Hugging Face fp32 checkpoint
(the converter's row permutations of ``in_proj_qkvz``/``in_proj_ba`` undone, the norm ``+1`` fold taken
back out, the conv weight and the experts unpacked): mlx_lm loads it unquantized (always, mlx_lm is a test
dependency) and transformers runs it when torch is installed. Both see exactly the weights the engine
uses, so the only differences are float summation orders.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict

import ml_dtypes
import numpy as np
import pytest

import moeflux
from moeflux import ops
from moeflux.cli import main as cli_main
from moeflux.config import ModelConfig
from moeflux.convert import ba_row_permutation, qkvz_row_permutation
from moeflux.demo import DEMO_PROMPT, PACKAGED, demo_model_dir, describe_demo_model
from moeflux.model import Model

ABS_TOL = 1e-3
REL_TOL = 1e-4  # relative to the largest |logit|
CHUNK = 16  # the prompt crosses several prefill chunks

#: Python source the model has not been trained on as such (crosses chunks; ends on a token boundary).
LOGIT_PROMPT = (
    "import os\n\n\ndef count_lines(path):\n    \"\"\"Return the number of lines in the file at path.\"\"\"\n"
    "    with open(path) as f:\n        return sum(1 for _ in f)\n\n\nclass Point:\n    def __init__(self, x, y):"
)
GREEDY_PROMPT = "import os\n\n\ndef"
#: Greedy continuation of GREEDY_PROMPT by the shipped 4-bit model (generated once with moeflux, CPU). The
#: smallest top-1/top-2 logit gap along it is 0.099, far above float noise, so it is stable across machines.
GREEDY_16 = [428, 385, 63, 683, 63, 750, 8, 375, 12, 498, 502, 289, 278, 433, 2025, 335]
GREEDY_16_TEXT = ' _get_module_info(name, *args):\n    """Get the'

#: What the runtime needs, and nothing else (the package data stays small).
SHIPPED_FILES = {
    "moeflux.json", "config.json", "generation_config.json", "weights.bin", "weights.bin.json",
    "tokenizer.json", "tokenizer_config.json", "demo_info.json",
}
ZERO_CENTRED_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", ".q_norm.weight",
                      ".k_norm.weight")


# ---------------------------------------------------------------------------- dequantized checkpoint


def dequantized_hf_state(model_dir: Path) -> Dict[str, np.ndarray]:
    """The Hugging Face fp32 state dict (per-expert names) equal to a moeflux directory's weights."""
    meta = json.loads((model_dir / "moeflux.json").read_text())
    cfg = ModelConfig.load(model_dir)
    wf = moeflux.WeightFile(model_dir / "weights.bin")
    names = set(wf.names())
    out: Dict[str, np.ndarray] = {}

    def deq(module: str) -> np.ndarray:
        ref = wf.weight_ref(module)
        return np.asarray(
            moeflux.dequantize(wf.array(f"{module}.weight"), wf.array(f"{module}.scales"),
                               wf.array(f"{module}.biases"), group_size=ref.group_size, bits=ref.bits),
            dtype=np.float32,
        )

    def unpermute(rows: np.ndarray, perm: np.ndarray) -> np.ndarray:
        orig = np.empty_like(rows)
        orig[perm] = rows  # the converter stored rows[perm]
        return orig

    for name in sorted(names):
        if name.endswith((".scales", ".biases")):
            continue
        if wf.dtype(name) == "u32":  # a quantized matrix: NAME.weight + .scales + .biases
            module = name[: -len(".weight")]
            w = deq(module)
            if module.endswith("linear_attn.in_proj_qkvz"):
                w = unpermute(w, qkvz_row_permutation(cfg))
            elif module.endswith("linear_attn.in_proj_ba"):
                w = unpermute(w, ba_row_permutation(cfg))
            out[name] = w
            continue
        a = wf.array(name).astype(np.float32)
        if name.endswith("conv1d.weight"):
            a = a.reshape(a.shape[0], 1, a.shape[1])
        elif name == "model.norm.weight" or name.endswith(ZERO_CENTRED_NORMS):
            a = a - np.float32(1.0)  # exact: 1 + (s - 1) == s for s in [0.5, 2]
        out[name] = a

    lay = ops.ExpertLayout(**meta["expert_layout"])
    offs = lay.offsets()
    stride, bits, gs = meta["expert_stride"], lay.bits, lay.group_size
    sdt = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype(ml_dtypes.bfloat16)}[lay.scale_dtype]
    shapes = {"gate": (lay.inter_dim, lay.hidden_dim), "up": (lay.inter_dim, lay.hidden_dim),
              "down": (lay.hidden_dim, lay.inter_dim)}
    for layer, rel in meta["expert_files"].items():
        blob = (model_dir / rel).read_bytes()
        for e in range(cfg.num_experts):
            base = e * stride
            for part, (rows, cols) in shapes.items():
                r = offs[part]
                wq = np.frombuffer(blob, "<u4", rows * cols * bits // 32, base + r.w_off).reshape(rows, -1)
                s = np.frombuffer(blob, sdt, rows * cols // gs, base + r.s_off).reshape(rows, -1)
                b = np.frombuffer(blob, sdt, rows * cols // gs, base + r.b_off).reshape(rows, -1)
                w = moeflux.dequantize(wq, s, b, group_size=gs, bits=bits)
                out[f"model.layers.{layer}.mlp.experts.{e}.{part}_proj.weight"] = np.asarray(w, np.float32)
    return out


@pytest.fixture(scope="module")
def dequantized_dir(tmp_path_factory) -> Path:
    """The shipped weights, dequantized, as a Hugging Face fp32 checkpoint directory."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("demo-dequantized")
    save_file(dequantized_hf_state(PACKAGED), str(root / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (root / name).write_bytes((PACKAGED / name).read_bytes())
    return root


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.open("demo", chunk_size=CHUNK)


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    err = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    assert err < ABS_TOL and err / scale < REL_TOL, f"max abs err {err:.3g}, max |logit| {scale:.3g}"


# ---------------------------------------------------------------------------- the shipped directory


def test_demo_resolves_to_the_packaged_trained_model(model):
    assert demo_model_dir() == PACKAGED
    assert model.path.resolve() == PACKAGED.resolve()
    files = {p.relative_to(PACKAGED).as_posix() for p in PACKAGED.rglob("*") if p.is_file()}
    experts = {f for f in files if f.startswith("experts/")}
    assert files - experts == SHIPPED_FILES
    assert experts == {f"experts/layer_{i:03d}.bin" for i in range(model.config.num_hidden_layers)}
    info = json.loads((PACKAGED / "demo_info.json").read_text())
    meta = json.loads((PACKAGED / "moeflux.json").read_text())
    assert info["bits"] == meta["bits"] and info["group_size"] == meta["group_size"]
    # The shipped quantization costs at most a few percent of held-out loss.
    assert 0 < info["heldout_loss"] <= info["heldout_loss_quantized"] < 1.05 * info["heldout_loss"]
    assert "random-weight" not in describe_demo_model(PACKAGED)


# ---------------------------------------------------------------------------- references


def test_logits_match_mlx_lm_on_dequantized_weights(model, dequantized_dir):
    pytest.importorskip("mlx_lm")
    tm = pytest.importorskip("tiny_models")
    ids = model.encode(LOGIT_PROMPT)
    assert len(ids) > 3 * CHUNK
    _close(model.logits(ids), tm.mlx_logits(dequantized_dir, ids))


def test_logits_match_transformers_on_dequantized_weights(model, dequantized_dir):
    torch = pytest.importorskip("torch", reason="torch is not installed (CI): the mlx_lm check covers this")
    transformers = pytest.importorskip("transformers")
    ids = model.encode(LOGIT_PROMPT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.Qwen3NextForCausalLM.from_pretrained(str(dequantized_dir), dtype=torch.float32)
        hf.eval()
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    _close(model.logits(ids), ref)


# ---------------------------------------------------------------------------- generation


def test_greedy_completion_is_pinned(model):
    ids = model.encode(GREEDY_PROMPT)
    got = list(model.generate(ids, max_new_tokens=16, stop=[]))
    assert got == GREEDY_16, model.decode_text(got)
    assert model.decode_text(got) == GREEDY_16_TEXT
    # The same tokens with another prefill chunk size.
    whole = Model.open("demo", chunk_size=64)
    assert list(whole.generate(ids, max_new_tokens=16, stop=[])) == GREEDY_16


def test_demo_command_prints_a_completion(capsys):
    assert cli_main(["demo", "--max-tokens", "24"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(DEMO_PROMPT)
    completion = out[len(DEMO_PROMPT):]
    assert len(completion.strip()) > 10
    assert "demo model:" in err and "random-weight" not in err and "held-out loss" in err


def test_demo_command_reports_speed_and_memory_plan():
    # A subprocess: cli binds sys.stderr as a default argument at import, which capsys cannot redirect.
    r = subprocess.run([sys.executable, "-m", "moeflux", "demo", "--max-tokens", "8"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(DEMO_PROMPT) and len(r.stdout) > len(DEMO_PROMPT) + 5
    assert "memory plan" in r.stderr
    assert re.search(r"prefill \d+ tok in [\d.]+ s \([\d.]+ tok/s\), decode \d+ tok", r.stderr), r.stderr
