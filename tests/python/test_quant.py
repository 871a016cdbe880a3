"""Bit-exactness of `moeflux.quantize` / `moeflux.dequantize` against `mx.quantize` / `mx.dequantize`
(MLX affine mode, CPU).

What MLX does (mlx 0.32.x, `mlx/backend/cpu/quantized.cpp` and `affine_dequantize` in `mlx/ops.cpp`;
checked numerically by the `test_mlx_*` tests below, which need only mlx):

* quantize, for every input dtype, works in float32: bf16/f16 elements are widened, then per group
  `w_max, w_min`; `s = max((w_max - w_min) / (2^b - 1), 1e-7)`, negated unless `|w_min| > |w_max|`;
  `edge = w_min if |w_min| > |w_max| else w_max`; `q0 = rint(edge / s)`; if `q0 != 0`: `s = edge / q0`,
  `bias = edge`, else `bias = 0`; codes `clip(rint((w - bias) / s), 0, 2^b - 1)` with a true f32
  division per element and round-half-to-even. The codes use the float32 `s` and `bias`; only the
  returned scales/biases are rounded (nearest even) to the input dtype. No flush-to-zero.
* dequantize returns the scales' dtype. float32: `fl(fl(q * s) + b)` (no FMA). bf16/f16: the
  product and the sum are each rounded to the dtype: `T(f32(T(q * s)) + b)`.
* Codes form a little-endian bit stream per row (element c at bits [c*b, (c+1)*b) of the row's
  uint32 words), so 3- and 6-bit codes straddle words.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
ml_dtypes = pytest.importorskip("ml_dtypes")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), BF16, np.dtype(np.float16)]
DTYPE_IDS = ["f32", "bf16", "f16"]
BITS = [4, 8]
GROUPS = [32, 64, 128]


# ---- conversions between NumPy and MLX ----------------------------------------------------------


def to_mx(w: np.ndarray):
    if w.dtype == BF16:
        return mx.array(w.view(np.uint16)).view(mx.bfloat16)
    return mx.array(w)


def from_mx(a) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).view(BF16)
    return np.array(a)


def raw_bits(a: np.ndarray) -> np.ndarray:
    """The bit patterns, so that -0.0 != 0.0 and NaN == NaN compare as MLX stores them."""
    a = np.asarray(a)
    if a.dtype.itemsize == 2:
        return a.view(np.uint16)
    if a.dtype.itemsize == 4:
        return a.view(np.uint32)
    raise TypeError(a.dtype)


def assert_same_bits(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = raw_bits(got) != raw_bits(want)
    assert not diff.any(), f"{what}: {int(diff.sum())} of {diff.size} differ, first at {np.argwhere(diff)[0]}"


def mlx_quantize(w: np.ndarray, group_size: int, bits: int):
    wq, s, b = mx.quantize(to_mx(w), group_size=group_size, bits=bits)
    return np.array(wq), from_mx(s), from_mx(b)


def mlx_dequantize(wq, s, b, group_size: int, bits: int) -> np.ndarray:
    return from_mx(mx.dequantize(mx.array(wq), to_mx(s), to_mx(b), group_size=group_size, bits=bits))


# ---- a NumPy model of MLX's algorithm (the executable spec the binding must match) ---------------


def model_quantize(w: np.ndarray, group_size: int, bits: int):
    dtype = w.dtype
    lead, cols = w.shape[:-1], w.shape[-1]
    f = w.astype(np.float32).reshape(-1, group_size)
    n_bins = np.float32((1 << bits) - 1)
    w_max, w_min = f.max(axis=1), f.min(axis=1)
    mask = np.abs(w_min) > np.abs(w_max)
    s = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7)).astype(np.float32)
    s = np.where(mask, s, -s).astype(np.float32)
    edge = np.where(mask, w_min, w_max).astype(np.float32)
    q0 = np.rint(edge / s).astype(np.float32)
    nz = q0 != 0
    s = np.where(nz, edge / np.where(nz, q0, np.float32(1)), s).astype(np.float32)
    bias = np.where(nz, edge, np.float32(0)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint((f - bias[:, None]) / s[:, None]), 0, n_bins).astype(np.uint64)
    # little-endian bit stream per row
    q = q.reshape(-1, cols)
    bit_planes = ((q[:, :, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    words = np.packbits(bit_planes.reshape(q.shape[0], -1), axis=1, bitorder="little").view("<u4")
    return (
        words.astype(np.uint32).reshape(*lead, cols * bits // 32),
        s.astype(dtype).reshape(*lead, cols // group_size),
        bias.astype(dtype).reshape(*lead, cols // group_size),
    )


def model_dequantize(wq: np.ndarray, s: np.ndarray, b: np.ndarray, group_size: int, bits: int):
    dtype = s.dtype
    lead, words = wq.shape[:-1], wq.shape[-1]
    cols = words * 32 // bits
    stream = np.unpackbits(
        np.ascontiguousarray(wq.reshape(-1, words)).view(np.uint8), axis=1, bitorder="little"
    )
    planes = stream.reshape(-1, cols, bits).astype(np.uint32)
    q = (planes << np.arange(bits, dtype=np.uint32)).sum(axis=-1).astype(np.float32)
    q = q.reshape(-1, cols // group_size, group_size)
    sf = s.astype(np.float32).reshape(-1, cols // group_size, 1)
    bf = b.astype(np.float32).reshape(-1, cols // group_size, 1)
    with np.errstate(over="ignore"):
        if dtype == np.float32:
            out = q * sf + bf  # two f32 roundings, as NumPy does not fuse
        else:
            out = ((q * sf).astype(dtype).astype(np.float32) + bf).astype(dtype)
    return out.astype(dtype).reshape(*lead, cols)


# ---- test data ---------------------------------------------------------------------------------


def special_matrix(rng: np.random.Generator, rows: int, cols: int, group_size: int, dtype) -> np.ndarray:
    """Random rows plus groups that are all zero, constant, single-outlier (both signs),
    negative-dominated (positive scale) and tiny (scale clamped to 1e-7)."""
    w = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 1, (rows, 1))
    g = group_size
    if rows >= 8:
        w[0, :g] = 0.0
        w[1, :g] = 0.3
        w[2, 5] = 40.0
        w[3, 7] = -40.0
        w[4, :g] = -np.abs(w[4, :g]) - 1.0
        w[5, :g] = w[5, :g] * 1e-9
        w[6, :g] = -2.5
        w[7, g - 1] = 1e4
    return w.astype(dtype)


@st.composite
def hypothesis_matrix(draw, dtype, group_size):
    """A [rows, cols] matrix assembled group by group from varied group kinds."""
    rows = draw(st.integers(1, 3))
    groups_per_row = draw(st.integers(1, 3))
    # |x| <= 1e4 keeps every dtype finite (f16 max 65504) including dequantized overshoot.
    finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=True, width=32)
    kinds = st.sampled_from(["random", "constant", "zeros", "outlier", "negative", "small"])
    out = []
    for _ in range(rows * groups_per_row):
        kind = draw(kinds)
        if kind == "random":
            grp = draw(st.lists(finite, min_size=group_size, max_size=group_size))
        elif kind == "constant":
            grp = [draw(finite)] * group_size
        elif kind == "zeros":
            grp = [draw(st.sampled_from([0.0, -0.0]))] * group_size
        elif kind == "outlier":
            base = draw(st.floats(-1, 1, width=32))
            grp = [base] * group_size
            grp[draw(st.integers(0, group_size - 1))] = draw(finite)
        elif kind == "negative":
            grp = [-abs(x) for x in draw(st.lists(finite, min_size=group_size, max_size=group_size))]
        else:
            small = st.floats(-(2.0**-20), 2.0**-20, allow_subnormal=True, width=32)
            grp = draw(st.lists(small, min_size=group_size, max_size=group_size))
        out.extend(grp)
    return np.array(out, dtype=np.float32).reshape(rows, groups_per_row * group_size).astype(dtype)


HYP = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---- the MLX side on its own (runs without the binding) ------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mlx_matches_documented_model(dtype, group_size, bits):
    rng = np.random.default_rng([bits, group_size, DTYPES.index(dtype)])
    w = special_matrix(rng, 16, 4 * group_size, group_size, dtype)
    wq, s, b = mlx_quantize(w, group_size, bits)
    mq, ms, mb = model_quantize(w, group_size, bits)
    assert_same_bits(wq, mq, "wq")
    assert_same_bits(s, ms, "scales")
    assert_same_bits(b, mb, "biases")
    assert_same_bits(
        mlx_dequantize(wq, s, b, group_size, bits), model_dequantize(wq, s, b, group_size, bits), "deq"
    )


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=["bf16", "f16"])
def test_mlx_codes_use_unrounded_f32_scale(dtype):
    """Codes computed from the dtype-rounded scale/bias differ from MLX's: the model above must
    keep the f32 values for the codes."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((32, 256)) + 1.0).astype(dtype)
    wq, s, b = mlx_quantize(w, 64, 4)
    f = w.astype(np.float32).reshape(-1, 64)
    sf, bf = s.astype(np.float32).reshape(-1, 1), b.astype(np.float32).reshape(-1, 1)
    q = np.clip(np.rint((f - bf) / sf), 0, 15).astype(np.uint64).reshape(32, 256)
    packed = np.zeros((32, 32), np.uint64)
    for k in range(8):
        packed |= q[:, k::8] << np.uint64(4 * k)
    assert not np.array_equal(packed.astype(np.uint32), wq)


def test_mlx_dequant_rounds_each_step_in_half_dtypes():
    """bf16 dequantization is not one rounding of the exact (or f32) result."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 256)).astype(BF16)
    wq, s, b = mlx_quantize(w, 64, 8)
    got = mlx_dequantize(wq, s, b, 64, 8)
    q = model_dequantize(wq, np.ones_like(s, dtype=np.float32), np.zeros_like(b, dtype=np.float32), 64, 8)
    one_rounding = q.reshape(64, 4, 64) * s.astype(np.float32)[..., None] + b.astype(np.float32)[..., None]
    one_rounding = one_rounding.reshape(64, 256).astype(BF16)
    assert not np.array_equal(raw_bits(got), raw_bits(one_rounding))
    assert_same_bits(got, model_dequantize(wq, s, b, 64, 8), "deq")


# ---- the binding -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moeflux():
    try:
        import moeflux as m
    except ImportError as e:  # pragma: no cover - until the extension is built
        pytest.skip(f"moeflux extension not importable: {e}")
    if not hasattr(m, "quantize") or not hasattr(m, "dequantize"):
        pytest.skip("moeflux has no quantize/dequantize binding yet")
    return m


def check_against_mlx(moeflux, w: np.ndarray, group_size: int, bits: int):
    wq, s, b = moeflux.quantize(w, group_size=group_size, bits=bits)
    xq, xs, xb = mlx_quantize(w, group_size, bits)
    assert_same_bits(wq, xq, "wq")
    assert_same_bits(s, xs, "scales")
    assert_same_bits(b, xb, "biases")
    assert s.dtype == w.dtype and b.dtype == w.dtype
    got = moeflux.dequantize(wq, s, b, group_size=group_size, bits=bits)
    assert got.dtype == w.dtype
    assert_same_bits(got, mlx_dequantize(xq, xs, xb, group_size, bits), "dequantize")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_bit_exact_random(moeflux, dtype, group_size, bits):
    rng = np.random.default_rng([bits, group_size, DTYPES.index(dtype), 1])
    for rows, cols in [(1, group_size), (16, 4 * group_size), (33, 12 * group_size)]:
        w = special_matrix(rng, rows, cols, group_size, dtype)
        check_against_mlx(moeflux, w, group_size, bits)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_batched_shape(moeflux, dtype):
    """[..., rows, cols] inputs (stacked experts) keep their leading dims."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((3, 2, 8, 128)).astype(dtype)
    wq, s, b = moeflux.quantize(w, group_size=64, bits=4)
    assert wq.shape == (3, 2, 8, 16) and wq.dtype == np.uint32
    assert s.shape == b.shape == (3, 2, 8, 2)
    check_against_mlx(moeflux, w, 64, 4)


def test_dequantize_of_mlx_output(moeflux):
    """dequantize accepts MLX-produced arrays (e.g. from an mlx-community checkpoint)."""
    rng = np.random.default_rng(12)
    for dtype in DTYPES:
        w = rng.standard_normal((8, 256)).astype(dtype)
        wq, s, b = mlx_quantize(w, 64, 4)
        assert_same_bits(
            moeflux.dequantize(wq, s, b, group_size=64, bits=4), mlx_dequantize(wq, s, b, 64, 4), "deq"
        )


def test_defaults_are_mlx_defaults(moeflux):
    w = np.random.default_rng(13).standard_normal((4, 128)).astype(np.float32)
    wq, s, b = moeflux.quantize(w)
    xq, xs, xb = mx.quantize(mx.array(w))
    assert_same_bits(wq, np.array(xq), "wq")
    assert_same_bits(s, np.array(xs), "scales")
    assert_same_bits(moeflux.dequantize(wq, s, b), np.array(mx.dequantize(xq, xs, xb)), "deq")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_bit_exact_hypothesis(moeflux, dtype, group_size, bits):
    @HYP
    @given(w=hypothesis_matrix(dtype, group_size))
    def run(w):
        check_against_mlx(moeflux, w, group_size, bits)

    run()


def test_errors(moeflux):
    w = np.zeros((4, 96), np.float32)
    with pytest.raises(moeflux.MoefluxError):
        moeflux.quantize(w, group_size=64, bits=4)  # 96 % 64 != 0
    with pytest.raises(moeflux.MoefluxError):
        moeflux.quantize(np.zeros((4, 100), np.float32), group_size=32, bits=4)
    with pytest.raises(moeflux.MoefluxError):
        moeflux.quantize(np.zeros((4, 128), np.float32), group_size=64, bits=7)
    with pytest.raises(moeflux.MoefluxError):
        moeflux.quantize(np.zeros((4, 128), np.float32), group_size=16, bits=4)
    wq, s, b = moeflux.quantize(np.zeros((4, 128), np.float32), group_size=64, bits=4)
    with pytest.raises(moeflux.MoefluxError):
        moeflux.dequantize(wq, s[:, :1], b, group_size=64, bits=4)
    with pytest.raises(moeflux.MoefluxError):
        moeflux.dequantize(wq, s, b, group_size=32, bits=4)


# ---- the constants embedded in the Rust unit test (src/weights/quant.rs, GOLDEN) ----------------

_M64 = (1 << 64) - 1


def golden_input() -> np.ndarray:
    """`golden_input()` of the Rust test: xorshift64 values in [-1, 1) (exact in f32), per-row
    powers of two, and special groups."""
    st_ = 0x9E3779B97F4A7C15
    exps = [0, -3, 4, -12, 2, 8, -1, -30]
    out = np.zeros((8, 384), np.float32)
    for r in range(8):
        for c in range(384):
            st_ ^= (st_ << 13) & _M64
            st_ ^= st_ >> 7
            st_ ^= (st_ << 17) & _M64
            v = np.float32(st_ >> 40) * np.float32(2.0**-23) - np.float32(1.0)
            out[r, c] = v * np.float32(2.0 ** exps[r])
    out[0, 0:128] = 0.0
    out[1, 128:256] = 0.75
    out[2, 0:128] *= np.float32(2.0**-10)
    out[2, 5] = 40.0
    out[3, 256:384] -= np.float32(2.0**-10)
    out[4, 128:256] = -3.5
    out[6, 0:128] += np.float32(0.25)
    out[6, 100] = -9.0
    return out


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & _M64
    return h


RUST_GOLDEN = {
    ("f32", 2, 32): 0x1A6B635DDBF6BD0C, ("f32", 2, 64): 0x6AC167BC9757DF44, ("f32", 2, 128): 0x209A05B73991549C,
    ("f32", 3, 32): 0x533AA18BDF3FF840, ("f32", 3, 64): 0xE6D4F373EB9A8853, ("f32", 3, 128): 0x6DD7B46F2FBA363C,
    ("f32", 4, 32): 0x20DCE61616338A55, ("f32", 4, 64): 0x5037887B00EB05E3, ("f32", 4, 128): 0x5845CC3A323A02EA,
    ("f32", 6, 32): 0xD69D925D4674A8C1, ("f32", 6, 64): 0x9F12E09DFA9FE518, ("f32", 6, 128): 0x5B89FE0DE1E74868,
    ("f32", 8, 32): 0xF87A64E4126CC0DB, ("f32", 8, 64): 0xCF961B8FC8F70577, ("f32", 8, 128): 0x883EA51FBCD3DC23,
    ("bf16", 2, 32): 0x6F5A8F9479CF727D, ("bf16", 2, 64): 0x8BCC0BD8F5530794, ("bf16", 2, 128): 0xACF034F7CC645524,
    ("bf16", 3, 32): 0x35B6AF46EAE15FDC, ("bf16", 3, 64): 0xE6C5265396DBBBEC, ("bf16", 3, 128): 0xE13A188A3D82E446,
    ("bf16", 4, 32): 0x0E6E3F06606B60DA, ("bf16", 4, 64): 0x8E51E9ACC4733101, ("bf16", 4, 128): 0x2871EDA2414AF4D1,
    ("bf16", 6, 32): 0x43D929FE303BCE40, ("bf16", 6, 64): 0x18436BD5D6DCF6B0, ("bf16", 6, 128): 0x103D2926433DDC5B,
    ("bf16", 8, 32): 0xCF817E6A93A4B97F, ("bf16", 8, 64): 0xC517CEDB7E5AFE00, ("bf16", 8, 128): 0xE97E4F78EB8727DF,
    ("f16", 2, 32): 0x61E6F5F72CC1103C, ("f16", 2, 64): 0xC2097788436E526D, ("f16", 2, 128): 0x1BCE4C76B25C578D,
    ("f16", 3, 32): 0x8999A1CF42623788, ("f16", 3, 64): 0x6067BC44251A2E7E, ("f16", 3, 128): 0xFF482CCABE5DF5AA,
    ("f16", 4, 32): 0x5570F62EA6093A0B, ("f16", 4, 64): 0x8CB3D2A70A7ABAF2, ("f16", 4, 128): 0x49909DBDD4F240F0,
    ("f16", 6, 32): 0x6A3B7980F7EBCF49, ("f16", 6, 64): 0x5B855771D9DE698C, ("f16", 6, 128): 0x28C30D290D06ADF6,
    ("f16", 8, 32): 0xE5FA19700D9ADC92, ("f16", 8, 64): 0xB74E80C1984336C9, ("f16", 8, 128): 0xFC0E5310165A256D,
}  # fmt: skip


def test_mlx_reproduces_rust_golden_hashes():
    """FNV-1a of `wq | scales | biases | mx.dequantize(...)` (raw little-endian bytes) for the Rust
    unit test's input: regenerates the constants `golden_hashes_match_mlx` checks."""
    base = golden_input()
    got = {}
    for name, dtype in zip(DTYPE_IDS, DTYPES):
        w = base.astype(dtype)
        for bits in [2, 3, 4, 6, 8]:
            for g in GROUPS:
                wq, s, b = mlx_quantize(w, g, bits)
                d = mlx_dequantize(wq, s, b, g, bits)
                got[(name, bits, g)] = fnv1a(
                    b"".join(np.ascontiguousarray(a).tobytes() for a in (wq, s, b, d))
                )
    bad = {k: hex(v) for k, v in got.items() if RUST_GOLDEN[k] != v}
    assert not bad, f"MLX output changed for: {bad}"
