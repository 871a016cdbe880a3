"""Every exception class is reachable with a useful message, and garbage never crashes: a
hypothesis fuzz loop over random ops and random field values only ever sees MoefluxError."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moeflux
from moeflux import _core, ops

ERRORS = [
    moeflux.GraphError,
    moeflux.SizeError,
    moeflux.RoleError,
    moeflux.WeightFileError,
    moeflux.BackendError,
]


def add(a, b, out, n=1, dim=2, label="add"):
    return ops.ResidualAddNTokens(a, b, out, n_tokens=n, dim=dim, label=label)


@pytest.fixture
def bufs(be):
    r = be.alloc(16, role="residual", label="r")
    a = be.alloc(16, role="act", label="a")
    o = be.alloc(16, role="residual", label="o")
    return r, a, o


# ---------------------------------------------------------------- hierarchy


def test_hierarchy():
    assert issubclass(moeflux.MoefluxError, Exception)
    for cls in ERRORS:
        assert issubclass(cls, moeflux.MoefluxError)
        assert cls.__module__ == "moeflux"
        assert cls.__doc__
    assert issubclass(moeflux.GraphError, ValueError)
    assert issubclass(moeflux.SizeError, ValueError)
    assert issubclass(moeflux.RoleError, TypeError)
    assert issubclass(moeflux.BackendError, RuntimeError)
    assert not issubclass(moeflux.WeightFileError, (ValueError, TypeError, RuntimeError))
    assert len(set(ERRORS)) == 5


# ---------------------------------------------------------------- roles


def test_wrong_role_names_op_field_expected_and_actual(be, bufs):
    r, a, o = bufs
    with pytest.raises(moeflux.RoleError) as e:
        moeflux.Graph([add(a, a, o, label="h0.residual")]).compile()
    msg = str(e.value)
    assert "h0.residual (ResidualAddNTokens)" in msg
    assert "field `a`" in msg
    assert "`residual`" in msg and "got `act`" in msg
    assert f"buffer {a.raw}" in msg


def test_wrong_role_in_a_union_field_lists_every_accepted_role(be, bufs):
    r, a, o = bufs
    op = ops.MatvecNTokens(
        ops.WeightRef(0, 0, 0, 4, 64), r, 0, a, 0, in_dim=64, out_dim=4, n_tokens=1, label="q"
    )
    with pytest.raises(moeflux.RoleError, match=r"q \(MatvecNTokens\)\] field `input`") as e:
        be.execute([op])
    assert "one of [normed, act, moe_scratch]" in str(e.value)
    assert "got `residual`" in str(e.value)


def test_role_errors_are_type_errors_and_raised_at_compile(be, bufs):
    r, a, o = bufs
    g = moeflux.Graph([add(r, a, a)])  # `out` must be residual
    with pytest.raises(TypeError, match="field `out`"):
        g.compile()
    with pytest.raises(moeflux.RoleError):
        be.execute(g)


def test_unknown_role_name(be):
    with pytest.raises(moeflux.RoleError, match="unknown buffer role `nope`.*residual"):
        be.alloc(4, role="nope")
    with pytest.raises(moeflux.RoleError):
        moeflux.BufId(0, "Residual")


def test_stale_id_with_another_role(be):
    r = be.alloc(16, role="residual")
    fake = moeflux.BufId(r.raw, "act", "fake", 16)
    with pytest.raises(moeflux.RoleError, match="expected a buffer of role `act`, got `residual`"):
        be.download(fake)


# ---------------------------------------------------------------- bad ids, dims, data


def test_bad_ids(be, bufs):
    r, a, o = bufs
    bogus = moeflux.BufId(999, "residual", "bogus", 16)
    with pytest.raises(
        moeflux.GraphError, match=r"field `a`: buffer id 999 does not exist \(pool has 3 buffers\)"
    ):
        be.execute([add(bogus, a, o)])
    with pytest.raises(moeflux.SizeError, match="buffer id 999 does not exist"):
        be.upload(bogus, np.zeros(1, np.float32))
    with pytest.raises(moeflux.SizeError, match="buffer id 999 does not exist"):
        be.download(bogus)
    other = moeflux.Backend("cpu")
    with pytest.raises(moeflux.MoefluxError):
        other.execute([add(r, a, o)])


def test_out_of_bounds_and_bad_dims(be, bufs):
    r, a, o = bufs
    with pytest.raises(
        moeflux.GraphError, match=r"big \(ResidualAddNTokens\)\] field `a` \(buffer `r`\): needs 80 bytes"
    ):
        be.execute([add(r, a, o, n=5, dim=4, label="big")])
    with pytest.raises(ValueError, match="field `rotary_dim`|field `head_dim`|field `inv_freq`"):
        inv = be.alloc(64, role="inv_freq")
        be.execute([ops.RopeNTokens(a, inv, n_tokens=1, num_heads=1, head_dim=4, rotary_dim=5, start_pos=0)])


def test_unsafe_aliasing_after_commit_plan(be):
    x = be.alloc(64, role="residual", persistent=True)
    y = be.alloc(64, role="act", persistent=True)
    out = be.alloc(64, role="residual", persistent=True)
    t = [be.alloc(64, role="residual", label=f"t{i}") for i in range(3)]
    chain = [
        add(x, y, t[0], 1, 16),
        add(t[0], y, t[1], 1, 16),
        add(t[1], y, t[2], 1, 16),
        add(t[2], y, out, 1, 16),
    ]
    assert be.commit_plan(chain).colors == 2  # t0 and t2 share memory now
    with pytest.raises(moeflux.GraphError, match="unsafe aliasing.*`t0`.*`t2`"):
        be.execute([add(t[0], y, t[2], 1, 16, "clash")])


def test_data_dependent_failure(weight_path):
    be = moeflux.Backend("cpu", weights=weight_path)
    ids = be.alloc(8, role="token_ids")
    hidden = be.alloc(2 * 64 * 4, role="residual")
    be.upload(ids, np.array([3, 8], np.uint32))  # vocab (rows of `proj`) is 8
    op = ops.EmbedGatherNTokens(
        ids, be.weight_ref("proj"), hidden, hidden_dim=64, n_tokens=2, vocab=8, label="embed"
    )
    with pytest.raises(
        moeflux.GraphError,
        match=r"embed \(EmbedGatherNTokens\)\] field `token_ids`: token 1: id 8 >= vocab 8",
    ):
        be.execute([op])


def test_unknown_op_class(be, bufs):
    @dataclasses.dataclass(frozen=True)
    class FusedEverything:
        x: moeflux.BufId
        label: str = ""

    with pytest.raises(moeflux.GraphError, match="unknown op `FusedEverything`"):
        be.execute([FusedEverything(bufs[0])])
    with pytest.raises(moeflux.GraphError, match="unknown op `int`"):
        moeflux.Graph([3]).compile()


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("n_tokens", "1", r"field `n_tokens`: expected an int in 0..=4294967295, got '1' \(str\)"),
        ("n_tokens", -1, "field `n_tokens`: expected an int"),
        ("dim", 2**32, "field `dim`: expected an int"),
        ("dim", 2.0, r"got 2.0 \(float\)"),
        ("b", 3, r"field `b`: expected a moeflux.BufId, got 3 \(int\)"),
        ("b", None, "expected a moeflux.BufId, got None"),
        ("label", 5, "field `label`: expected a str"),
    ],
)
def test_field_type_errors(be, bufs, field, value, match):
    op = dataclasses.replace(add(*bufs), **{field: value})
    with pytest.raises(moeflux.GraphError, match=match):
        be.execute([op])


def test_missing_field(be, bufs):
    class Partial:
        pass

    Partial.__name__ = "ResidualAddNTokens"
    obj = Partial()
    obj.a = bufs[0]
    with pytest.raises(moeflux.GraphError, match="field `b`: cannot read the field"):
        moeflux.Graph([obj]).compile()


def test_bad_weight_and_layout_values(be, bufs):
    r, a, o = bufs
    n = be.alloc(256, role="normed")
    for wref, match in [
        (ops.WeightRef(0, 0, 0, 4, 64, scale_dtype="f64"), "`scale_dtype`: expected one of"),
        (ops.WeightRef(-1, 0, 0, 4, 64), "`w_off`: expected an int"),
        ("proj", "expected an object with a `w_off` attribute"),
    ]:
        op = ops.MatvecNTokens(wref, n, 0, a, 0, in_dim=64, out_dim=4, n_tokens=1, label="m")
        with pytest.raises(moeflux.GraphError, match=match):
            be.execute([op])
    with pytest.raises(moeflux.GraphError, match=r"field `weight_dtype`: expected one of \"f32\""):
        be.execute([ops.RmsNormBf16NTokens(r, 0, n, 4, 1, 1e-6, weight_dtype="int8")])


def test_set_u32_errors(be, bufs):
    g = moeflux.Graph([add(*bufs)])
    with pytest.raises(moeflux.GraphError, match="no field `nope`"):
        g.set_u32(0, "nope", 1)
    with pytest.raises(moeflux.GraphError, match="index 3 out of range"):
        g.set_u32(3, "dim", 1)
    with pytest.raises(moeflux.GraphError, match="value must be an int"):
        g.set_u32(0, "dim", -1)
    with pytest.raises(moeflux.GraphError, match="value must be an int"):
        g.set_u32(0, "dim", 2**32)
    z = moeflux.Graph([ops.ZeroBuffer(bufs[0], n_bytes=4)])
    with pytest.raises(moeflux.GraphError, match="`n_bytes` is not a u32 field"):
        z.set_u32(0, "n_bytes", 8)
    assert g.ops[0].dim == 2  # nothing changed on failure
    assert "dim=2" in g.dump()


# ---------------------------------------------------------------- sizes


def test_upload_and_download_sizes(be):
    buf = be.alloc(16, role="act", label="x")
    with pytest.raises(moeflux.SizeError, match=r"buffer `x`: upload: expected at most 16 bytes, got 20"):
        be.upload(buf, np.zeros(5, np.float32))
    with pytest.raises(
        moeflux.SizeError, match=r"upload_at \(offset \+ length\): expected at most 16 bytes, got 20"
    ):
        be.upload_at(buf, 12, np.zeros(2, np.float32))
    with pytest.raises(moeflux.SizeError, match="offset must be non-negative"):
        be.upload_at(buf, -4, np.zeros(1, np.float32))
    with pytest.raises(moeflux.SizeError, match="download: expected at most 16 bytes, got 20"):
        be.download(buf, shape=5)
    with pytest.raises(moeflux.SizeError, match="got 32"):
        be.download(buf, dtype=np.float64, shape=(2, 2))
    odd = be.alloc(6, role="act", label="odd")
    with pytest.raises(moeflux.SizeError, match="not a whole number of float32 elements"):
        be.download(odd)
    assert be.download(odd, dtype=np.uint16).shape == (3,)
    with pytest.raises(moeflux.SizeError, match="shape must be"):
        be.download(buf, shape=(-1,))
    with pytest.raises(TypeError, match="dtype object"):
        be.download(buf, dtype=object)


def test_allocation_errors(be):
    with pytest.raises(moeflux.SizeError, match="nbytes must be non-negative"):
        be.alloc(-1)
    with pytest.raises(moeflux.SizeError, match="out of memory|bytes aligned"):
        be.alloc(1 << 62)
    with pytest.raises(moeflux.SizeError, match="alignment 3 is not a power of two"):
        be.alloc_aligned(64, 3)
    with pytest.raises(moeflux.SizeError, match="C-contiguous"):
        be.register_borrowed(np.zeros((4, 4), np.float32).T)
    with pytest.raises(TypeError):
        be.register_borrowed(b"bytes are not an array")
    assert be.buffer_count() == 0


def test_register_file_errors(be, tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(
        moeflux.SizeError, match=r"register_file \(offset \+ length\): expected at most 10 bytes, got 12"
    ):
        be.register_file(path, offset=4, length=8)
    with pytest.raises(moeflux.SizeError, match="offset must be non-negative"):
        be.register_file(path, offset=-1)
    with pytest.raises(moeflux.BackendError, match="I/O error"):
        be.register_file(tmp_path / "missing.bin")


# ---------------------------------------------------------------- backends and panics


def test_unknown_and_unavailable_backends():
    with pytest.raises(moeflux.BackendError, match="unknown backend `tpu`"):
        moeflux.Backend("tpu")
    with pytest.raises(moeflux.BackendError, match="`metal`.*macOS on Apple Silicon.*`metal` cargo feature"):
        moeflux.Backend("metal")
    try:
        moeflux.Backend("metal-emu")
    except moeflux.BackendError as e:
        assert "`metal-emu` cargo feature" in str(e)


@pytest.mark.parametrize("release_gil", [False, True])
def test_a_rust_panic_is_a_backend_error(release_gil):
    with pytest.raises(moeflux.BackendError, match="internal error: deliberate"):
        _core._panic_for_tests("deliberate", release_gil=release_gil)
    # The module still works afterwards.
    be = moeflux.Backend("cpu")
    be.download(be.alloc(4))


# ---------------------------------------------------------------- weight files


def _write(path: Path) -> None:
    with moeflux.WeightWriter(path) as w:
        w.add("v", np.arange(16, dtype=np.float32))


def test_weight_file_errors(tmp_path):
    missing = tmp_path / "missing.bin"
    with pytest.raises(moeflux.WeightFileError, match="cannot read manifest"):
        moeflux.WeightFile(missing)
    with pytest.raises(moeflux.WeightFileError):
        moeflux.Backend("cpu", weights=missing)

    path = tmp_path / "w.bin"
    _write(path)
    wf = moeflux.WeightFile(path)
    with pytest.raises(moeflux.WeightFileError, match="no tensor `nope`"):
        wf.offset("nope")
    with pytest.raises(moeflux.WeightFileError, match="no tensor `v.weight`"):
        wf.weight_ref("v")
    be = moeflux.Backend("cpu", weights=path)
    with pytest.raises(moeflux.WeightFileError, match="no tensor `nope`"):
        be.weight_offset("nope")

    # A truncated blob, a manifest that is not JSON, one of another format.
    blob = path.read_bytes()
    path.write_bytes(blob[:-4])
    with pytest.raises(moeflux.WeightFileError, match="truncated or replaced"):
        moeflux.WeightFile(path)
    path.write_bytes(blob)
    manifest = Path(str(path) + ".json")
    good = manifest.read_text()
    manifest.write_text("{not json")
    with pytest.raises(moeflux.WeightFileError, match="bad manifest"):
        moeflux.WeightFile(path)
    m = json.loads(good)
    m["format"] = "safetensors"
    manifest.write_text(json.dumps(m))
    with pytest.raises(moeflux.WeightFileError, match="format"):
        moeflux.WeightFile(path)


def test_no_weight_file_open(be):
    with pytest.raises(moeflux.WeightFileError, match="no weight file open"):
        be.weight_ref("proj")
    with pytest.raises(moeflux.WeightFileError, match="no weight file open"):
        be.weight_offset("proj")
    x = be.alloc(16, role="residual")
    out = be.alloc(16, role="normed")
    op = ops.RmsNormBf16NTokens(x, 0, out, 4, 1, 1e-6, label="final_norm")
    with pytest.raises(
        moeflux.WeightFileError, match=r"final_norm \(RmsNormBf16NTokens\)\] field `weight_off`"
    ):
        be.execute([op])


def test_weight_range_outside_the_file(weight_path):
    be = moeflux.Backend("cpu", weights=weight_path)
    x = be.alloc(256, role="residual")
    out = be.alloc(256, role="normed")
    op = ops.RmsNormBf16NTokens(x, 1 << 40, out, 64, 1, 1e-6, weight_dtype="f32", label="n")
    with pytest.raises(moeflux.GraphError, match="field `weight_off`.*<weight file>"):
        be.execute([op])


def test_weight_writer_errors(tmp_path):
    path = tmp_path / "w.bin"
    with pytest.raises(moeflux.WeightFileError, match="added twice"):
        with moeflux.WeightWriter(path) as w:
            w.add("v", np.zeros(4, np.float32))
            w.add("v", np.zeros(4, np.float32))
    assert not path.exists()
    w = moeflux.WeightWriter(path)
    with pytest.raises(moeflux.WeightFileError, match="dtype float64 is not storable"):
        w.add("d", np.zeros(4, np.float64))
    with pytest.raises(moeflux.GraphError, match="bits = 5 is not supported"):
        w.add_quantized("q", np.zeros((4, 64), np.float32), bits=5)
    with pytest.raises(moeflux.GraphError, match="cols = 48 is not a multiple of group_size = 32"):
        w.add_quantized("q", np.zeros((4, 48), np.float32), group_size=32)
    w.finish()
    with pytest.raises(moeflux.WeightFileError, match="closed"):
        w.add("late", np.zeros(1, np.float32))
    with pytest.raises(moeflux.WeightFileError, match="closed"):
        w.finish()
    with pytest.raises(moeflux.BackendError, match="I/O error"):
        moeflux.WeightWriter(tmp_path / "no" / "such" / "dir.bin")


def test_quantizer_errors():
    w = np.zeros((4, 64), np.float32)
    with pytest.raises(moeflux.GraphError, match="bits"):
        moeflux.quantize(w, bits=5)
    with pytest.raises(moeflux.GraphError, match="group_size"):
        moeflux.quantize(w, group_size=48)
    with pytest.raises(moeflux.GraphError, match="dtype float64"):
        moeflux.quantize(w.astype(np.float64))
    with pytest.raises(moeflux.GraphError, match="at least 2 dims"):
        moeflux.quantize(np.zeros(64, np.float32))
    wq, s, b = moeflux.quantize(w)
    with pytest.raises(moeflux.GraphError, match="expected uint32"):
        moeflux.dequantize(wq.astype(np.int64), s, b)
    with pytest.raises(moeflux.GraphError, match="scales has 2 elements"):
        moeflux.dequantize(wq, s[:2], b)
    with pytest.raises(moeflux.GraphError, match="biases are float16 but scales are float32|biases are f16"):
        moeflux.dequantize(wq, s, b.astype(np.float16))


# ---------------------------------------------------------------- fuzz: garbage never crashes

SCHEMA = _core.op_schema()
ROLES = _core.roles()
GARBAGE = st.sampled_from([None, "x", "", 1.5, -1, [], (1, "a"), b"\x00", float("nan"), {"a": 1}])
SMALL_U32 = st.one_of(
    st.integers(0, 4), st.integers(0, 300), st.sampled_from([2**16, 2**31, 2**32 - 1]), st.integers(-3, 2**33)
)
U64 = st.one_of(
    st.integers(0, 4096).map(lambda v: v * 4), st.sampled_from([2**63, 2**64 - 1]), st.integers(-2, 2**65)
)
DTYPE = st.sampled_from(["f32", "bf16", "f16", "float32", "int8", ""])
BITS = st.sampled_from([2, 3, 4, 6, 8, 0, 1, 5, 32, 2**32 - 1])
GROUP = st.sampled_from([32, 64, 128, 0, 1, 7])


SANE_U32 = st.sampled_from([1, 1, 1, 2, 2, 4, 8, 16, 32, 64, 0])
SANE_U64 = st.sampled_from([0, 0, 64, 256, 1024, 4096])
SANE_LAYOUT = st.builds(
    ops.ExpertLayout,
    st.sampled_from([32, 64]),
    st.sampled_from([32, 64]),
    st.sampled_from([4, 8]),
    st.sampled_from([32, 64]),
    st.sampled_from(["bf16", "f32"]),
)


class Fuzz:
    """One backend with a small weight file and buffers of every role in a few sizes."""

    def __init__(self, tmp: Path) -> None:
        path = tmp / "fuzz.bin"
        rng = np.random.default_rng(0)
        with moeflux.WeightWriter(path) as w:
            w.add("vec", rng.standard_normal(256).astype(np.float32))
            w.add_quantized("mat", rng.standard_normal((16, 64)).astype(np.float32), group_size=32, bits=4)
            w.add_quantized("mat8", rng.standard_normal((64, 64)).astype(np.float32), group_size=64, bits=8)
        self.be = moeflux.Backend("cpu", weights=path)
        self.refs = [self.be.weight_ref("mat"), self.be.weight_ref("mat8")]
        self.bufs = {}
        self.big = {}
        for role in ROLES:
            self.bufs[role] = [self.be.alloc(n, role=role, label=f"{role}{n}") for n in (0, 4, 64, 1024)]
            self.big[role] = [self.be.alloc(n, role=role, label=f"{role}{n}") for n in (4096, 1 << 15) * 3]
            for buf in self.big[role]:
                # Small ids and tiny floats: valid expert/token indices, finite activations.
                self.be.upload(buf, rng.integers(0, 3, buf.nbytes // 4).astype(np.uint32))
        self.every = [b for role in ROLES for b in self.bufs[role] + self.big[role]]

    def sane(self, field) -> st.SearchStrategy:
        """Plausible values: many ops built from these pass validation and run their kernels."""
        kind = field["type"]
        if kind == "buf":
            return st.sampled_from([b for r in field["accepts"] for b in self.big[r]])
        return {
            "u32": SANE_U32,
            "u64": SANE_U64,
            "f32": st.sampled_from([1e-6, 0.125, 1.0]),
            "dtype": st.sampled_from(["f32", "bf16", "f16"]),
            "weight_ref": st.sampled_from(self.refs),
            "expert_layout": SANE_LAYOUT,
            "u32_list": st.lists(st.integers(0, 2), max_size=4),
        }[kind]

    def wild(self, field) -> st.SearchStrategy:
        """Anything: out-of-range numbers, wrong roles, unknown ids, wrong Python types."""
        kind = field["type"]
        if kind == "buf":
            fitting = [b for r in field["accepts"] for b in self.bufs[r]]
            bogus = moeflux.BufId(10_000, field["accepts"][0])
            return st.one_of(st.sampled_from(fitting), st.sampled_from(self.every), st.just(bogus), GARBAGE)
        if kind == "u32":
            return st.one_of(SMALL_U32, GARBAGE)
        if kind == "u64":
            return st.one_of(U64, GARBAGE)
        if kind == "f32":
            return st.one_of(st.floats(), st.integers(-3, 3), GARBAGE)
        if kind == "dtype":
            return st.one_of(DTYPE, GARBAGE)
        if kind == "weight_ref":
            return st.one_of(st.builds(ops.WeightRef, U64, U64, U64, BITS, GROUP, DTYPE), GARBAGE)
        if kind == "expert_layout":
            return st.one_of(st.builds(ops.ExpertLayout, SMALL_U32, SMALL_U32, BITS, GROUP, DTYPE), GARBAGE)
        if kind == "u32_list":
            return st.one_of(st.lists(SMALL_U32, max_size=6), GARBAGE)
        raise AssertionError(kind)


@st.composite
def random_op(draw, fz: Fuzz):
    """Any op of the table: all fields plausible, or one field wild, or everything wild."""
    schema = draw(st.sampled_from(SCHEMA))
    fields = schema["fields"]
    mode = draw(st.sampled_from(["sane", "sane", "one_wild", "wild"]))
    wild_at = draw(st.integers(0, len(fields) - 1)) if mode == "one_wild" else -1
    kwargs = {}
    used = set()
    for i, f in enumerate(fields):
        if mode == "wild" or i == wild_at:
            kwargs[f["name"]] = draw(fz.wild(f))
        elif f["type"] == "buf":
            # Distinct buffers per field, so ops that write several of one role can validate.
            free = [b for r in f["accepts"] for b in fz.big[r] if b not in used]
            kwargs[f["name"]] = b = draw(st.sampled_from(free or fz.big[f["accepts"][0]]))
            used.add(b)
        else:
            kwargs[f["name"]] = draw(fz.sane(f))
    label = draw(st.one_of(st.text(max_size=6), GARBAGE) if mode == "wild" else st.text(max_size=6))
    return ops.OPS[schema["name"]](**kwargs, label=label)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory) -> Fuzz:
    return Fuzz(tmp_path_factory.mktemp("fuzz"))


def _expect_only_moeflux_errors(run) -> None:
    try:
        run()
    except moeflux.MoefluxError as e:
        assert "internal error" not in str(e), f"a Rust panic: {e}"


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_ops_never_crash(fuzz, data):
    graph = data.draw(st.lists(random_op(fuzz), min_size=1, max_size=3))
    _expect_only_moeflux_errors(lambda: fuzz.be.execute(graph))
    _expect_only_moeflux_errors(lambda: moeflux.Graph(graph).dump())


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    nbytes=st.integers(0, 64),
    writes=st.lists(st.tuples(st.integers(-8, 80), st.integers(0, 80)), max_size=8),
    shape=st.one_of(st.none(), st.integers(-2, 40), st.lists(st.integers(-1, 8), max_size=3)),
    dtype=st.sampled_from([np.uint8, np.float32, np.uint16, np.float64, "bf16"]),
)
def test_fuzz_upload_download_against_a_model(nbytes, writes, shape, dtype):
    be = moeflux.Backend("cpu")
    buf = be.alloc(nbytes, role="act")
    model = bytearray(nbytes)
    for off, n in writes:
        data = bytes((off + i) % 251 for i in range(n))
        if off < 0 or off + n > nbytes:
            with pytest.raises(moeflux.SizeError):
                be.upload_at(buf, off, data)
        else:
            be.upload_at(buf, off, data)
            model[off : off + n] = data
    try:
        got = be.download(buf, dtype=dtype, shape=shape)
    except moeflux.SizeError:
        return
    flat = got.reshape(-1).view(np.uint8)
    assert bytes(flat) == bytes(model[: flat.size])
