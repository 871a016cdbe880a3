"""The model runtime end to end against mlx_lm on tiny random checkpoints.

Each case builds a random Hugging Face checkpoint (fp32, every parameter random), quantizes it with
mlx_lm, and compares moeflux's logits with mlx_lm's fp32 forward on the MLX directory: both from the
MLX directory opened directly and from `moeflux convert` of the original weights (the quantizer is
bit-exact, so the weights are the same). Prompts cross several prefill chunks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import moeflux
from moeflux.convert import convert
from moeflux.model import Model, ModelError

tm = pytest.importorskip("tiny_models")
pytest.importorskip("mlx_lm")

ABS_TOL = 1e-3
REL_TOL = 1e-4  # relative to the largest |logit|
PROMPT_LEN = 37  # crosses several chunks of CHUNK
CHUNK = 8
# Every config on the CPU; the emulated Metal backend (slower) on two of them.
EMU_CASES = ("next4", "qwen35")


def _backend_or_skip(name: str) -> None:
    try:
        moeflux.Backend(name)
    except moeflux.BackendError as e:
        pytest.skip(f"backend {name!r} unavailable: {e}")

CASES = {
    "next4": dict(kind="next", bits=4, group=64, kw={}),
    "next8": dict(kind="next", bits=8, group=64, kw={}),
    "next_dense_tied": dict(kind="next", bits=4, group=64, kw=dict(mlp_only_layers=(1,), tie=True, layers=4)),
    "next_g128": dict(kind="next", bits=4, group=128, kw=dict(hidden=256, dk=128, dv=128,
                                                                   head_dim=128, moe_inter=128, inter=256)),
    "qwen35": dict(kind="qwen35", bits=4, group=64, kw={}),
}


def _prompt(seed: int = 0, n: int = PROMPT_LEN) -> list:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 256, n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (mlx dir, moeflux dir converted from HF)."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(name: str):
        if name not in cache:
            case = CASES[name]
            make = tm.make_qwen3_next if case["kind"] == "next" else tm.make_qwen3_5_moe
            hf = make(root / f"{name}.hf", seed=hash(name) % 1000, **case["kw"])
            mlx = tm.mlx_quantize(hf, root / f"{name}.mlx", bits=case["bits"], group_size=case["group"])
            mf = root / f"{name}.mf"
            convert(hf, mf, bits=case["bits"], group_size=case["group"], progress=False)
            cache[name] = (mlx, mf)
        return cache[name]

    return get


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    err = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    assert err < ABS_TOL and err / scale < REL_TOL, f"max abs err {err:.3g}, max |logit| {scale:.3g}"


@pytest.mark.parametrize(
    "name,backend",
    [(n, "cpu") for n in CASES] + [(n, "metal-emu") for n in EMU_CASES] + [(n, "metal") for n in EMU_CASES],
)
def test_logits_match_mlx_lm(models, name, backend, monkeypatch):
    _backend_or_skip(backend)
    monkeypatch.setenv("MOEFLUX_CACHE", str(Path(models(name)[1]).parent / "cache"))
    mlx, mf = models(name)
    ids = _prompt()
    ref = tm.mlx_logits(mlx, ids)
    for path in (mf, mlx):  # converted from HF, and the MLX directory opened directly
        got = Model.open(path, backend=backend, chunk_size=CHUNK).logits(ids)
        _close(got, ref)


@pytest.mark.parametrize("name", ["next4", "qwen35"])
def test_greedy_32_tokens_match_mlx_lm(models, name):
    mlx, mf = models(name)
    ids = _prompt(1, 19)
    want = tm.mlx_greedy(mlx, ids, 32)
    m = Model.open(mf, chunk_size=CHUNK)
    got = list(m.generate(ids, max_new_tokens=32, stop=[]))
    # mlx_greedy stops at nothing; moeflux stops at EOS: compare the common prefix up to an EOS.
    n = len(got)
    assert got == want[:n]
    assert n == 32 or want[n] in m.config.eos_token_ids


def test_chunked_prefill_equals_token_by_token(models):
    _, mf = models("next4")
    ids = _prompt(2, 21)
    m = Model.open(mf, chunk_size=CHUNK)
    full = m.logits(ids)
    m.reset()
    rows = [m.decode(t) for t in ids]
    np.testing.assert_allclose(np.stack(rows), full, atol=1e-4, rtol=0)


def test_snapshot_restore_continues_exactly(models, tmp_path):
    _, mf = models("next4")
    ids = _prompt(3, 23)
    m = Model.open(mf, chunk_size=CHUNK)
    m.reset()
    m.prefill(ids[:15])
    snap = m.save_state(tmp_path / "state.bin")
    straight = [m.decode(t) for t in ids[15:]]
    m.reset()
    m.load_state(tmp_path / "state.bin")
    assert m.position == 15
    resumed = [m.decode(t) for t in ids[15:]]
    np.testing.assert_array_equal(np.stack(resumed), np.stack(straight))
    m.load_state(snap)
    np.testing.assert_array_equal(m.decode(ids[15]), straight[0])
    with pytest.raises(ModelError):
        m.load_state(snap[:-7])
    with pytest.raises(ModelError):
        m.load_state(b"not a snapshot at all")


@pytest.mark.parametrize("name", ["next4", "next_dense_tied"])
def test_moe_paths_and_delta_net_forms_agree(models, name):
    _, mf = models(name)
    ids = _prompt(4, 29)
    runs = {}
    for gather in (True, False):
        for form in ("chunkwise", "step"):
            m = Model.open(mf, chunk_size=CHUNK, moe_gather=gather, delta_net=form)
            runs[(gather, form)] = (m.logits(ids), list(m.generate(ids, max_new_tokens=12, stop=[])))
    base_logits, base_tokens = runs[(True, "chunkwise")]
    for key, (logits, tokens) in runs.items():
        assert tokens == base_tokens, key
        # Different summation orders (bucket vs gather, chunked vs sequential recurrence): f32 noise.
        err = float(np.abs(logits - base_logits).max())
        assert err <= 2e-5 * float(np.abs(base_logits).max()), (key, err)


def test_env_switches_select_the_paths(models, monkeypatch):
    _, mf = models("next4")
    monkeypatch.setenv("MOEFLUX_MOE_GATHER", "0")
    monkeypatch.setenv("MOEFLUX_DELTA_NET", "step")
    m = Model.open(mf, chunk_size=CHUNK)
    assert m.moe_gather is False and m.delta_net == "step"
    dump = m._concat(m._step(CHUNK, "all")).dump()
    assert "MoeBatchedPermuteFuse" in dump and "GatedDeltaNetStepNTokens" in dump
    assert "MoeGatherIdFuse" not in dump and "GatedDeltaNetChunkwise" not in dump


def test_text_generation_streams_and_stops(models):
    _, mf = models("next4")
    m = Model.open(mf, chunk_size=CHUNK)
    pieces = list(m.generate("def f(x):", max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=5))
    again = list(m.generate("def f(x):", max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=5))
    assert pieces == again and all(isinstance(p, str) for p in pieces)
    assert m.stats.prompt_tokens == len(m.encode("def f(x):"))
    assert m.stats.generated_tokens <= 10
    tokens = list(m.generate(m.encode("def f(x):"), max_new_tokens=4))
    if tokens:
        stopped = list(m.generate(m.encode("def f(x):"), max_new_tokens=4, stop=[tokens[0]]))
        assert stopped == []


def test_bad_requests_are_clear_errors(models, tmp_path):
    _, mf = models("next4")
    m = Model.open(mf, chunk_size=CHUNK)
    with pytest.raises(ModelError, match="outside the vocabulary"):
        m.logits([1, 2, 10**6])
    with pytest.raises(ModelError, match="max_seq_len"):
        Model.open(mf, chunk_size=CHUNK, max_seq_len=8).logits(_prompt(0, 9))
    with pytest.raises(moeflux.MoefluxError):
        Model.open(tmp_path)
    with pytest.raises(moeflux.MoefluxError):
        Model.open(tmp_path / "missing")


def test_decode_step_replays_without_rebuilding_ops(models, monkeypatch):
    """A decode step must not build Python op objects: count dataclass constructions."""
    _, mf = models("next4")
    m = Model.open(mf, chunk_size=CHUNK)
    m.prefill(_prompt(5, 9))
    m.decode(3)  # builds the n=1 graph once
    built = []
    for cls in (moeflux.ops.MatvecNTokens, moeflux.ops.RopeNTokens):
        orig = cls.__init__

        def spy(self, *a, _orig=orig, **k):
            built.append(type(self).__name__)
            _orig(self, *a, **k)

        monkeypatch.setattr(cls, "__init__", spy)
    for t in (4, 5, 6):
        m.decode(t)
    assert built == []
