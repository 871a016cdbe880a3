"""Expert streaming (pread into a budgeted cache) against mmap and the all-resident cache.

The tiny random checkpoints of the model-runner tests, converted with ``moeflux.convert``. Every
expert-I/O mode and cache budget must give bitwise the same logits, prefill and decode, as the
mmap'd files read in place (gather and bucket paths); the cache statistics must add up; faults
(a wrong file size at open, a file truncated while running) must be clear exceptions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import moeflux
from moeflux import _core
from moeflux.cli import main as cli_main
from moeflux.convert import convert
from moeflux.model import Model, ModelError

tm = pytest.importorskip("tiny_models")

CHUNK = 8
CASES = {
    "next4": dict(kind="next", kw={}),
    "next_dense_tied": dict(kind="next", kw=dict(mlp_only_layers=(1,), tie=True, layers=4)),
    "qwen35": dict(kind="qwen35", kw={}),
}


def _prompt(seed: int, n: int) -> list:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 256, n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> moeflux model directory converted from a tiny HF checkpoint."""
    root = tmp_path_factory.mktemp("stream_models")
    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            case = CASES[name]
            make = tm.make_qwen3_next if case["kind"] == "next" else tm.make_qwen3_5_moe
            hf = make(root / f"{name}.hf", seed=hash(name) % 1000 + 11, **case["kw"])
            mf = root / f"{name}.mf"
            convert(hf, mf, bits=4, group_size=64, progress=False)
            cache[name] = mf
        return cache[name]

    return get


def _gb(model_dir: Path, slots: int) -> float:
    """The cache budget (GB) that holds exactly ``slots`` experts."""
    stride = moeflux.ModelDir.open(model_dir).expert_stride
    return slots * stride / 1e9


def _trace(m: Model, ids: list, decode: list) -> tuple:
    """Prefill logits of every prompt token, then the logits of each decoded token."""
    full = m.logits(ids)
    steps = [m.decode(t) for t in decode]
    return full, np.stack(steps)


@pytest.mark.parametrize("name", list(CASES))
def test_pread_is_bitwise_mmap_and_resident_at_every_budget(models, name):
    mf = models(name)
    cfg = moeflux.ModelDir.open(mf).config
    E, k, layers = cfg.num_experts, cfg.num_experts_per_tok, len(cfg.moe_layers)
    ids, dec = _prompt(4, 29), _prompt(5, 6)
    gather = _trace(Model.open(mf, chunk_size=CHUNK, expert_io="mmap"), ids, dec)
    bucket = _trace(Model.open(mf, chunk_size=CHUNK, expert_io="mmap", moe_gather=False), ids, dec)
    for a, b in zip(gather, bucket):
        np.testing.assert_array_equal(a, b)
    want_tokens = list(Model.open(mf, chunk_size=CHUNK, expert_io="mmap").generate(ids, 10, stop=[]))
    # 1 slot (every layer in batches of one expert), one slot per layer, exactly top-k, half, all.
    for slots in sorted({1, layers, k, E * layers // 2, E * layers}):
        for prefetch in (True, False):
            m = Model.open(mf, chunk_size=CHUNK, expert_io="pread", expert_cache_gb=_gb(mf, slots),
                           prefetch=prefetch, io_threads=3)
            assert m.expert_io == "pread" and m.store.slots == slots and not m.moe_gather
            got = _trace(m, ids, dec)
            for a, b in zip(got, gather):
                np.testing.assert_array_equal(a, b, err_msg=f"{slots} slots, prefetch {prefetch}")
            assert list(m.generate(ids, 10, stop=[])) == want_tokens
            m.store.wait_idle()
            st = m.expert_stats()
            assert st["lookups"] == st["hits"] + st["misses"] > 0
            assert st["bytes_read"] == (st["misses"] + st["prefetch_reads"]) * m.expert_stride
            assert st["read_errors"] == 0 and st["prefetch_hits"] <= st["hits"]
            if not prefetch:
                assert st["prefetch_issued"] == 0 and st["bytes_read"] == st["misses"] * m.expert_stride
            if slots == E * layers:  # all resident: each expert read at most once
                assert st["misses"] <= E * layers and st["evictions"] == 0


def test_statistics_count_each_expert_once_per_chunk_and_decode_lookups(models):
    mf = models("next4")
    cfg = moeflux.ModelDir.open(mf).config
    E, k, layers = cfg.num_experts, cfg.num_experts_per_tok, len(cfg.moe_layers)
    m = Model.open(mf, chunk_size=CHUNK, expert_io="pread", expert_cache_gb=_gb(mf, 1), prefetch=False)
    m.reset()
    m.prefill(_prompt(6, CHUNK))  # one chunk of 8 tokens: 16 assignments per layer
    st = m.expert_stats()
    # One slot: nothing is ever a hit, and each (layer, expert) of the chunk is read exactly once.
    assert st["hits"] == 0 and st["misses"] == st["lookups"] == st["demand_reads"]
    assert layers <= st["lookups"] <= layers * min(E, CHUNK * k)
    assert st["lookups"] < layers * CHUNK * k  # fewer reads than assignments: experts shared
    assert st["bytes_read"] == st["misses"] * m.expert_stride
    assert st["tokens"] == CHUNK and st["stall_s"] > 0 and st["gb_per_s"] > 0
    # Decode: exactly k distinct experts per MoE layer per token.
    m.reset_expert_stats()
    for t in _prompt(7, 5):
        m.decode(t)
    st = m.expert_stats()
    assert st["lookups"] == 5 * k * layers and st["tokens"] == 5
    assert st["stall_ms_per_token"] == pytest.approx(1e3 * st["stall_s"] / 5)

    # All resident: a second pass over the same tokens reads nothing.
    r = Model.open(mf, chunk_size=CHUNK, expert_io="pread", expert_cache_gb=_gb(mf, E * layers), prefetch=False)
    ids = _prompt(8, 21)
    first = r.logits(ids)
    r.reset_expert_stats()
    np.testing.assert_array_equal(r.logits(ids), first)
    st = r.expert_stats()
    assert st["misses"] == 0 and st["bytes_read"] == 0 and st["hit_rate"] == 1.0


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_prefetch_brings_the_previous_tokens_experts(models, policy):
    mf = models("next4")
    cfg = moeflux.ModelDir.open(mf).config
    layers = len(cfg.moe_layers)
    # Two layers' experts fit, a whole token's do not: prefetch refills each layer.
    m = Model.open(mf, chunk_size=CHUNK, expert_io="pread", prefetch=True, cache_policy=policy,
                   expert_cache_gb=_gb(mf, 2 * cfg.num_experts_per_tok))
    m.reset()
    m.prefill(_prompt(9, 3))
    m.reset_expert_stats()
    for t in _prompt(10, 12):
        m.decode(t)
    m.store.wait_idle()
    st = m.expert_stats()
    assert st["prefetch_issued"] > 0 and 0 < st["prefetch_hits"] <= st["prefetch_issued"], st
    assert st["lookups"] == 12 * cfg.num_experts_per_tok * layers
    assert st["bytes_read"] == (st["misses"] + st["prefetch_reads"]) * m.expert_stride


def test_mode_selection(models, monkeypatch):
    mf = models("next4")
    assert Model.open(mf, chunk_size=CHUNK).expert_io == "mmap"  # tiny: fits in RAM
    m = Model.open(mf, chunk_size=CHUNK, auto_ram_fraction=1e-12)
    assert m.expert_io == "pread" and "RAM" in m.expert_io_reason
    m = Model.open(mf, chunk_size=CHUNK, expert_cache_gb=_gb(mf, 3))
    assert m.expert_io == "pread" and m.store.slots == 3 and m.expert_cache_bytes == 3 * m.expert_stride
    assert Model.open(mf, chunk_size=CHUNK, expert_io="mmap", expert_cache_gb=_gb(mf, 3)).expert_stats() is None
    monkeypatch.setenv("MOEFLUX_EXPERT_IO", "pread")
    monkeypatch.setenv("MOEFLUX_EXPERT_CACHE_GB", str(_gb(mf, 5)))
    m = Model.open(mf, chunk_size=CHUNK)
    assert m.expert_io == "pread" and m.store.slots == 5
    monkeypatch.setenv("MOEFLUX_EXPERT_IO", "bogus")
    with pytest.raises(ModelError, match="expert_io"):
        Model.open(mf, chunk_size=CHUNK)
    monkeypatch.delenv("MOEFLUX_EXPERT_IO")
    with pytest.raises(ModelError, match="positive"):
        Model.open(mf, chunk_size=CHUNK, expert_cache_gb=0)


def test_wrong_expert_file_size_is_rejected_at_open(models, tmp_path):
    mf = shutil.copytree(models("next4"), tmp_path / "m")
    md = moeflux.ModelDir.open(mf)
    layer, path = sorted(md.expert_files.items())[1]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - md.expert_stride)
    with pytest.raises(moeflux.MoefluxError, match=f"layer {layer}"):
        Model.open(mf, chunk_size=CHUNK, expert_io="pread")
    # The store checks the sizes itself too (it does not trust the caller's directory check).
    be = moeflux.Backend("cpu")
    with pytest.raises(moeflux.WeightFileError, match=rf"{path.name}.*{size - md.expert_stride} bytes, expected {size}"):
        _core.ExpertStore(be, {layer: str(path)}, md.expert_stride, md.config.num_experts, 2)


def test_file_truncated_while_running_is_a_clear_error(models, tmp_path):
    mf = shutil.copytree(models("next4"), tmp_path / "m")
    ids = _prompt(11, 19)
    want = Model.open(mf, chunk_size=CHUNK, expert_io="mmap").logits(ids)
    m = Model.open(mf, chunk_size=CHUNK, expert_io="pread", expert_cache_gb=_gb(mf, 1), prefetch=False)
    np.testing.assert_array_equal(m.logits(ids), want)
    md = moeflux.ModelDir.open(mf)
    path = sorted(md.expert_files.values())[0]
    original = path.read_bytes()
    with open(path, "r+b") as f:
        f.truncate(md.expert_stride // 2)  # inside expert 0: every expert of the layer is short
    with pytest.raises(moeflux.BackendError, match=r"truncated") as err:
        m.logits(ids)
    assert path.name in str(err.value)
    assert m.store.last_error is not None and m.expert_stats()["read_errors"] > 0
    with pytest.raises(moeflux.MoefluxError):
        list(m.generate(ids, 3))
    # Restored: the same model object computes the right logits again (nothing half-read was kept).
    with open(path, "r+b") as f:
        f.write(original)
    np.testing.assert_array_equal(m.logits(ids), want)


def test_expert_store_api(models):
    mf = models("next4")
    md = moeflux.ModelDir.open(mf)
    be = moeflux.Backend("cpu")
    files = {i: str(p) for i, p in md.expert_files.items()}
    st = _core.ExpertStore(be, files, md.expert_stride, md.config.num_experts, 3, policy="lru", io_threads=2)
    assert st.buffer.role == "expert_base" and st.buffer.nbytes == 3 * md.expert_stride
    assert be._address(st.buffer) % (2 << 20) == 0
    assert st.layers == sorted(files) and st.slots == 3 and st.stride == md.expert_stride
    assert st.direct_io or st.notes
    layer = st.layers[0]
    slots = st.acquire(layer, [5, 1, 5])
    assert slots[0] == slots[2] and len(set(slots)) == 2
    raw = be.download(st.buffer, dtype=np.uint8)
    blob = Path(files[layer]).read_bytes()
    stride = md.expert_stride
    for e, s in zip([5, 1], slots[:2]):
        assert raw[s * stride:(s + 1) * stride].tobytes() == blob[e * stride:(e + 1) * stride]
    with pytest.raises(moeflux.SizeError):
        st.acquire(layer, [0, 2])  # two slots pinned, one free
    st.release(slots)
    assert st.resident(layer, [5, 1, 0]) == [True, True, False]
    # LRU: the free slot, then the two least recently used entries (older than this call).
    assert st.prefetch(layer, [0, 2, 3]) == 3
    st.wait_idle()
    assert st.resident(layer, [5, 1, 0, 2, 3]) == [False, False, True, True, True]
    s = st.stats()
    assert s["lookups"] == s["hits"] + s["misses"] == 2  # the refused acquire changed nothing
    assert s["bytes_read"] == (s["demand_reads"] + s["prefetch_reads"]) * stride
    with pytest.raises(moeflux.GraphError, match="no expert file"):
        st.acquire(10**6, [0])
    with pytest.raises(moeflux.BackendError, match="policy"):
        _core.ExpertStore(be, files, stride, md.config.num_experts, 1, policy="fifo")
    with pytest.raises(moeflux.SizeError):
        be.upload(st.buffer, np.zeros(4, np.uint8))  # read-only for everyone but the readers
    assert st.evict_all() == 3 and st.cached() == 0
    assert s["prefetch_issued"] == s["prefetch_reads"] == 3


def test_cli_prints_io_statistics(models, capsys):
    mf = models("next4")
    gb = f"{_gb(mf, 4):.9f}"
    assert cli_main(["generate", str(mf), "--prompt", "def f(x):", "--max-tokens", "4", "--expert-io", "pread",
                     "--expert-cache-gb", gb, "--chunk-size", str(CHUNK)]) == 0
    err = capsys.readouterr().err
    assert "expert I/O: pread" in err and "hit rate" in err and "GB/s" in err and "stalled" in err
    assert cli_main(["bench", str(mf), "--prompt-tokens", "9", "--gen-tokens", "3", "--runs", "1",
                     "--expert-io", "pread", "--expert-cache-gb", gb, "--chunk-size", str(CHUNK)]) == 0
    out = capsys.readouterr()
    assert "expert I/O: pread" in out.out + out.err


def test_decode_predicts_the_next_layers_experts_only_when_streaming(models):
    mf = models("next4")
    k = moeflux.ModelDir.open(mf).config.num_experts_per_tok

    def decode_dump(m: Model) -> str:
        return m._concat(m._step(1, "last")).dump()

    m = Model.open(mf, chunk_size=CHUNK, expert_io="pread", expert_cache_gb=_gb(mf, 4))
    assert "spec_topk" in decode_dump(m) and "spec_topk" not in m._concat(m._step(CHUNK, "all")).dump()
    m.reset()
    m.prefill(_prompt(12, 11))
    assert all(len(v) == k for v in m._last_experts.values())  # the prompt's last token only
    assert "spec_topk" not in decode_dump(Model.open(mf, chunk_size=CHUNK, expert_io="pread", spec_prefetch=False))
    assert "spec_topk" not in decode_dump(Model.open(mf, chunk_size=CHUNK, expert_io="mmap"))
