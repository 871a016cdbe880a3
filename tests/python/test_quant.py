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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    stream = np.unpackbits(np.ascontiguousarray(wq.reshape(-1, words)).view(np.uint8), axis=1, bitorder="little")
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
    assert_same_bits(mlx_dequantize(wq, s, b, group_size, bits), model_dequantize(wq, s, b, group_size, bits), "deq")


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
        assert_same_bits(moeflux.dequantize(wq, s, b, group_size=64, bits=4), mlx_dequantize(wq, s, b, 64, 4), "deq")


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
