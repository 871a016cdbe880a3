"""The Python API of moeflux: buffers, uploads and downloads, borrowed and mapped memory, graphs
and their cache, plans, stats, threads, weight files. Numerics of the ops are in test_ops.py."""

from __future__ import annotations

import doctest
import gc
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest

import moeflux
from moeflux import _core, ops

BF16 = np.dtype(ml_dtypes.bfloat16)


def add(a, b, out, n, dim, label="add"):
    return ops.ResidualAddNTokens(a, b, out, n_tokens=n, dim=dim, label=label)


# ---------------------------------------------------------------- package surface


def test_package_exports_the_contract():
    for name in [
        "Backend",
        "BufId",
        "PlanReport",
        "Graph",
        "ops",
        "WeightFile",
        "WeightWriter",
        "quantize",
        "dequantize",
        "MoefluxError",
        "GraphError",
        "SizeError",
        "RoleError",
        "WeightFileError",
        "BackendError",
    ]:
        assert name in moeflux.__all__
        assert hasattr(moeflux, name)
    for cls in [moeflux.Backend, moeflux.BufId, moeflux.PlanReport, moeflux.WeightFile, moeflux.WeightWriter]:
        assert cls.__module__ == "moeflux"
    assert set(_core.roles()) == {
        "token_ids",
        "residual",
        "normed",
        "act",
        "inv_freq",
        "kv_cache_k",
        "kv_cache_v",
        "conv_state",
        "delta_state",
        "router_logits",
        "logits",
        "router_idx",
        "router_weight",
        "expert_base",
        "moe_scratch",
        "moe_index",
        "moe_sum",
    }


def test_docstring_examples_run():
    import moeflux._graph

    for mod in [moeflux, moeflux.ops, moeflux._graph]:
        result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, mod.__name__
        assert result.attempted > 0, mod.__name__


# ---------------------------------------------------------------- buffers


def test_backend_basics(be):
    assert be.name == "cpu"
    assert "cpu" in repr(be)
    assert be.buffer_count() == 0
    buf = be.alloc(64, role="act", label="x")
    assert (buf.raw, buf.role, buf.label, buf.nbytes) == (0, "act", "x", 64)
    assert be.buffer_count() == 1
    assert be.physical_buffer_count() == 1
    assert repr(buf) == "BufId(0, role='act', label='x', nbytes=64)"


def test_bufid_is_immutable_and_hashable(be):
    a = be.alloc(4, role="act", label="a")
    b = be.alloc(4, role="act", label="b")
    assert a == moeflux.BufId(0, "act", "a", 4)
    assert a != b
    assert len({a, b, moeflux.BufId(0, "act", "a", 4)}) == 2
    with pytest.raises(AttributeError):
        a.raw = 5  # type: ignore[misc]


def test_alloc_is_zero_filled(be):
    buf = be.alloc(40, role="residual")
    np.testing.assert_array_equal(be.download(buf), np.zeros(10, np.float32))
    assert be.download(buf, dtype=np.uint8).shape == (40,)


@pytest.mark.parametrize(
    "dtype",
    [np.float32, np.float16, BF16, np.uint32, np.uint8, np.int64, np.float64, np.int8],
    ids=lambda d: np.dtype(d).name,
)
def test_upload_download_round_trip(be, dtype):
    rng = np.random.default_rng(1)
    if np.issubdtype(np.dtype(dtype), np.integer):
        x = rng.integers(0, 100, (3, 5)).astype(dtype)
    else:
        x = (rng.standard_normal((3, 5)) * 50).astype(dtype)
    buf = be.alloc(x.nbytes, role="act")
    be.upload(buf, x)
    y = be.download(buf, dtype=dtype, shape=(3, 5))
    assert y.dtype == np.dtype(dtype)
    assert y.shape == (3, 5)
    np.testing.assert_array_equal(y.view(np.uint8), x.view(np.uint8))
    # The default shape is the whole buffer.
    assert be.download(buf, dtype=dtype).shape == (15,)


@pytest.mark.parametrize(
    "name,dtype", [("f32", np.float32), ("f16", np.float16), ("bf16", BF16), ("u32", np.uint32)]
)
def test_download_accepts_engine_dtype_names(be, name, dtype):
    buf = be.alloc(16, role="act")
    assert be.download(buf, dtype=name).dtype == np.dtype(dtype)
    assert be.download(buf, dtype=np.dtype(dtype).name).dtype == np.dtype(dtype)


def test_download_returns_a_fresh_array(be):
    buf = be.alloc(8, role="act")
    a = be.download(buf)
    a[:] = 5
    np.testing.assert_array_equal(be.download(buf), [0, 0])
    assert a.flags.writeable and a.flags.c_contiguous and a.flags.owndata


def test_prefix_semantics(be):
    buf = be.alloc(16, role="act")
    be.upload(buf, np.full(4, 9, np.float32))
    be.upload(buf, np.array([1, 2], np.float32))  # shorter: the tail is kept
    np.testing.assert_array_equal(be.download(buf), [1, 2, 9, 9])
    np.testing.assert_array_equal(be.download(buf, shape=3), [1, 2, 9])
    np.testing.assert_array_equal(be.download(buf, shape=(1, 2)), [[1, 2]])
    be.upload_at(buf, 8, np.array([7], np.float32))
    np.testing.assert_array_equal(be.download(buf), [1, 2, 7, 9])
    be.upload_at(buf, 12, np.array([5], np.float32))  # ends exactly at the end
    np.testing.assert_array_equal(be.download(buf), [1, 2, 7, 5])
    assert be.download(buf, shape=0).shape == (0,)
    be.upload(buf, np.zeros(0, np.float32))


def test_upload_accepts_bytes_like_and_non_contiguous_arrays(be):
    buf = be.alloc(16, role="act")
    be.upload(buf, np.array([1, 2, 3, 4], np.float32).tobytes())
    np.testing.assert_array_equal(be.download(buf), [1, 2, 3, 4])
    be.upload(buf, bytearray(np.array([5], np.float32).tobytes()))
    be.upload_at(buf, 4, memoryview(np.array([6], np.float32).tobytes()))
    np.testing.assert_array_equal(be.download(buf), [5, 6, 3, 4])
    m = np.arange(4, dtype=np.float32).reshape(2, 2)
    be.upload(buf, m.T)  # transposed: uploaded in logical (C) order
    np.testing.assert_array_equal(be.download(buf), [0, 2, 1, 3])
    be.upload(buf, np.float32(8.5))  # a NumPy scalar
    assert be.download(buf)[0] == 8.5
    with pytest.raises(TypeError):
        be.upload(buf, [1.0, 2.0])  # a list has no dtype: refused rather than guessed


def test_reset_transient_keeps_the_persistent_prefix(be):
    be.alloc(4, role="act", persistent=True)
    be.alloc(4, role="act")
    be.alloc(4, role="act", persistent=True)
    be.alloc(4, role="act")
    be.reset_transient()
    assert be.buffer_count() == 3
    assert be.physical_buffer_count() == 3


def test_alloc_aligned(be):
    for alignment in [64, 4096, 1 << 16]:
        buf = be.alloc_aligned(100, alignment, role="expert_base", label="slot")
        assert be._address(buf) % alignment == 0
        assert buf.nbytes == 100
    np.testing.assert_array_equal(be.download(buf, dtype=np.uint8), np.zeros(100, np.uint8))


# ---------------------------------------------------------------- borrowed and mapped memory


def test_register_borrowed_is_zero_copy(be):
    arr = np.zeros(4, np.float32)
    buf = be.register_borrowed(arr, role="act", label="host")
    assert buf.nbytes == 16 and buf.role == "act" and buf.label == "host"
    assert be._address(buf) == arr.ctypes.data
    arr[:] = [1, 2, 3, 4]  # visible to the backend without an upload
    np.testing.assert_array_equal(be.download(buf), [1, 2, 3, 4])
    be.upload(buf, np.array([9], np.float32))  # and the backend's writes reach the array
    assert arr[0] == 9
    # An op writing into it.
    r = be.alloc(16, role="residual")
    out_arr = np.zeros(4, np.float32)
    out = be.register_borrowed(out_arr, role="residual", label="out")
    be.upload(r, np.ones(4, np.float32))
    be.execute([add(r, buf, out, 1, 4)])
    np.testing.assert_array_equal(out_arr, [10, 3, 4, 5])


def test_register_borrowed_upload_into_itself(be):
    arr = np.arange(8, dtype=np.float32)
    buf = be.register_borrowed(arr, role="act")
    be.upload_at(buf, 4, arr[:4])  # source and destination overlap
    np.testing.assert_array_equal(arr, [0, 0, 1, 2, 3, 5, 6, 7])


def test_register_borrowed_keeps_the_array_alive(be):
    def make():
        a = np.arange(1000, dtype=np.float32)
        return be.register_borrowed(a, role="act"), sys.getrefcount(a)

    buf, _ = make()
    gc.collect()
    _ = [np.full(1000, -1.0, np.float32) for _ in range(20)]  # reuse freed memory if it were freed
    np.testing.assert_array_equal(be.download(buf), np.arange(1000, dtype=np.float32))

    arr = np.zeros(4, np.float32)
    before = sys.getrefcount(arr)
    be.register_borrowed(arr, role="act")
    assert sys.getrefcount(arr) == before + 1


def test_register_borrowed_read_only(be):
    arr = np.arange(4, dtype=np.float32)
    arr.setflags(write=False)
    buf = be.register_borrowed(arr, role="act")
    np.testing.assert_array_equal(be.download(buf), [0, 1, 2, 3])
    with pytest.raises(moeflux.SizeError, match="read-only"):
        be.upload(buf, np.zeros(1, np.float32))
    gate = be.alloc(16, role="act")
    with pytest.raises(moeflux.MoefluxError, match="read-only"):
        be.execute([ops.SigmoidGateNTokens(buf, gate, dim=4, n_tokens=1, label="g")])
    np.testing.assert_array_equal(arr, [0, 1, 2, 3])
    # Read as an input, it works.
    out = be.alloc(16, role="residual")
    r = be.alloc(16, role="residual")
    be.execute([add(r, buf, out, 1, 4)])
    np.testing.assert_array_equal(be.download(out), [0, 1, 2, 3])


def test_register_borrowed_memmap(be, tmp_path):
    path = tmp_path / "m.bin"
    np.arange(6, dtype=np.float32).tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r+")
    buf = be.register_borrowed(mm, role="act")
    np.testing.assert_array_equal(be.download(buf), np.arange(6))
    be.upload(buf, np.array([42], np.float32))
    mm.flush()
    assert np.fromfile(path, dtype=np.float32)[0] == 42


def test_register_file(be, tmp_path):
    path = tmp_path / "experts.bin"
    data = np.arange(100, dtype=np.uint32)
    data.tofile(path)
    whole = be.register_file(path, label="experts")
    assert whole.role == "expert_base" and whole.nbytes == 400
    np.testing.assert_array_equal(be.download(whole, dtype=np.uint32), data)
    part = be.register_file(path, role="expert_base", offset=40, length=80)
    np.testing.assert_array_equal(be.download(part, dtype=np.uint32), data[10:30])
    tail = be.register_file(str(path), offset=396)
    assert tail.nbytes == 4
    empty = be.register_file(path, offset=400)
    assert empty.nbytes == 0
    with pytest.raises(moeflux.SizeError, match="read-only"):
        be.upload(whole, np.zeros(1, np.uint32))


# ---------------------------------------------------------------- graphs


def test_graph_container(be):
    a = be.alloc(8, role="residual")
    b = be.alloc(8, role="act")
    g = moeflux.Graph()
    assert len(g) == 0
    op0 = add(a, b, a, 1, 2, "first")
    assert g.add(op0) is g
    g.extend([add(a, b, a, 1, 2, "second")])
    assert len(g) == 2
    assert g[0] is op0
    assert [op.label for op in g] == ["first", "second"]
    ops_copy = g.ops
    ops_copy.append(op0)
    assert len(g) == 2
    text = g.dump()
    assert "first" in text and "second" in text and "ResidualAddNTokens" in text
    assert repr(g) == "Graph(2 ops)"


def test_graph_caches_its_compiled_form(be, monkeypatch):
    a = be.alloc(8, role="residual")
    b = be.alloc(8, role="act")
    g = moeflux.Graph([add(a, b, a, 1, 2)])
    builds = []
    real = _core.CompiledGraph

    def counting(ops_):
        builds.append(len(ops_))
        return real(ops_)

    monkeypatch.setattr(moeflux._graph._core, "CompiledGraph", counting)
    be.upload(b, np.array([1, 2], np.float32))
    for _ in range(10):
        be.execute(g)
    assert builds == [1]
    assert g.compile() is g.compile()
    np.testing.assert_array_equal(be.download(a), [10, 20])
    g.add(add(a, b, a, 1, 2))  # invalidates
    be.execute(g)
    assert builds == [1, 2]
    np.testing.assert_array_equal(be.download(a), [12, 24])


def test_set_u32_patches_compiled_graph_and_python_op(be):
    x = be.alloc(16, role="act")
    gate = be.alloc(16, role="act")
    be.upload(x, np.full(4, 8, np.float32))
    g = moeflux.Graph([ops.SigmoidGateNTokens(x, gate, dim=1, n_tokens=1, label="g")])
    compiled = g.compile()
    be.execute(g)
    g.set_u32(0, "n_tokens", 3)
    assert g.compile() is compiled  # patched, not rebuilt
    assert g.ops[0].n_tokens == 3
    assert g.ops[0] == ops.SigmoidGateNTokens(x, gate, dim=1, n_tokens=3, label="g")
    assert "n_tokens=3" in g.dump()
    be.execute(g)
    np.testing.assert_array_equal(be.download(x), [2, 4, 4, 8])
    g.set_u32(-1, "dim", 4)
    g.set_u32(0, "n_tokens", np.uint32(1))
    assert g.ops[0].dim == 4 and g.ops[0].n_tokens == 1
    assert type(g.ops[0].n_tokens) is int
    assert "dim=4 n_tokens=1" in g.dump()


def test_execute_accepts_compiled_graphs_and_lists(be):
    a = be.alloc(8, role="residual")
    b = be.alloc(8, role="act")
    be.upload(b, np.ones(2, np.float32))
    op = add(a, b, a, 1, 2)
    be.execute([op])
    be.execute((op,))
    be.execute(_core.CompiledGraph([op]))
    be.execute(moeflux.Graph([op]), label="g")
    be.execute(moeflux.Graph())  # empty graphs are fine
    np.testing.assert_array_equal(be.download(a), [4, 4])
    with pytest.raises(TypeError):
        be.execute(op)


def test_ops_are_frozen_hashable_dataclasses(be):
    a = be.alloc(8, role="residual")
    b = be.alloc(8, role="act")
    op = add(a, b, a, 1, 2)
    assert hash(op) == hash(add(a, b, a, 1, 2))
    with pytest.raises(AttributeError):
        op.dim = 3  # type: ignore[misc]
    layout = ops.ExpertLayout(hidden_dim=64, inter_dim=32, bits=4, group_size=64)
    moe = ops.MoeBatchedPermuteFuse(a, 0, layout, b, [1, 2], b, b, b, b, b, b, b, a, 1, np.array([0, 1, 2]))
    assert moe.expert_slots == (1, 2) and moe.buckets == (0, 1, 2)
    assert all(type(v) is int for v in moe.buckets)


def test_expert_layout_offsets():
    o = ops.ExpertLayout(hidden_dim=128, inter_dim=64, bits=4, group_size=64).offsets()
    assert isinstance(o["gate"], ops.WeightRef)
    assert (o["gate"].w_off, o["gate"].s_off, o["gate"].b_off) == (0, 4096, 4096 + 256)
    assert o["up"].w_off == 4096 + 512
    assert o["down"].w_off == 2 * (4096 + 512)
    assert o["block_bytes"] == 3 * (4096 + 512)
    assert o["down"].bits == 4 and o["down"].group_size == 64 and o["down"].scale_dtype == "bf16"
    f32 = ops.ExpertLayout(64, 64, 8, 32, scale_dtype="f32").offsets()
    # gate: 64x64 8-bit = 4096 B + 2 * 64 * 2 groups * 4 B
    assert f32["gate"].b_off == 4096 + 512 and f32["block_bytes"] == 3 * (4096 + 1024)


# ---------------------------------------------------------------- plans and stats


def _chain(be):
    """x + 4y through three transient residuals; t1 and t3 can share memory."""
    x = be.alloc(64, role="residual", label="x", persistent=True)
    y = be.alloc(64, role="act", label="y", persistent=True)
    out = be.alloc(64, role="residual", label="out", persistent=True)
    t = [be.alloc(64, role="residual", label=f"t{i}") for i in range(1, 4)]
    g = moeflux.Graph(
        [
            add(x, y, t[0], 1, 16, "a0"),
            add(t[0], y, t[1], 1, 16, "a1"),
            add(t[1], y, t[2], 1, 16, "a2"),
            add(t[2], y, out, 1, 16, "a3"),
        ]
    )
    be.upload(x, np.arange(16, dtype=np.float32))
    be.upload(y, np.ones(16, np.float32))
    return g, out


def test_commit_plan_report_only(be):
    g, _ = _chain(be)
    r = be.commit_plan(g, alias=False)
    assert isinstance(r, moeflux.PlanReport)
    assert r.logical_bytes == 6 * 64
    assert r.physical_bytes == r.logical_bytes
    assert r.aliased_buffers == 0 and r.colors == 0
    assert r.lower_bound_bytes <= r.physical_bytes
    assert be.physical_buffer_count() == 6


def test_commit_plan_aliases_and_results_stay_correct(be):
    g, out = _chain(be)
    r = be.commit_plan(g)
    assert r.logical_bytes == 6 * 64
    assert r.aliased_buffers == 3
    assert r.colors == 2
    assert r.physical_bytes == 5 * 64
    assert r.lower_bound_bytes <= r.physical_bytes < r.logical_bytes
    assert be.physical_buffer_count() == 5
    assert r == moeflux.PlanReport(r.logical_bytes, r.physical_bytes, r.lower_bound_bytes, 3, 2)
    assert "aliased_buffers=3" in repr(r)
    be.execute(g)
    np.testing.assert_array_equal(be.download(out), np.arange(16) + 4)
    # Plan-pinned ids survive reset_transient.
    be.alloc(4, role="act")
    be.reset_transient()
    assert be.buffer_count() == 6


def test_stats_and_profile_mode(be):
    a = be.alloc(8, role="residual")
    b = be.alloc(8, role="act")
    g = moeflux.Graph([add(a, b, a, 1, 2, "first"), add(a, b, a, 1, 2, "second")])
    assert be.stats() == {}
    for _ in range(3):
        be.execute(g, label="step")
    s = be.stats()
    assert list(s) == ["step"]
    st = s["step"]
    assert st["count"] == 3
    assert 0 <= st["min_s"] <= st["max_s"] <= st["total_s"]
    be.clear_stats()
    assert be.stats() == {}
    assert be.profile_per_op is False
    be.profile_per_op = True
    assert be.profile_per_op is True
    be.execute(g, label="step")
    s = be.stats()
    assert sorted(s) == ["first", "second"]
    assert s["first"]["count"] == 1
    be.profile_per_op = False
    be.clear_stats()
    be.execute(g, label="step")
    assert list(be.stats()) == ["step"]


# ---------------------------------------------------------------- threads


def test_two_threads_share_one_backend(be):
    n, dim, rounds = 4, 256, 150
    rigs = []
    for k in range(2):
        a = be.alloc(n * dim * 4, role="residual", label=f"a{k}")
        b = be.alloc(n * dim * 4, role="act", label=f"b{k}")
        out = be.alloc(n * dim * 4, role="residual", label=f"out{k}")
        rigs.append((a, b, out, moeflux.Graph([add(a, b, out, n, dim, f"add{k}")])))
    shared_in = be.alloc(dim * 4, role="residual", label="shared")
    shared_b = be.alloc(dim * 4, role="act", label="shared_b")
    shared_out = be.alloc(dim * 4, role="residual", label="shared_out")
    be.upload(shared_in, np.full(dim, 1.5, np.float32))
    be.upload(shared_b, np.full(dim, 2.0, np.float32))
    shared = moeflux.Graph([add(shared_in, shared_b, shared_out, 1, dim, "shared")])
    start = threading.Barrier(2)

    def worker(k):
        a, b, out, g = rigs[k]
        rng = np.random.default_rng(k)
        start.wait()
        for i in range(rounds):
            x = rng.standard_normal((n, dim)).astype(np.float32)
            y = rng.standard_normal((n, dim)).astype(np.float32)
            be.upload(a, x)
            be.upload(b, y)
            be.execute(g, label=f"t{k}")
            be.execute(shared, label="shared")  # the same graph object from both threads
            got = be.download(out, shape=(n, dim))
            if not np.array_equal(got, x + y):
                return f"thread {k} round {i}: wrong result"
        return None

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(worker, [0, 1]))
    assert results == [None, None]
    s = be.stats()
    assert s["t0"]["count"] == rounds and s["t1"]["count"] == rounds
    assert s["shared"]["count"] == 2 * rounds
    np.testing.assert_array_equal(be.download(shared_out), np.full(dim, 3.5, np.float32))


def test_execute_releases_the_gil(be):
    """Another Python thread runs while execute is in the middle of a long graph."""
    n = 1 << 17
    a = be.alloc(n * 4, role="residual")
    b = be.alloc(n * 4, role="act")
    g = moeflux.Graph([add(a, b, a, 1, n)] * 1500)
    be.execute(g)  # warm-up
    stamps = []
    done = threading.Event()

    def spin():
        while not done.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.0005)

    t = threading.Thread(target=spin)
    t.start()
    try:
        t0 = time.perf_counter()
        be.execute(g)
        t1 = time.perf_counter()
    finally:
        done.set()
        t.join()
    lo, hi = t0 + 0.25 * (t1 - t0), t0 + 0.75 * (t1 - t0)
    assert any(lo < s < hi for s in stamps), f"no Python progress during {t1 - t0:.3f} s of execute"


# ---------------------------------------------------------------- weight files


def test_weight_file_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "bf16": rng.standard_normal((2, 2)).astype(BF16),
        "u32": np.arange(7, dtype=np.uint32),
        "u8": np.arange(9, dtype=np.uint8).reshape(3, 3),
    }
    path = tmp_path / "w.bin"
    with moeflux.WeightWriter(path) as w:
        assert w.path == path
        for name, arr in tensors.items():
            w.add(name, arr)
        w.add("strided", tensors["f32"].T)  # stored in logical order
        w.add_quantized("q", rng.standard_normal((16, 64)).astype(np.float32), group_size=32, bits=8)
    wf = moeflux.WeightFile(path)
    assert wf.path == path
    assert sorted(wf.names()) == wf.names()
    assert set(wf.names()) == set(tensors) | {"strided", "q.weight", "q.scales", "q.biases"}
    assert len(wf) == 9 and "f32" in wf and "nope" not in wf
    for name, arr in tensors.items():
        got = wf.array(name)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got.view(np.uint8), arr.view(np.uint8))
        assert wf.shape(name) == arr.shape
        assert wf.offset(name) % 64 == 0
        assert wf.nbytes(name) == arr.nbytes
    assert [wf.dtype(n) for n in tensors] == ["f32", "f16", "bf16", "u32", "u8"]
    np.testing.assert_array_equal(wf.array("strided"), tensors["f32"].T)
    assert wf.dtype("q.weight") == "u32" and wf.shape("q.weight") == (16, 16)
    assert wf.shape("q.scales") == (16, 2) and wf.dtype("q.scales") == "f32"
    ref = wf.weight_ref("q")
    assert isinstance(ref, ops.WeightRef)
    assert (ref.bits, ref.group_size, ref.scale_dtype) == (8, 32, "f32")
    assert (ref.w_off, ref.s_off, ref.b_off) == (
        wf.offset("q.weight"),
        wf.offset("q.scales"),
        wf.offset("q.biases"),
    )


def test_weight_file_arrays_are_read_only_views(tmp_path):
    path = tmp_path / "w.bin"
    with moeflux.WeightWriter(path) as w:
        w.add("v", np.arange(8, dtype=np.float32))
    wf = moeflux.WeightFile(path)
    a = wf.array("v")
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 1
    del wf
    gc.collect()
    np.testing.assert_array_equal(a, np.arange(8))  # the array keeps the mapping alive


def test_weight_writer_is_atomic(tmp_path):
    path = tmp_path / "w.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with moeflux.WeightWriter(path) as w:
            w.add("v", np.zeros(4, np.float32))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    w = moeflux.WeightWriter(path)
    w.add("v", np.zeros(4, np.float32))
    assert not path.exists()
    w.finish()
    assert path.exists() and (tmp_path / "w.bin.json").exists()
    w2 = moeflux.WeightWriter(tmp_path / "x.bin")
    w2.abort()
    w2.abort()
    assert not (tmp_path / "x.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin", "w.bin.json"]


def test_backend_with_weights(weight_path):
    wf = moeflux.WeightFile(weight_path)
    for weights in [weight_path, str(weight_path), wf]:
        be = moeflux.Backend("cpu", weights=weights)
        assert be.weight_offset("norm") == wf.offset("norm")
        assert be.weight_ref("proj") == wf.weight_ref("proj")
    # A matvec through the weight file, checked against dequantize.
    w = wf.array("proj.weight")
    dense = moeflux.dequantize(w, wf.array("proj.scales"), wf.array("proj.biases"), 64, 4)
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    xb = be.alloc(256, role="normed")
    yb = be.alloc(32, role="act")
    be.upload(xb, x)
    be.execute([ops.MatvecNTokens(be.weight_ref("proj"), xb, 0, yb, 0, in_dim=64, out_dim=8, n_tokens=1)])
    np.testing.assert_allclose(be.download(yb), dense.astype(np.float64) @ x, rtol=1e-4, atol=1e-4)
    # A weighted RMSNorm reading a vector by offset.
    r = be.alloc(256, role="residual")
    nb = be.alloc(256, role="normed")
    be.upload(r, x)
    be.execute(
        [
            ops.RmsNormBf16NTokens(
                r, be.weight_offset("norm"), nb, 64, 1, 1e-6, weight_dtype="f32", label="norm"
            )
        ]
    )
    ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-6) * wf.array("norm")
    np.testing.assert_allclose(be.download(nb), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_quantize_shapes_and_dtypes(dtype, bits):
    w = np.random.default_rng(bits).standard_normal((2, 3, 128)).astype(dtype)
    wq, scales, biases = moeflux.quantize(w, group_size=32, bits=bits)
    assert wq.dtype == np.uint32 and wq.shape == (2, 3, 128 * bits // 32)
    assert scales.dtype == np.dtype(dtype) and scales.shape == (2, 3, 4)
    assert biases.dtype == np.dtype(dtype) and biases.shape == (2, 3, 4)
    back = moeflux.dequantize(wq, scales, biases, group_size=32, bits=bits)
    assert back.dtype == np.dtype(dtype) and back.shape == w.shape
    err = np.abs(back.astype(np.float32) - w.astype(np.float32)).max()
    span = float(w.astype(np.float32).max() - w.astype(np.float32).min())
    assert err <= span / (2**bits - 1) + 0.05 * span
