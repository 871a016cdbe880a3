"""Test rig for per-op checks: a weight file, a backend opened on it, NaN-filled outputs with a
guard tail, and comparisons against the float64 reference with a per-op error record."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

import moeflux
from moeflux import ops

import reference as R

try:
    import ml_dtypes

    BF16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover - ml_dtypes is a test dependency
    BF16 = None

NP_DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": BF16}

# Elements appended to every output buffer; they must survive the op bit for bit.
GUARD = 5
NAN_BITS = np.uint32(0x7FC00001)  # a quiet NaN with a payload, compared bitwise
U32_FILL = np.uint32(0xFFFFFFFF)

# Largest relative error seen per op name, for the summary printed at the end of test_ops.
MAX_ERR: dict = {}

_UNAVAILABLE: dict = {}


def seed_of(*parts) -> int:
    """A stable seed for a test case."""
    return zlib.crc32(repr(parts).encode())


def cast_weights(values, dtype: str) -> np.ndarray:
    """`values` rounded to `dtype` ("f32" | "bf16" | "f16") as a NumPy array of that type."""
    return np.asarray(values, dtype=np.float64).astype(np.float32).astype(NP_DTYPES[dtype])


class Rig:
    """One backend on one weight file, for one test case."""

    def __init__(self, backend: str, tmp_path: Path, *seed_parts):
        self.backend_name = backend
        self.tmp_path = Path(tmp_path)
        self.rng = np.random.default_rng(seed_of(backend, *seed_parts))
        self.path = self.tmp_path / "weights.bin"
        self._floats: dict = {}
        self._quants: dict = {}
        self.be = None

    # ------------------------------------------------------------------ weights

    def add_float(self, name: str, values, dtype: str) -> np.ndarray:
        """Store a float vector in `dtype`; returns its stored values as float64."""
        arr = cast_weights(values, dtype)
        self._floats[name] = arr
        return arr.astype(np.float64)

    def add_quant(
        self, name: str, rows: int, cols: int, group_size: int, bits: int, scale_dtype: str, std: float = 0.1
    ) -> None:
        """Store a random `[rows, cols]` matrix quantized by `WeightWriter.add_quantized`."""
        m = cast_weights(self.rng.standard_normal((rows, cols)) * std, scale_dtype)
        self._quants[name] = (m, group_size, bits, scale_dtype)

    def open(self):
        """Write the weight file (if any weights) and open the backend on it; skips the test
        when the backend cannot be constructed."""
        if self.backend_name in _UNAVAILABLE:
            pytest.skip(_UNAVAILABLE[self.backend_name])
        weights = None
        if self._floats or self._quants:
            with moeflux.WeightWriter(str(self.path)) as w:
                for name, arr in self._floats.items():
                    w.add(name, arr)
                for name, (m, gs, bits, _) in self._quants.items():
                    w.add_quantized(name, m, group_size=gs, bits=bits)
            weights = str(self.path)
        try:
            self.be = moeflux.Backend(self.backend_name, weights=weights)
        except moeflux.BackendError as e:
            _UNAVAILABLE[self.backend_name] = f"backend {self.backend_name!r} unavailable: {e}"
            pytest.skip(_UNAVAILABLE[self.backend_name])
        return self.be

    def quant(self, name: str):
        """(WeightRef, dequantized float64 matrix) of a quantized weight, decoded from the raw
        bytes of the weight file at the offsets the backend reports."""
        m, gs, bits, sdt = self._quants[name]
        ref = self.be.weight_ref(name)
        assert (ref.bits, ref.group_size, ref.scale_dtype) == (bits, gs, sdt), ref
        blob = np.fromfile(self.path, dtype=np.uint8)
        rows, cols = m.shape
        deq = R.dequant_bytes(blob, ref.w_off, ref.s_off, ref.b_off, bits, gs, sdt, rows, cols)
        # Sanity: the decoded matrix is the stored one up to quantization error (catches offsets
        # or formats that are off while kernel and reference agree with each other).
        limit = 0.2 if bits == 4 else 0.02
        err = R.rel_err(deq, m.astype(np.float64))
        assert err < limit, f"{name}: dequantized file bytes differ from the matrix by {err:.3g}"
        return ref, deq

    # ------------------------------------------------------------------ buffers

    def inp(self, role: str, array, label: str = "", persistent: bool = False):
        """A buffer of `role` holding `array` (any dtype)."""
        array = np.ascontiguousarray(array)
        buf = self.be.alloc(max(array.nbytes, 4), role=role, label=label or role, persistent=persistent)
        self.be.upload(buf, array)
        return buf

    def out(self, role: str, n: int, dtype=np.float32, label: str = "", lead: int = 0):
        """An output buffer of `lead + n + GUARD` elements, all set to a NaN (f32) or all ones
        (u32), so unwritten elements and writes past the end both show."""
        total = lead + n + GUARD
        buf = self.be.alloc(total * 4, role=role, label=label or role)
        fill = np.full(total, U32_FILL if dtype == np.uint32 else NAN_BITS, dtype=np.uint32)
        self.be.upload(buf, fill)
        return buf

    def run(self, *op_list, label: str = "case"):
        self.be.execute(moeflux.Graph(list(op_list)), label=label)

    def get(self, buf, dtype=np.float32, n=None):
        if n is None:
            return self.be.download(buf, dtype=dtype)
        return self.be.download(buf, dtype=dtype, shape=(n,))

    # ------------------------------------------------------------------ checks

    def fetch_out(self, buf, n: int, dtype=np.float32, lead: int = 0) -> np.ndarray:
        """The `n` elements of an output made by `out`, after checking that the lead and guard
        elements are untouched."""
        raw = self.be.download(buf, dtype=np.uint32)
        fill = U32_FILL if dtype == np.uint32 else NAN_BITS
        outside = np.concatenate([raw[:lead], raw[lead + n :]])
        bad = np.flatnonzero(outside != fill)
        assert bad.size == 0, f"op wrote outside its range: {bad.size} elements, first at {bad[0]}"
        return raw[lead : lead + n].view(dtype).copy()

    def check(self, op_name: str, buf, ref, tol: float, what: str = "", lead: int = 0) -> float:
        """Relative error of output `buf` against `ref`; NaNs fail."""
        ref = np.asarray(ref, dtype=np.float64).ravel()
        got = self.fetch_out(buf, ref.size, lead=lead).astype(np.float64)
        return check_close(op_name, got, ref, tol, what)

    def check_exact(self, buf, expected, dtype=np.float32, what: str = "") -> None:
        """The whole buffer equals `expected` bit for bit (inputs that must not change, in-place
        regions that must not move)."""
        expected = np.ascontiguousarray(expected, dtype=dtype).ravel()
        got = self.be.download(buf, dtype=dtype, shape=(expected.size,))
        g8 = got.view(np.uint8).reshape(expected.size, -1)
        e8 = expected.view(np.uint8).reshape(expected.size, -1)
        diff = np.flatnonzero((g8 != e8).any(axis=1))
        assert diff.size == 0, (
            f"{what}: {diff.size} elements differ, first at {diff[0]}: {got[diff[0]]} != {expected[diff[0]]}"
        )


def check_close(op_name: str, got, ref, tol: float, what: str = "") -> float:
    got = np.asarray(got, dtype=np.float64).ravel()
    ref = np.asarray(ref, dtype=np.float64).ravel()
    assert got.shape == ref.shape
    nonfinite = np.flatnonzero(~np.isfinite(got))
    assert nonfinite.size == 0, (
        f"{op_name} {what}: {nonfinite.size} non-finite outputs, first at {nonfinite[0]}"
    )
    err = R.rel_err(got, ref)
    MAX_ERR[op_name] = max(MAX_ERR.get(op_name, 0.0), err)
    assert err < tol, (
        f"{op_name} {what}: relative error {err:.3e} >= {tol:.1e} (max abs diff {np.abs(got - ref).max():.3e})"
    )
    return err


def build_expert_blob(
    rng,
    n_blocks: int,
    stride: int,
    hidden: int,
    inter: int,
    bits: int,
    group_size: int,
    scale_dtype: str,
    std: float = 0.1,
):
    """A uint8 buffer of `n_blocks` expert blocks at `b * stride`, each quantized with
    `moeflux.quantize` and laid out with `ops.ExpertLayout(...).offsets()` (checked against the
    reference layout). Returns (blob, [(gate, up, down) dequantized float64 per block])."""
    layout = ops.ExpertLayout(hidden, inter, bits, group_size, scale_dtype)
    offs = layout.offsets()
    mine = R.expert_layout(hidden, inter, bits, group_size, scale_dtype)
    assert offs["block_bytes"] == mine["block_bytes"]
    for part in ("gate", "up", "down"):
        r = offs[part]
        assert (r.w_off, r.s_off, r.b_off) == mine[part], (part, r, mine[part])
    assert stride >= mine["block_bytes"]
    blob = np.full(n_blocks * stride, 0xA5, dtype=np.uint8)  # non-zero padding between blocks
    mats = []
    for b in range(n_blocks):
        base = b * stride
        for part, rows, cols in (("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)):
            m = cast_weights(rng.standard_normal((rows, cols)) * std, scale_dtype)
            wq, s, bi = moeflux.quantize(m, group_size=group_size, bits=bits)
            w_off, s_off, b_off = mine[part]
            for off, arr in ((w_off, wq), (s_off, s), (b_off, bi)):
                raw = np.ascontiguousarray(arr).view(np.uint8).ravel()
                blob[base + off : base + off + raw.size] = raw
            assert np.asarray(wq).dtype == np.uint32
            assert np.asarray(s).dtype == m.dtype, (np.asarray(s).dtype, m.dtype)
        mats.append(R.expert_weights(blob, base, hidden, inter, bits, group_size, scale_dtype))
    return blob, mats, layout
