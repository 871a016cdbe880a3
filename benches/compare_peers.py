#!/usr/bin/env python3
"""moeflux vs llama.cpp vs mlx_lm on one synthetic model with the real Qwen3-Next-80B-A3B layer dims.

Builds (once, under ``--workdir``) a random-weight Hugging Face checkpoint with the per-layer shapes of
Qwen3-Next-80B-A3B (hidden 2048, 512 experts top-10, expert and shared inter 512, 16/2 attention heads
of 256, 16/32 linear heads of 128, vocab 151936) and only a few layers, converts it for every engine
at two widths (moeflux 4/8-bit, llama.cpp Q4_0/Q8_0, mlx_lm 4/8-bit), then measures prefill and decode
tok/s of each engine in separate processes (one model in memory at a time), interleaved over several
rounds, with the same thread count everywhere. Each round also measures the memory bandwidth, and
moeflux's decode is reported as a fraction of the bandwidth bound (bytes read per token / bandwidth).

Peers are not dependencies of moeflux: ``llama_cpp`` is imported from ``--llama-py`` (a
``pip install --target`` of llama-cpp-python) and converted with the ``convert_hf_to_gguf.py`` of
``--llama-src`` (the llama.cpp tree vendored in the llama-cpp-python sdist); mlx_lm from the
environment (converted with ``dtype=float32``: its CPU kernels are much slower in bfloat16; it is
timed on a short workload, ``--mlx-*``, since it runs at about 2 tok/s here). A peer that fails to
convert or to load is skipped with a note. The synthetic byte-level tokenizer needs two shims for the
GGUF converter (declared a qwen2 pre-tokenizer; one dummy BPE merge).

Usage::

    python benches/compare_peers.py --workdir /work/peer/bench \\
        --llama-src /work/peer/llama_cpp_python-0.3.36/vendor/llama.cpp --llama-py /work/peer/llama_py

Prints the table for BENCHMARKS.md (and, with ``--profile``, moeflux's per-op timings); ``--json``
writes every sample, ``--from-json`` prints the table of such a file again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

#: Qwen3-Next-80B-A3B per-layer dims (its config.json), with few layers.
REAL_DIMS: Dict[str, Any] = dict(
    hidden_size=2048,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    num_experts=512,
    num_experts_per_tok=10,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=512,
    intermediate_size=5120,
    vocab_size=151936,
    full_attention_interval=4,
    rope_theta=10000000.0,
    partial_rotary_factor=0.25,
    rms_norm_eps=1e-6,
)

ENGINES = ("moeflux", "llama.cpp", "mlx_lm")
HERE = Path(__file__).resolve()


def log(msg: str) -> None:
    print(f"[compare] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- synthetic checkpoint


def write_checkpoint(dst: Path, layers: int, seed: int = 0) -> Path:
    """A random bf16 Qwen3-Next checkpoint with ``REAL_DIMS``, written one layer per shard so that
    peak memory is one layer (~3.3 GB), not the model (``moeflux.synthetic`` holds it all)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from moeflux.synthetic import write_tokenizer

    d = REAL_DIMS
    done = dst / ".complete"
    if done.is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    H, V, E = d["hidden_size"], d["vocab_size"], d["num_experts"]
    nh, nkv, hd = d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]
    nk, nv = d["linear_num_key_heads"], d["linear_num_value_heads"]
    dk, dv = d["linear_key_head_dim"], d["linear_value_head_dim"]
    inter, S = d["moe_intermediate_size"], d["shared_expert_intermediate_size"]
    conv = 2 * nk * dk + nv * dv
    interval = d["full_attention_interval"]
    kinds = ["linear" if (i + 1) % interval else "full" for i in range(layers)]
    rng = np.random.default_rng(seed)
    bf16 = ml_dtypes.bfloat16

    def normal(shape, std: float, mean: float = 0.0) -> np.ndarray:
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= std
        if mean:
            x += mean
        return x.astype(bf16)

    def lin(t: Dict[str, np.ndarray], name: str, out: int, inp: int, gain: float = 1.0) -> None:
        t[name] = normal((out, inp), gain / np.sqrt(inp))

    shards: List[Dict[str, np.ndarray]] = []
    t: Dict[str, np.ndarray] = {}
    t["model.embed_tokens.weight"] = normal((V, H), 1.0)
    lin(t, "lm_head.weight", V, H)
    t["model.norm.weight"] = normal((H,), 0.2)
    shards.append(t)
    weight_map: Dict[str, str] = {}
    total = 0
    n_shards = layers + 1

    def flush(si: int, t: Dict[str, np.ndarray]) -> None:
        nonlocal total
        fname = f"model-{si + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(
            {k: np.ascontiguousarray(v) for k, v in t.items()}, str(dst / fname), metadata={"format": "pt"}
        )
        for k, v in t.items():
            weight_map[k] = fname
            total += v.nbytes

    flush(0, shards.pop())
    for i, kind in enumerate(kinds):
        log(f"checkpoint: layer {i} ({kind})")
        t = {}
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = normal((H,), 0.2)
        t[f"{p}.post_attention_layernorm.weight"] = normal((H,), 0.2)
        if kind == "linear":
            la = f"{p}.linear_attn"
            lin(t, f"{la}.in_proj_qkvz.weight", 2 * nk * dk + 2 * nv * dv, H)
            lin(t, f"{la}.in_proj_ba.weight", 2 * nv, H, gain=2.0)
            t[f"{la}.conv1d.weight"] = normal((conv, 1, 4), 0.5)
            t[f"{la}.A_log"] = np.log(rng.uniform(1.0, 16.0, nv)).astype(bf16)
            t[f"{la}.dt_bias"] = normal((nv,), 0.5, mean=-1.0)
            t[f"{la}.norm.weight"] = normal((dv,), 0.2, mean=1.0)
            lin(t, f"{la}.out_proj.weight", H, nv * dv)
        else:
            sa = f"{p}.self_attn"
            lin(t, f"{sa}.q_proj.weight", 2 * nh * hd, H)
            lin(t, f"{sa}.k_proj.weight", nkv * hd, H)
            lin(t, f"{sa}.v_proj.weight", nkv * hd, H)
            lin(t, f"{sa}.o_proj.weight", H, nh * hd)
            t[f"{sa}.q_norm.weight"] = normal((hd,), 0.2)
            t[f"{sa}.k_norm.weight"] = normal((hd,), 0.2)
        m = f"{p}.mlp"
        lin(t, f"{m}.gate.weight", E, H, gain=3.0)
        for e in range(E):
            lin(t, f"{m}.experts.{e}.gate_proj.weight", inter, H)
            lin(t, f"{m}.experts.{e}.up_proj.weight", inter, H)
            lin(t, f"{m}.experts.{e}.down_proj.weight", H, inter)
        lin(t, f"{m}.shared_expert.gate_proj.weight", S, H)
        lin(t, f"{m}.shared_expert.up_proj.weight", S, H)
        lin(t, f"{m}.shared_expert.down_proj.weight", H, S)
        lin(t, f"{m}.shared_expert_gate.weight", 1, H, gain=2.0)
        flush(i + 1, t)
        del t
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    cfg = dict(d)
    cfg.update(
        architectures=["Qwen3NextForCausalLM"],
        model_type="qwen3_next",
        num_hidden_layers=layers,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        max_position_embeddings=262144,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        output_router_logits=False,
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
        rope_scaling=None,
        torch_dtype="bfloat16",
        bos_token_id=151643,
        eos_token_id=151645,
    )
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer(dst)
    done.write_text("ok\n")
    return dst


# ---------------------------------------------------------------------------- conversions


def _run(cmd: List[str], env: Optional[Dict[str, str]] = None, **kw: Any) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=env, **kw)


def peer_env(args: argparse.Namespace) -> Dict[str, str]:
    env = dict(os.environ)
    t = str(args.threads)
    env.update(RAYON_NUM_THREADS=t, OMP_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, MKL_NUM_THREADS=t)
    paths = [
        p for p in (args.llama_py, str(Path(args.llama_src) / "gguf-py") if args.llama_src else None) if p
    ]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# The converter's tokenizer check knows only hashes of real pre-tokenizers; the synthetic byte-level
# tokenizer is none of them, so it is declared a qwen2 one (the vocabulary is padded to vocab_size).
# llama.cpp refuses a BPE vocabulary without merges, and the synthetic one has none: one dummy
# merge is written.
_GGUF_CONVERT = r"""
import sys
sys.path.insert(0, {src!r})
import gguf
_add = gguf.SpecialVocab.add_to_gguf
def _add_with_merges(self, gw, quiet=False):
    self.merges = self.merges or ["\u0120 \u0120"]
    _add(self, gw, quiet)
gguf.SpecialVocab.add_to_gguf = _add_with_merges
import convert_hf_to_gguf as c
try:
    from conversion import base as _base
    _base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
except ImportError:
    c.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py"] + {argv!r}
c.main()
"""

_GGUF_QUANTIZE = r"""
import ctypes, llama_cpp as L
p = L.llama_model_quantize_default_params()
p.nthread = {threads}
p.ftype = L.LLAMA_FTYPE_MOSTLY_{ftype}
p.allow_requantize = True
p.pure = True
rc = L.llama_model_quantize({src!r}.encode(), {dst!r}.encode(), ctypes.byref(p))
raise SystemExit(rc)
"""


def _prepare_gguf(args: argparse.Namespace, hf: Path, bits: int, env: Dict[str, str]) -> Path:
    """Q8_0 straight from the converter; Q4_0 re-quantized from it with ``pure`` (every matrix,
    ``output`` and ``token_embd`` included, at Q4_0, like moeflux's 4-bit lm_head)."""
    wd = Path(args.workdir)
    q8 = wd / f"llama-L{args.layers}-Q8_0.gguf"
    if not q8.is_file():
        write_checkpoint(hf, args.layers)
        code = _GGUF_CONVERT.format(
            src=str(args.llama_src),
            argv=[str(hf), "--outtype", "q8_0", "--no-mtp", "--outfile", str(q8) + ".partial"],
        )
        _run([sys.executable, "-c", code], env=env)
        os.replace(str(q8) + ".partial", q8)
    if bits == 8:
        return q8
    path = wd / f"llama-L{args.layers}-Q4_0.gguf"
    if not path.is_file():
        code = _GGUF_QUANTIZE.format(
            threads=args.threads, ftype="Q4_0", src=str(q8), dst=str(path) + ".partial"
        )
        _run([sys.executable, "-c", code], env=env)
        os.replace(str(path) + ".partial", path)
    return path


def prepare(args: argparse.Namespace) -> Dict[str, Dict[int, Path]]:
    """Build the checkpoint and every engine's copy of it; returns ``{engine: {bits: path}}``."""
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    hf = wd / f"hf-L{args.layers}"  # written only when some conversion is missing
    out: Dict[str, Dict[int, Path]] = {e: {} for e in args.engines}
    env = peer_env(args)
    for bits in args.bits:
        if "moeflux" in args.engines:
            dst = wd / f"moeflux-L{args.layers}-q{bits}"
            if not (dst / "moeflux.json").is_file():
                from moeflux.convert import convert

                log(f"moeflux convert {bits}-bit")
                write_checkpoint(hf, args.layers)
                convert(hf, dst, bits=bits, group_size=64, progress=False)
            out["moeflux"][bits] = dst
        if "llama.cpp" in args.engines:
            if not args.llama_src or not args.llama_py:
                log("llama.cpp: --llama-src/--llama-py not given, skipped")
            else:
                try:
                    out["llama.cpp"][bits] = _prepare_gguf(args, hf, bits, env)
                except subprocess.CalledProcessError as e:
                    log(f"llama.cpp {bits}-bit: conversion failed ({e}), skipped")
        if "mlx_lm" in args.engines:
            # float32 activations: MLX's CPU kernels are several times slower in bfloat16.
            dst = wd / f"mlx-L{args.layers}-q{bits}-f32"
            if not (dst / "config.json").is_file():
                write_checkpoint(hf, args.layers)
                tmp = dst.with_name(dst.name + ".partial")
                shutil.rmtree(tmp, ignore_errors=True)
                code = (
                    "from mlx_lm import convert; "
                    f"convert({str(hf)!r}, {str(tmp)!r}, quantize=True, q_bits={bits}, q_group_size=64, "
                    "dtype='float32')"
                )
                try:
                    _run([sys.executable, "-c", code], env=env)
                except subprocess.CalledProcessError as e:
                    log(f"mlx_lm {bits}-bit: conversion failed ({e}), skipped")
                    continue
                os.replace(tmp, dst)
            out["mlx_lm"][bits] = dst
    return out


# ---------------------------------------------------------------------------- measurements


def bandwidth(threads: int, mib: int = 512, reps: int = 5) -> Dict[str, float]:
    """Memory bandwidth in GB/s with ``threads`` threads (NumPy releases the GIL): ``copy`` counts
    bytes read + written, ``read`` a sum over the array (bytes read)."""
    n = mib * 1024 * 1024 // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(n), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(reps):
            ts = [threading.Thread(target=fn, args=b) for b in bounds]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            best = min(best, time.perf_counter() - t0)
        return best

    def copy(a: int, b: int) -> None:
        np.copyto(dst[a:b], src[a:b])

    def read(a: int, b: int) -> None:
        src[a:b].sum()

    copy(0, n)  # fault the pages in
    nbytes = n * 4
    return {"copy_gbs": 2 * nbytes / timed(copy) / 1e9, "read_gbs": nbytes / timed(read) / 1e9}


def warm_files(path: Path) -> None:
    """Read a model's files once so every engine starts from the page cache."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    buf = bytearray(64 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def loadavg() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_worker(args: argparse.Namespace, engine: str, path: Path, bits: int) -> Dict[str, Any]:
    warm_files(path)
    prompt, gen, reps = args.prompt_tokens, args.gen_tokens, args.reps
    if engine == "mlx_lm":  # MLX's CPU backend is two orders of magnitude slower here: a short workload
        prompt, gen, reps = args.mlx_prompt_tokens, args.mlx_gen_tokens, 1
    cmd = [
        sys.executable,
        str(HERE),
        "_worker",
        engine,
        str(path),
        "--prompt-tokens",
        str(prompt),
        "--gen-tokens",
        str(gen),
        "--reps",
        str(reps),
        "--threads",
        str(args.threads),
        "--chunk-size",
        str(args.chunk_size),
    ]
    if args.profile and engine == "moeflux":
        cmd.append("--profile")
    env = peer_env(args)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        log(f"{engine} {bits}-bit failed:\n{r.stderr[-3000:]}")
        return {"engine": engine, "bits": bits, "error": r.stderr[-500:]}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(engine=engine, bits=bits, load_avg=loadavg(), prompt_tokens=prompt, gen_tokens=gen)
    return res


# ---------------------------------------------------------------------------- workers (one process each)


def _prompt(n: int, seed: int = 1) -> List[int]:
    return np.random.default_rng(seed).integers(0, 256, size=n).tolist()


def _time_runs(prefill, decode, reset, a: argparse.Namespace) -> Dict[str, Any]:
    """Warm up, then ``reps`` times: prefill the prompt, decode ``gen_tokens`` greedily."""
    prompt = _prompt(a.prompt_tokens)
    reset()
    tok = prefill(prompt[:16])
    for _ in range(4):
        tok = decode(tok)
    pre, dec, toks = [], [], []
    for _ in range(a.reps):
        reset()
        t0 = time.perf_counter()
        tok = prefill(prompt)
        pre.append(len(prompt) / (time.perf_counter() - t0))
        out = [tok]
        t0 = time.perf_counter()
        for _ in range(a.gen_tokens):
            tok = decode(tok)
            out.append(tok)
        dec.append(a.gen_tokens / (time.perf_counter() - t0))
        toks = out
    return {"prefill_tok_s": pre, "decode_tok_s": dec, "tokens": toks[:8]}


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_bytes_per_token(model: Any, position: int) -> Dict[str, int]:
    """Bytes one decode step reads, from the planned decode graph: every quantized matrix (words,
    scales, biases), one embedding row, ``k`` expert blocks per MoE layer, the recurrent states
    (read and written) and the KV cache up to ``position``."""
    from moeflux import ops
    from moeflux._graph import Graph
    from moeflux.convert import expert_block_bytes

    def mat(ref: Any, rows: int, cols: int) -> int:
        ss = 4 if ref.scale_dtype == "f32" else 2
        return rows * cols * ref.bits // 8 + 2 * rows * (cols // ref.group_size) * ss

    out = {"matrices": 0, "experts": 0, "embedding": 0, "state": 0, "kv_cache": 0}
    step = model._step(1, "last")
    for seg in step.segments:
        op_list = seg.ops if isinstance(seg, Graph) else seg.plan_ops()
        for op in op_list:
            if isinstance(op, ops.MatvecNTokens):
                out["matrices"] += mat(op.weight, op.out_dim, op.in_dim)
            elif isinstance(op, ops.EmbedGatherNTokens):
                out["embedding"] += mat(op.weight, 1, op.hidden_dim)
            elif isinstance(op, ops.MoeGatherIdFuse):
                lay = op.layout
                out["experts"] += op.k * expert_block_bytes(
                    lay.hidden_dim, lay.inter_dim, lay.bits, lay.group_size, lay.scale_dtype
                )
    cfg = model.config
    for name, b in model.state.items():
        if name.endswith("_cache"):
            out["kv_cache"] += position * cfg.kv_dim * 4
        else:
            out["state"] += 2 * b.nbytes
    out["total"] = sum(out.values())
    return out


def gguf_bytes_per_token(path: Path) -> Dict[str, int]:
    """Weight bytes one llama.cpp decode step reads: every tensor, one row of ``token_embd``, and
    ``k / n_experts`` of each stacked expert tensor (``*_exps``); recurrent state and KV not counted."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")

    def field(name: str) -> int:
        return int(r.fields[f"{arch}.{name}"].parts[-1][0])

    k, e = field("expert_used_count"), field("expert_count")
    out = {"matrices": 0, "experts": 0, "embedding": 0}
    for t in r.tensors:
        if t.name.startswith("token_embd"):
            out["embedding"] += int(t.n_bytes) // int(t.shape[-1])
        elif "_exps" in t.name:
            out["experts"] += int(t.n_bytes) * k // e
        else:
            out["matrices"] += int(t.n_bytes)
    out["total"] = sum(out.values())
    return out


def _profile_moeflux(model: Any, prompt: List[int], n: int) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per-op timings (``profile_per_op``) of one prefill of ``prompt`` and of ``n`` decode steps,
    summed by op kind (layer prefix stripped), in ms per token."""
    be = model.backend

    def by_kind(tokens: int, wall: float) -> Dict[str, Dict[str, float]]:
        by: Dict[str, Dict[str, float]] = {}
        for label, s in be.stats().items():
            kind = re.sub(r"^L\d+\.", "", label)
            d = by.setdefault(kind, {"ms_per_token": 0.0, "calls_per_token": 0.0})
            d["ms_per_token"] += s["total_s"] * 1e3 / tokens
            d["calls_per_token"] += s["count"] / tokens
        by["_wall"] = {"ms_per_token": wall * 1e3 / tokens, "calls_per_token": 1.0}
        return dict(sorted(by.items(), key=lambda kv: -kv[1]["ms_per_token"]))

    model.reset()
    be.profile_per_op = True
    be.clear_stats()
    t0 = time.perf_counter()
    tok = int(np.argmax(model.prefill(prompt)))
    pre = by_kind(len(prompt), time.perf_counter() - t0)
    be.clear_stats()
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(model.decode(tok)))
    dec = by_kind(n, time.perf_counter() - t0)
    be.profile_per_op = False
    return {"prefill": pre, "decode": dec}


def worker(a: argparse.Namespace) -> Dict[str, Any]:
    path = Path(a.path)
    t0 = time.perf_counter()
    res: Dict[str, Any] = {}
    if a.engine == "moeflux":
        from moeflux import Model

        m = Model.open(path, chunk_size=a.chunk_size)
        res["load_s"] = time.perf_counter() - t0

        def prefill(ids: List[int]) -> int:
            return int(np.argmax(m.prefill(ids)))

        def decode(tok: int) -> int:
            return int(np.argmax(m.decode(tok)))

        res.update(_time_runs(prefill, decode, m.reset, a))
        res["bytes_per_token"] = decode_bytes_per_token(m, a.prompt_tokens + a.gen_tokens // 2)
        if a.profile:
            res["profile"] = _profile_moeflux(m, _prompt(a.prompt_tokens), a.gen_tokens)
    elif a.engine == "llama.cpp":
        import llama_cpp
        from llama_cpp import Llama

        llm = Llama(
            model_path=str(path),
            n_ctx=512,
            n_batch=512,
            n_ubatch=512,
            n_threads=a.threads,
            n_threads_batch=a.threads,
            verbose=False,
        )
        res["load_s"] = time.perf_counter() - t0
        res["version"] = llama_cpp.__version__

        n_vocab = llm.n_vocab()

        def last_logits() -> np.ndarray:  # Llama.eval keeps no logits unless logits_all
            ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

        def prefill(ids: List[int]) -> int:
            llm.eval(ids)
            return int(np.argmax(last_logits()))

        def decode(tok: int) -> int:
            llm.eval([tok])
            return int(np.argmax(last_logits()))

        res.update(_time_runs(prefill, decode, llm.reset, a))
        res["bytes_per_token"] = gguf_bytes_per_token(path)  # reset() also clears the memory
    elif a.engine == "mlx_lm":
        import mlx.core as mx
        import mlx_lm
        from mlx_lm import load
        from mlx_lm.models.cache import make_prompt_cache

        mx.set_default_device(mx.cpu)
        model, _ = load(str(path))
        res["load_s"] = time.perf_counter() - t0
        res["version"] = f"mlx_lm {mlx_lm.__version__}, mlx {mx.__version__}"
        state: Dict[str, Any] = {}

        def reset() -> None:
            state["cache"] = make_prompt_cache(model)

        def prefill(ids: List[int]) -> int:
            logits = model(mx.array(ids)[None], cache=state["cache"])
            return int(mx.argmax(logits[0, -1]).item())

        def decode(tok: int) -> int:
            logits = model(mx.array([[tok]]), cache=state["cache"])
            return int(mx.argmax(logits[0, -1]).item())

        res.update(_time_runs(prefill, decode, reset, a))
    else:
        raise SystemExit(f"unknown engine {a.engine}")
    res["peak_rss_mib"] = _peak_rss_mib()
    return res


# ---------------------------------------------------------------------------- report


def machine() -> Dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // (1024 * 1024)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": mem, "python": platform.python_version()}


def summarize(samples: List[Dict[str, Any]], bw: List[Dict[str, float]]) -> List[Dict[str, Any]]:
    rows = []
    bw_read = statistics.median(b["read_gbs"] for b in bw) if bw else 0.0
    keys = sorted(
        {(s["bits"], s["engine"]) for s in samples if "error" not in s},
        key=lambda k: (k[0], ENGINES.index(k[1])),
    )
    for bits, eng in keys:
        ss = [s for s in samples if s["engine"] == eng and s["bits"] == bits and "error" not in s]
        pre = [x for s in ss for x in s["prefill_tok_s"]]
        dec = [x for s in ss for x in s["decode_tok_s"]]
        row = {
            "bits": bits,
            "engine": eng,
            "prefill": statistics.median(pre),
            "decode": statistics.median(dec),
            "decode_min": min(dec),
            "decode_max": max(dec),
            "n": len(dec),
            "version": ss[0].get("version", ""),
            "rss": max(s["peak_rss_mib"] for s in ss),
            "workload": f"{ss[0].get('prompt_tokens', '?')}+{ss[0].get('gen_tokens', '?')}",
        }
        if "bytes_per_token" in ss[0]:
            b = ss[0]["bytes_per_token"]["total"]
            row["mb_per_token"] = b / 1e6
            row["bound_tok_s"] = bw_read * 1e9 / b
            row["of_bound"] = row["decode"] / row["bound_tok_s"]
        rows.append(row)
    for r in rows:
        ref = next((x for x in rows if x["bits"] == r["bits"] and x["engine"] == "llama.cpp"), None)
        if ref:
            r["decode_vs_llama"] = r["decode"] / ref["decode"]
            r["prefill_vs_llama"] = r["prefill"] / ref["prefill"]
    return rows


def markdown(
    rows: List[Dict[str, Any]], bw: List[Dict[str, float]], args: argparse.Namespace, loads: List[List[float]]
) -> str:
    out = [
        "| width | engine | prompt+gen tokens | prefill tok/s | decode tok/s (min-max) | decode vs llama.cpp | "
        "MB read/token | bandwidth bound tok/s | decode / bound | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        width = {4: {"llama.cpp": "Q4_0"}, 8: {"llama.cpp": "Q8_0"}}[r["bits"]].get(
            r["engine"], f"{r['bits']}-bit"
        )
        out.append(
            f"| {width} | {r['engine']} | {r['workload']} | {r['prefill']:.1f} | {r['decode']:.2f} ({r['decode_min']:.2f}-"
            f"{r['decode_max']:.2f}) | {r.get('decode_vs_llama', float('nan')):.2f}x | "
            + (
                f"{r['mb_per_token']:.1f} | {r['bound_tok_s']:.1f} | {r['of_bound']:.2f} |"
                if "mb_per_token" in r
                else " | | |"
            )
            + f" {r['rss']:.0f} |"
        )
    if bw:
        out.append("")
        out.append(
            f"Bandwidth ({args.threads} threads, 512 MiB, median of {len(bw)} rounds): read "
            f"{statistics.median(b['read_gbs'] for b in bw):.1f} GB/s (the bound uses it), copy "
            f"{statistics.median(b['copy_gbs'] for b in bw):.1f} GB/s counting bytes read + written; "
            "load average during runs "
            f"{min(min(x) for x in loads):.1f}-{max(max(x) for x in loads):.1f}."
        )
    return "\n".join(out)


def report(info: Dict[str, Any], args: argparse.Namespace) -> None:
    """Print the machine, the table and the first moeflux profile of a run."""
    samples, bws = info["samples"], info["bandwidth"]
    loads = info.get("loads") or [s["load_avg"] for s in samples if "load_avg" in s]
    args = argparse.Namespace(**{**vars(args), "threads": info["args"].get("threads", args.threads)})
    print(f"{info['date']}: {json.dumps(info['machine'])}")
    print(markdown(summarize(samples, bws), bws, args, loads))
    for s in samples:
        if "profile" in s:
            for phase, prof in s["profile"].items():
                print(f"\nmoeflux {s['bits']}-bit {phase} profile (ms per token, by op kind):")
                for k, v in list(prof.items())[:16]:
                    print(f"  {k:28s} {v['ms_per_token']:8.3f} ms  ({v['calls_per_token']:.2f} calls)")
            break


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_worker":
        p = argparse.ArgumentParser()
        p.add_argument("engine")
        p.add_argument("path")
        p.add_argument("--prompt-tokens", type=int, default=128)
        p.add_argument("--gen-tokens", type=int, default=32)
        p.add_argument("--reps", type=int, default=2)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--chunk-size", type=int, default=64)
        p.add_argument("--profile", action="store_true")
        a = p.parse_args(argv[1:])
        print(json.dumps(worker(a)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/moeflux-peers")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--bits", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8])
    p.add_argument("--engines", type=lambda s: s.split(","), default=list(ENGINES))
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=2, help="timed runs per engine per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=64, help="moeflux prefill chunk")
    p.add_argument("--mlx-prompt-tokens", type=int, default=16)
    p.add_argument("--mlx-gen-tokens", type=int, default=4)
    p.add_argument("--mlx-rounds", type=int, default=1, help="rounds that include mlx_lm")
    p.add_argument(
        "--llama-src",
        default=os.environ.get("LLAMA_CPP_SRC"),
        help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)",
    )
    p.add_argument(
        "--llama-py", default=os.environ.get("LLAMA_CPP_PY"), help="directory holding the llama_cpp package"
    )
    p.add_argument("--profile", action="store_true", help="add moeflux per-op decode timings")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--json", default=None, help="write all samples here")
    p.add_argument("--from-json", default=None, help="only print the table of an earlier --json file")
    args = p.parse_args(argv)
    if args.from_json:
        info = json.loads(Path(args.from_json).read_text())
        report(info, args)
        return 0
    paths = prepare(args)
    if args.prepare_only:
        return 0
    samples: List[Dict[str, Any]] = []
    bws: List[Dict[str, float]] = []
    loads: List[List[float]] = []
    for rnd in range(args.rounds):
        bws.append(bandwidth(args.threads))
        loads.append(loadavg())
        log(f"round {rnd + 1}: bandwidth {bws[-1]}, load {loads[-1]}")
        order = [
            (e, b)
            for b in args.bits
            for e in args.engines
            if b in paths.get(e, {}) and (e != "mlx_lm" or rnd < args.mlx_rounds)
        ]
        if rnd % 2:
            order.reverse()
        for eng, bits in order:
            r = run_worker(args, eng, paths[eng][bits], bits)
            r["round"] = rnd
            samples.append(r)
            loads.append(r.get("load_avg", loadavg()))
            if "error" not in r:
                log(
                    f"{eng} {bits}-bit: prefill {np.median(r['prefill_tok_s']):.1f} tok/s, decode "
                    f"{np.median(r['decode_tok_s']):.2f} tok/s, load {r['load_avg']}"
                )
    info = {
        "machine": machine(),
        "args": dict(vars(args)),
        "bandwidth": bws,
        "loads": loads,
        "samples": samples,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1, default=str))
    report(info, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
