"""The ``moeflux`` command: ``convert``, ``generate``, ``bench`` and ``demo``."""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from typing import Optional, Sequence

import numpy as np

from ._core import MoefluxError

__all__ = ["main"]


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _open(args: argparse.Namespace):
    from .model import Model

    return Model.open(args.model, backend=args.backend, chunk_size=args.chunk_size, expert_io=args.expert_io,
                      expert_cache_gb=args.expert_cache_gb)


def _print_io(model, out=None) -> None:
    """One line on where expert bytes came from and what waiting for them cost."""
    out = out or sys.stderr
    if model.expert_io == "none":
        return
    head = f"[moeflux] expert I/O: {model.expert_io} ({model.expert_io_reason})"
    st = model.expert_stats()
    if st is None:
        print(f"{head}, {model.expert_bytes / 1e9:.2f} GB of experts mapped", file=out)
        return
    io = "direct I/O" if st["direct_io"] else "buffered reads"
    print(
        f"{head}, cache {st['cache_bytes'] / 1e9:.2f} GB of {st['expert_bytes'] / 1e9:.2f} GB = {st['slots']} "
        f"slots, {io}; {st['lookups']} lookups, hit rate {100 * st['hit_rate']:.1f}% (prefetch hits "
        f"{st['prefetch_hits']}, prefetched {st['prefetch_reads']}, wasted {st['prefetch_wasted']}), read "
        f"{st['bytes_read'] / 1e6:.1f} MB ({st['read_mb_per_token']:.2f} MB/token) at {st['gb_per_s']:.2f} GB/s, "
        f"stalled {st['stall_ms_per_token']:.2f} ms/token over {st['tokens']} tokens",
        file=out,
    )


def _print_speed(model, out=None) -> None:
    out = out or sys.stderr
    st = model.stats
    print(
        f"\n[moeflux] prefill {st.prompt_tokens} tok in {st.prefill_s:.3f} s ({st.prefill_tok_s:.1f} tok/s), "
        f"decode {st.generated_tokens} tok in {st.decode_s:.3f} s ({st.decode_tok_s:.1f} tok/s), "
        f"peak RSS {_peak_rss_mib():.0f} MiB",
        file=out,
    )


def _print_plan(model, out=None) -> None:
    out = out or sys.stderr
    r = model.plan_report
    if r is None:
        return
    mib = 1024 * 1024
    print(
        f"[moeflux] memory plan: {r.logical_bytes / mib:.2f} MiB logical -> {r.physical_bytes / mib:.2f} MiB "
        f"physical (lower bound {r.lower_bound_bytes / mib:.2f} MiB; {r.aliased_buffers} buffers share "
        f"{r.colors} colours)",
        file=out,
    )


def _generate(model, prompt: str, args: argparse.Namespace) -> None:
    for piece in model.generate(prompt, max_new_tokens=args.max_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        sys.stdout.write(piece if isinstance(piece, str) else f"{piece} ")
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    convert(args.src, args.dst, bits=args.bits, group_size=args.group_size, progress=not args.quiet)
    print(f"[moeflux] wrote {args.dst}", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    model = _open(args)
    prompt = args.prompt
    if model.tokenizer is None:
        prompt = [int(t) for t in prompt.split()]
    _generate(model, prompt, args)
    _print_speed(model)
    _print_io(model)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    model = _open(args)
    model.reset_expert_stats()
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, model.config.vocab_size, size=args.prompt_tokens).tolist()
    prefill, decode = [], []
    for _ in range(args.runs):
        model.reset()
        t0 = time.perf_counter()
        logits = model.prefill(prompt)
        prefill.append(len(prompt) / (time.perf_counter() - t0))
        tok = int(np.argmax(logits))
        t0 = time.perf_counter()
        for _ in range(args.gen_tokens):
            tok = int(np.argmax(model.decode(tok)))
        decode.append(args.gen_tokens / (time.perf_counter() - t0))
    print(
        f"[moeflux] {args.model} on {args.backend}: prefill {statistics.median(prefill):.1f} tok/s "
        f"({args.prompt_tokens} tokens), decode {statistics.median(decode):.2f} tok/s "
        f"({args.gen_tokens} tokens), median of {args.runs} runs; peak RSS {_peak_rss_mib():.0f} MiB"
    )
    _print_io(model)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_PROMPT, demo_model_dir, describe_demo_model
    from .model import Model

    path = demo_model_dir()
    print(f"[moeflux] demo model: {describe_demo_model(path)}", file=sys.stderr)
    model = Model.open(path, backend=args.backend, expert_io=args.expert_io, expert_cache_gb=args.expert_cache_gb)
    _print_plan(model)
    prompt = args.prompt or DEMO_PROMPT
    print(prompt, end="", flush=True)
    _generate(model, prompt, args)
    _print_speed(model)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeflux", description="Run Qwen3-Next-family MoE models.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face or MLX checkpoint to a moeflux model directory")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--bits", type=int, choices=(4, 8), default=None,
                   help="default: 4 for a Hugging Face source, the source's own for an MLX one")
    c.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None,
                   help="default: 64 for a Hugging Face source, the source's own for an MLX one")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_convert)

    def run_opts(q: argparse.ArgumentParser) -> None:
        q.add_argument("--backend", default="cpu")
        q.add_argument("--chunk-size", type=int, default=64)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--expert-io", choices=("auto", "mmap", "pread"), default=None,
                       help="how experts are read: mmap'd in place or streamed with pread into a cache "
                            "(default: $MOEFLUX_EXPERT_IO, else auto: pread when they do not fit in RAM)")
        q.add_argument("--expert-cache-gb", type=float, default=None,
                       help="pread cache budget in GB (default: $MOEFLUX_EXPERT_CACHE_GB, else half the free RAM)")

    def sample_opts(q: argparse.ArgumentParser, max_tokens: int) -> None:
        q.add_argument("--max-tokens", type=int, default=max_tokens)
        q.add_argument("--temperature", type=float, default=0.0)
        q.add_argument("--top-k", type=int, default=0)
        q.add_argument("--top-p", type=float, default=1.0)

    g = sub.add_parser("generate", help="stream a completion, then print tok/s and peak memory")
    g.add_argument("model")
    g.add_argument("--prompt", required=True, help="text (or space-separated token ids without a tokenizer)")
    run_opts(g)
    sample_opts(g, 64)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="prefill and decode tok/s, median of several runs")
    b.add_argument("model")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--gen-tokens", type=int, default=32)
    b.add_argument("--runs", type=int, default=3)
    run_opts(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="complete a prompt with the embedded demo model")
    d.add_argument("--prompt", default=None)
    run_opts(d)
    sample_opts(d, 48)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        return int(args.func(args) or 0)
    except MoefluxError as e:
        print(f"moeflux: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _entry() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _entry()
