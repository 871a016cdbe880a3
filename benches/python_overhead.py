#!/usr/bin/env python3
"""Share of a moeflux decode step spent in Python rather than in the backend.

For each model, decodes ``--steps`` tokens greedily and times, per token:

* ``step``: the wall time of ``Model.decode`` (upload the id, patch positions, execute, download
  the logits);
* ``backend``: the time the backend records for its ``execute`` calls of that step
  (``Backend.stats()``, per-op profiling off);
* ``loop``: ``decode`` plus the greedy pick (``np.argmax`` of the logits), i.e. what a generation
  loop costs per token.

Python overhead = ``step - backend`` (and ``loop - backend``), reported as a share of the step,
median over steps. A cProfile pass then lists where that Python time goes and checks that no op
object is built per token (calls into ``moeflux/ops.py`` while decoding).

Models: ``tiny`` (``moeflux.synthetic.make_qwen3_next`` defaults, converted to 4 bits in a temporary
directory) and any moeflux model directories given with ``--model`` (e.g. the real-dims model that
``benches/compare_peers.py`` builds).

Usage::

    python benches/python_overhead.py --model /work/peer/bench/moeflux-L4-q4
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np


def tiny_model(root: Path) -> Path:
    from moeflux.convert import convert
    from moeflux.synthetic import make_qwen3_next

    src = make_qwen3_next(root / "hf", seed=3)
    return convert(src, root / "mf", bits=4, group_size=64, progress=False)


def measure(path: Path, steps: int, prompt_tokens: int, profile: bool) -> Dict[str, Any]:
    from moeflux import Model

    m = Model.open(path)
    be = m.backend
    be.profile_per_op = False
    prompt = np.random.default_rng(0).integers(0, min(256, m.config.vocab_size), prompt_tokens).tolist()
    m.reset()
    tok = int(np.argmax(m.prefill(prompt)))
    for _ in range(3):  # warm-up
        tok = int(np.argmax(m.decode(tok)))
    step_s: List[float] = []
    loop_s: List[float] = []
    backend_s: List[float] = []
    for _ in range(steps):
        if m.position >= m.max_seq_len - 1:
            m.reset()
            tok = int(np.argmax(m.prefill(prompt)))
        be.clear_stats()
        t0 = time.perf_counter()
        logits = m.decode(tok)
        t1 = time.perf_counter()
        tok = int(np.argmax(logits))
        t2 = time.perf_counter()
        backend_s.append(sum(s["total_s"] for s in be.stats().values()))
        step_s.append(t1 - t0)
        loop_s.append(t2 - t0)
    step_over = [s - b for s, b in zip(step_s, backend_s)]
    loop_over = [s - b for s, b in zip(loop_s, backend_s)]
    out: Dict[str, Any] = {
        "model": str(path),
        "summary": m.config.to_summary() if hasattr(m.config, "to_summary") else "",
        "step_ms": statistics.median(step_s) * 1e3,
        "backend_ms": statistics.median(backend_s) * 1e3,
        "python_ms": statistics.median(step_over) * 1e3,
        "loop_python_ms": statistics.median(loop_over) * 1e3,
        "python_share": statistics.median(o / s for o, s in zip(step_over, step_s)),
        "loop_python_share": statistics.median(o / s for o, s in zip(loop_over, loop_s)),
        # Sums over all steps: robust to a noisy neighbour inflating a few steps.
        "python_share_total": sum(step_over) / sum(step_s),
    }
    if profile:
        out.update(_profile(m, tok, steps))
    return out


def _profile(m: Any, tok: int, steps: int) -> Dict[str, Any]:
    """cProfile of ``steps`` decode steps: the top Python functions by own time, and how many calls
    per token land in ``moeflux/ops.py`` (op construction; expected 0)."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        tok = int(np.argmax(m.decode(tok)))
    pr.disable()
    st = pstats.Stats(pr)
    rows = []
    ops_calls = 0
    for (fname, line, func), (_cc, nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if fname.replace("\\", "/").endswith("moeflux/ops.py"):
            ops_calls += nc
        rows.append((tt, nc, f"{Path(fname).name}:{line}({func})" if line else func))
    rows.sort(reverse=True)
    return {
        "ops_py_calls_per_token": ops_calls / steps,
        "python_calls_per_token": sum(r[1] for r in rows) / steps,
        "top": [
            {"fn": f, "us_per_token": tt * 1e6 / steps, "calls_per_token": nc / steps}
            for tt, nc, f in rows[:12]
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], help="moeflux model directory (repeatable)")
    p.add_argument("--no-tiny", action="store_true")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [] if args.no_tiny else [("tiny", tiny_model(Path(tmp)))]
        paths += [(Path(x).name, Path(x)) for x in args.model]
        for name, path in paths:
            r = measure(path, args.steps, args.prompt_tokens, not args.no_profile)
            r["name"] = name
            results.append(r)
    print("| model | decode step ms | in backend ms | Python ms (share) | with argmax: Python ms (share) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['name']} | {r['step_ms']:.3f} | {r['backend_ms']:.3f} | {r['python_ms']:.3f} "
            f"({100 * r['python_share']:.1f}%) | {r['loop_python_ms']:.3f} ({100 * r['loop_python_share']:.1f}%) |"
        )
    for r in results:
        if "top" not in r:
            continue
        print(
            f"\n{r['name']}: {r['python_calls_per_token']:.0f} Python calls/token, "
            f"{r['ops_py_calls_per_token']:.1f} in moeflux/ops.py (op construction); top own time:"
        )
        for t in r["top"]:
            print(f"  {t['us_per_token']:8.1f} us/token  {t['calls_per_token']:6.1f} calls  {t['fn']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
