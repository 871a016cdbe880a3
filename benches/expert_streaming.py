"""Expert streaming benchmark (not a test): disk limit vs achieved expert reads and decode speed.

Builds (once, cached under ``--dir``) a synthetic model with the real Qwen3-Next-80B-A3B layer dims
(hidden 2048, 512 experts top-10, expert intermediate 512, shared expert 512, linear attention 16/32
heads of 128, full attention 16/2 heads of 256) and ``--layers`` layers, so that its expert files
(4-bit, bf16 scales, 1,769,472 bytes per expert, ~906 MB per layer) exceed the cache budgets. The
non-expert weights come from ``moeflux.synthetic`` + ``moeflux.convert`` with 16 experts; then the
router is replaced by a 512-expert one and the expert files are written directly (random codes
under the scales and biases of the 16 converted experts), which keeps the build to seconds.

In the same run it measures the disk's raw bandwidth for the engine's access pattern (``O_DIRECT``
reads of one expert at random expert offsets, 1 thread and several), then greedy decode at cache
budgets of 25%, 50% and 100% of the expert bytes (100%: all experts loaded first, so it is the
compute-only time), with hit rates, bytes read and achieved GB/s, and checks the two goals:
expert reads at >= 80% of the raw parallel bandwidth, and decode time at 25% within 1.3x of
``bytes read per token / raw parallel bandwidth + compute time per token at 100%``.

    python3 benches/expert_streaming.py                 # print the table
    python3 benches/expert_streaming.py --write-md      # also replace "## Expert streaming" in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import random
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

import moeflux
from moeflux import ops
from moeflux.convert import convert
from moeflux.model import Model
from moeflux.synthetic import make_qwen3_next

E_REAL = 16  # experts converted from the HF checkpoint (the rest are written directly)
E = 512
TOP_K = 10
HIDDEN = 2048
ALIGN = 64  # weight blob alignment
MARKER = "bench-ready.json"


# ---------------------------------------------------------------------------- the model


def _append_tensor(blob: Path, manifest: Dict[str, Any], name: str, arr: np.ndarray, dtype: str,
                   bits: Optional[int] = None, group_size: Optional[int] = None) -> None:
    with open(blob, "ab") as f:
        off = f.tell()
        pad = (-off) % ALIGN
        f.write(b"\0" * pad)
        off += pad
        data = np.ascontiguousarray(arr).tobytes()
        f.write(data)
    info: Dict[str, Any] = {"offset": off, "size": len(data), "shape": list(arr.shape), "dtype": dtype}
    if bits is not None:
        info.update(bits=bits, group_size=group_size)
    manifest["tensors"][name] = info
    manifest["file_size"] = off + len(data)


def build_model(root: Path, layers: int, seed: int = 0) -> Path:
    """The benchmark model directory under ``root`` (built once; reused while its marker matches)."""
    mf = root / f"qwen3-next-80b-dims-L{layers}"
    want = {"layers": layers, "seed": seed, "experts": E, "version": 1}
    if (mf / MARKER).is_file() and json.loads((mf / MARKER).read_text()) == want:
        return mf
    if mf.exists():
        shutil.rmtree(mf)
    root.mkdir(parents=True, exist_ok=True)
    hf = root / "hf-tmp"
    if hf.exists():
        shutil.rmtree(hf)
    t0 = time.perf_counter()
    make_qwen3_next(hf, seed=seed, hidden=HIDDEN, layers=layers, vocab=512, heads=16, kv_heads=2, head_dim=256,
                    nk=16, nv=32, dk=128, dv=128, experts=E_REAL, top_k=TOP_K, moe_inter=512, shared_inter=512,
                    inter=512, interval=4, dtype="bfloat16", mtp=False)
    convert(hf, mf, bits=4, group_size=64, progress=False)
    shutil.rmtree(hf)
    meta = json.loads((mf / "moeflux.json").read_text())
    stride = int(meta["expert_stride"])
    # config and marker: 512 experts.
    cfg = json.loads((mf / "config.json").read_text())
    cfg["num_experts"] = E
    (mf / "config.json").write_text(json.dumps(cfg, indent=1))
    meta["num_experts"] = E
    meta["expert_file_bytes"] = E * stride
    # A 512-expert router per MoE layer (8-bit, group 64, as the converter writes routers).
    blob = mf / "weights.bin"
    manifest = json.loads((mf / "weights.bin.json").read_text())
    rng = np.random.default_rng(seed + 1)
    for i in sorted(int(k) for k in meta["expert_files"]):
        name = f"model.layers.{i}.mlp.gate"
        sdt = manifest["tensors"][f"{name}.scales"]["dtype"]
        w = (rng.standard_normal((E, HIDDEN)) * (3.0 / np.sqrt(HIDDEN))).astype(np.float32)
        if sdt == "bf16":
            import ml_dtypes

            w = w.astype(ml_dtypes.bfloat16)
        wq, s, b = moeflux.quantize(w, group_size=64, bits=8)
        _append_tensor(blob, manifest, f"{name}.weight", np.asarray(wq, np.uint32), "u32", 8, 64)
        _append_tensor(blob, manifest, f"{name}.scales", np.asarray(s), sdt)
        _append_tensor(blob, manifest, f"{name}.biases", np.asarray(b), sdt)
    (mf / "weights.bin.json").write_text(json.dumps(manifest, sort_keys=True))
    # Expert files: expert e = the scales/biases of converted expert e % 16 under random codes.
    lay = ops.ExpertLayout(**meta["expert_layout"])
    offs = lay.offsets()
    words = [(offs[p].w_off, offs[p].s_off) for p in ("gate", "up", "down")]
    for rel in meta["expert_files"].values():
        path = mf / rel
        real = np.fromfile(path, dtype=np.uint8).reshape(E_REAL, stride)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for _ in range(E // E_REAL):
                chunk = real.copy()
                for w0, w1 in words:
                    chunk[:, w0:w1] = rng.integers(0, 256, size=(E_REAL, w1 - w0), dtype=np.uint8)
                f.write(chunk.tobytes())
        tmp.replace(path)
    (mf / "moeflux.json").write_text(json.dumps(meta, indent=1))
    (mf / MARKER).write_text(json.dumps(want))
    print(f"[bench] built {mf} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return mf


# ---------------------------------------------------------------------------- raw disk bandwidth


def drop_page_cache(files: List[Path]) -> None:
    """Flush and evict the files' pages, so no run reads them from RAM (mmap included)."""
    for p in files:
        fd = os.open(str(p), os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_bandwidth(files: List[Path], stride: int, threads: int, seconds: float, seed: int = 0) -> Dict[str, Any]:
    """O_DIRECT reads of one expert (``stride`` bytes) at uniformly random experts of random files,
    ``threads`` at a time, for ``seconds``: GB/s and the mean latency of one read."""
    n_exp = files[0].stat().st_size // stride
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fds = [os.open(str(p), flags) for p in files]
    except OSError:  # no direct I/O on this filesystem: buffered reads of a dropped page cache
        flags = os.O_RDONLY
        drop_page_cache(files)
        fds = [os.open(str(p), flags) for p in files]
    stop = time.perf_counter() + seconds
    counts = [0] * threads
    lat = [0.0] * threads

    def run(t: int) -> None:
        rnd = random.Random(seed * 1000 + t)
        buf = mmap.mmap(-1, stride)  # page aligned, as O_DIRECT needs
        while time.perf_counter() < stop:
            fd = fds[rnd.randrange(len(fds))]
            t0 = time.perf_counter()
            n = os.preadv(fd, [buf], rnd.randrange(n_exp) * stride)
            lat[t] += time.perf_counter() - t0
            if n != stride:
                raise OSError(f"short read {n}")
            counts[t] += 1
        buf.close()

    t0 = time.perf_counter()
    ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    dt = time.perf_counter() - t0
    for fd in fds:
        os.close(fd)
    reads = sum(counts)
    return {"threads": threads, "gb_s": reads * stride / dt / 1e9, "reads": reads,
            "latency_ms": 1e3 * sum(lat) / max(reads, 1), "direct": bool(flags & getattr(os, "O_DIRECT", 0))}


def raw_bursts(files: List[Path], stride: int, batch: int, gap_s: float, seconds: float, seed: int = 0) -> Dict[str, Any]:
    """The decode pattern: ``batch`` random one-expert O_DIRECT reads at once (one thread each), then
    ``gap_s`` idle (the compute between two layers' reads); GB/s over the time reads were running."""
    from concurrent.futures import ThreadPoolExecutor

    n_exp = files[0].stat().st_size // stride
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    fds = [os.open(str(p), flags) for p in files]
    bufs = [mmap.mmap(-1, stride) for _ in range(batch)]
    rnd = random.Random(seed)
    busy, reads = 0.0, 0
    stop = time.perf_counter() + seconds
    with ThreadPoolExecutor(batch) as pool:
        while time.perf_counter() < stop:
            jobs = [(fds[rnd.randrange(len(fds))], rnd.randrange(n_exp) * stride) for _ in range(batch)]
            t0 = time.perf_counter()
            list(pool.map(lambda a: os.preadv(a[1][0], [bufs[a[0]]], a[1][1]), enumerate(jobs)))
            busy += time.perf_counter() - t0
            reads += batch
            time.sleep(gap_s)
    for fd in fds:
        os.close(fd)
    for b in bufs:
        b.close()
    return {"batch": batch, "gap_ms": 1e3 * gap_s, "gb_s": reads * stride / busy / 1e9, "reads": reads}


# ---------------------------------------------------------------------------- decode runs


def decode_run(mf: Path, frac: float, prompt: List[int], warm: int, tokens: int, *, policy: str = "lru",
               prefetch: str = "prev+spec", io_threads: int = 8, mode: str = "pread") -> Dict[str, Any]:
    """Greedy decode of ``tokens`` after a prefill and ``warm`` warm-up tokens, cache at ``frac``
    of the expert bytes (1.0: every expert loaded first). ``prefetch``: ``off``, ``prev`` (a layer's
    experts of the previous token) or ``prev+spec`` (also the next layer's predicted experts)."""
    md = moeflux.ModelDir.open(mf)
    drop_page_cache(sorted(md.expert_files.values()))
    if mode == "mmap":  # the page cache holds every expert: read the files once
        for path in sorted(md.expert_files.values()):
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass
    total = md.expert_stride * md.config.num_experts * len(md.expert_files)
    kw: Dict[str, Any] = dict(chunk_size=len(prompt), expert_io=mode)
    if mode == "pread":
        slots = max(1, round(frac * total / md.expert_stride))
        kw.update(expert_cache_gb=(slots + 0.5) * md.expert_stride / 1e9, cache_policy=policy,
                  prefetch=prefetch != "off", spec_prefetch=prefetch == "prev+spec", io_threads=io_threads)
    m = Model.open(mf, **kw)
    if m.store is not None and frac >= 1.0:
        for layer in m.store.layers:
            for e0 in range(0, md.config.num_experts, m.store.slots):
                got = m.store.acquire(layer, list(range(e0, min(e0 + m.store.slots, md.config.num_experts))))
                m.store.release(got)
    m.reset()
    logits = m.prefill(prompt)
    tok = int(np.argmax(logits))
    for _ in range(warm):
        tok = int(np.argmax(m.decode(tok)))
    m.reset_expert_stats()
    m.backend.clear_stats()
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = int(np.argmax(m.decode(tok)))
    dt = time.perf_counter() - t0
    out: Dict[str, Any] = {"frac": frac, "policy": policy, "prefetch": prefetch, "mode": mode, "tokens": tokens,
                           "ms_per_tok": 1e3 * dt / tokens, "tok_s": tokens / dt}
    if m.store is not None:
        m.store.wait_idle()
        st = m.expert_stats()
        out.update(hit_rate=st["hit_rate"], prefetch_hits=st["prefetch_hits"], lookups=st["lookups"],
                   mb_per_tok=st["bytes_read"] / 1e6 / tokens, gb_s=st["gb_per_s"],
                   stall_ms=st["stall_ms_per_token"], busy_ms=1e3 * st["io_busy_s"] / tokens,
                   slots=st["slots"], direct=st["direct_io"], wasted=st["prefetch_wasted"])
    return out


# ---------------------------------------------------------------------------- report


def median_run(runs: List[Dict[str, Any]], key: str) -> Dict[str, Any]:
    """The run with the median ``key`` (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]


def markdown(info: Dict[str, Any], raw: List[Dict[str, Any]], runs: List[Dict[str, Any]], heading: str,
             burst: Dict[str, Any]) -> str:
    par = max(r["gb_s"] for r in raw)
    base = next(r for r in runs if r["mode"] == "pread" and r["frac"] >= 1.0)
    lines = [
        heading,
        "",
        f"`python3 benches/expert_streaming.py --write-md` ({info['when']}; {info['machine']}). Synthetic model "
        f"with the Qwen3-Next-80B-A3B layer dims (hidden 2048, 512 experts top-10, expert inter 512, 4-bit, "
        f"bf16 scales: {info['stride']:,} bytes per expert), {info['layers']} layers, "
        f"{info['expert_gb']:.2f} GB of expert files; CPU backend, greedy decode of {info['tokens']} tokens "
        f"after a {info['prompt']}-token prefill and {info['warm']} warm-up tokens; every number is the median of "
        f"{info['rounds']} interleaved rounds. Reads: "
        f"{'O_DIRECT' if info['direct'] else 'buffered + POSIX_FADV_DONTNEED'}, {info['io_threads']} reader threads.",
        "",
        "Raw disk, same access pattern (one expert per read at a random expert offset, O_DIRECT):",
        "",
        "| reader threads | GB/s | mean latency per read (ms) |",
        "| ---: | ---: | ---: |",
    ]
    for r in raw:
        lines.append(f"| {r['threads']} | {r['gb_s']:.2f} | {r['latency_ms']:.2f} |")
    lines.append(f"| {burst['batch']} at once, {burst['gap_ms']:.0f} ms idle between batches (decode-like) "
                 f"| {burst['gb_s']:.2f} | - |")
    lines += [
        "",
        f"Decode (raw parallel bandwidth = best of the above, {par:.2f} GB/s; predicted = MB read per token / raw "
        f"parallel bandwidth + compute time per token at 100%; prefetch `prev` = a layer's experts of the previous "
        f"token, queued before the layer runs, `spec` = the next MoE layer's router applied to this layer's input, "
        f"queued while this layer's experts compute):",
        "",
        "| expert I/O | cache budget | policy | prefetch | tok/s | ms/token | hit rate | prefetch hits | MB read/token "
        "| achieved GB/s (% of raw) | stalled ms/token | predicted ms/token | actual / predicted |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        if r["mode"] != "pread":
            lines.append(f"| {r['mode']} (page cache warm) | all | - | - | {r['tok_s']:.2f} | {r['ms_per_tok']:.1f} "
                         "| - | - | - | - | - | - | - |")
            continue
        pred = r["mb_per_tok"] / 1e3 / par * 1e3 + base["ms_per_tok"]
        eff = f"{r['gb_s']:.2f} ({100 * r['gb_s'] / par:.0f}%)" if r["mb_per_tok"] > 0 else "-"
        lines.append(
            f"| pread | {100 * r['frac']:.0f}% ({r['slots']} slots) | {r['policy']} | {r['prefetch']} "
            f"| {r['tok_s']:.2f} | {r['ms_per_tok']:.1f} | {100 * r['hit_rate']:.1f}% | {r['prefetch_hits']} "
            f"| {r['mb_per_tok']:.1f} | {eff} | {r['stall_ms']:.1f} | {pred:.1f} | {r['ms_per_tok'] / pred:.2f} |")
    q = next(r for r in runs
             if r["mode"] == "pread" and r["frac"] == 0.25 and r["policy"] == "lru" and r["prefetch"] == "prev+spec")
    pred = q["mb_per_tok"] / 1e3 / par * 1e3 + base["ms_per_tok"]
    lines += [
        "",
        f"Goals at 25% (lru, prev+spec): expert reads at {100 * q['gb_s'] / par:.0f}% of the raw parallel bandwidth "
        f"(goal >= 80%); decode {q['ms_per_tok']:.1f} ms/token = {q['ms_per_tok'] / pred:.2f}x the prediction "
        f"{pred:.1f} ms (goal <= 1.3x).",
    ]
    return "\n".join(lines) + "\n"


def write_section(md_path: Path, section: str) -> None:
    text = md_path.read_text() if md_path.is_file() else "# Benchmarks\n"
    head = "## Expert streaming"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section + ("" if nxt < 0 else "\n" + text[nxt + 1:])
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md_path.write_text(text)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("MOEFLUX_BENCH_DIR", "/tmp/moeflux-bench")))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--warm", type=int, default=12)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--raw-seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3, help="repeat every measurement, interleaved; report medians")
    p.add_argument("--raw-threads", default="1,2,4,8,16")
    p.add_argument("--io-threads", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="only the three budgets, no policy/prefetch variants")
    p.add_argument("--write-md", action="store_true", help="replace the section in BENCHMARKS.md")
    p.add_argument("--md-out", type=Path, default=None, help="also write the section to this file")
    p.add_argument("--heading", default="## Expert streaming")
    args = p.parse_args(argv)

    mf = build_model(args.dir, args.layers)
    md = moeflux.ModelDir.open(mf)
    files = sorted(md.expert_files.values())
    stride = md.expert_stride
    expert_bytes = stride * md.config.num_experts * len(files)
    print(f"[bench] {mf}: {len(files)} expert files, {expert_bytes / 1e9:.2f} GB", file=sys.stderr)

    drop_page_cache(files)
    threads = [int(x) for x in args.raw_threads.split(",")]
    samples: Dict[int, List[Dict[str, Any]]] = {t: [] for t in threads}
    bursts: List[Dict[str, Any]] = []
    for rnd in range(args.rounds):
        for t in threads:
            r = raw_bandwidth(files, stride, t, args.raw_seconds, seed=rnd)
            samples[t].append(r)
            print(f"[bench] raw O_DIRECT, {t} threads: {r['gb_s']:.2f} GB/s, {r['latency_ms']:.2f} ms/read",
                  file=sys.stderr)
        bursts.append(raw_bursts(files, stride, 8, 0.002, args.raw_seconds, seed=rnd))
        print(f"[bench] raw O_DIRECT bursts: {bursts[-1]}", file=sys.stderr)
    raw = [median_run(samples[t], "gb_s") for t in threads]
    burst = median_run(bursts, "gb_s")

    prompt = [int(x) for x in np.random.default_rng(0).integers(0, md.config.vocab_size, args.prompt)]
    plan = [(1.0, "lru", "prev+spec"), (0.25, "lru", "prev+spec"), (0.5, "lru", "prev+spec")]
    if not args.quick:
        plan += [(0.25, "lru", "prev"), (0.25, "lru", "off"), (0.25, "lfu", "prev+spec"), (0.25, "lfu", "prev")]
    configs = [dict(frac=f, policy=pol, prefetch=pf, mode="pread") for f, pol, pf in plan]
    if not args.quick:
        configs.append(dict(frac=1.0, policy="lru", prefetch="off", mode="mmap"))
    per: List[List[Dict[str, Any]]] = [[] for _ in configs]
    for _ in range(args.rounds):
        for c, out in zip(configs, per):
            r = decode_run(mf, c["frac"], prompt, args.warm, args.tokens, policy=c["policy"], prefetch=c["prefetch"],
                           io_threads=args.io_threads, mode=c["mode"])
            out.append(r)
            print(f"[bench] {json.dumps(r)}", file=sys.stderr)
    runs = [median_run(out, "ms_per_tok") for out in per]
    order = {"prev+spec": 0, "prev": 1, "off": 2}
    runs.sort(key=lambda r: (r["mode"] != "pread", r["frac"], r["policy"] != "lru", order[r["prefetch"]]))

    info = {
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "stride": stride, "layers": args.layers, "expert_gb": expert_bytes / 1e9, "tokens": args.tokens,
        "prompt": args.prompt, "warm": args.warm, "io_threads": args.io_threads, "rounds": args.rounds,
        "direct": all(r.get("direct", True) for r in runs if r["mode"] == "pread"),
    }
    section = markdown(info, raw, runs, args.heading, burst)
    print(section)
    if args.md_out is not None:
        args.md_out.write_text(section)
    if args.write_md:
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
