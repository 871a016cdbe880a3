#!/usr/bin/env python3
"""Held-out loss of the demo model before and after quantization, on the same tokens.

(a) the unquantized Hugging Face checkpoint that ``scripts/train_demo_model.py`` wrote, run with
transformers (fp32, CPU by default), and (b) one or more moeflux model directories (by default the
shipped ``python/moeflux/demo_model``), run with the moeflux engine (``Model.logits`` on each window).
Both see the same tokens: the training script's own corpus collection, held-out rule and stream
encoding (imported from it), cut into the same non-overlapping windows as its ``evaluate``
(``--seq-len`` inputs, each scored on the next token). ``--max-tokens`` limits the count to the
first windows. ``--write-info`` records the numbers, the train log summary and the corpus
description in the shipped directory's ``demo_info.json``.

    python3 scripts/eval_demo_model.py --hf /work/demo_model_out --write-info
    python3 scripts/eval_demo_model.py --hf /work/demo_model_out --model /tmp/dm4 /tmp/dm8 --max-tokens 65536
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "python" / "moeflux" / "demo_model"


def load_train_module():
    """``scripts/train_demo_model.py`` as a module (it is not part of the package)."""
    path = Path(__file__).resolve().parent / "train_demo_model.py"
    spec = importlib.util.spec_from_file_location("train_demo_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def heldout_stream(tdm, corpus_dir: Path, tokenizer_json: Path):
    """(token ids int64, corpus summary, tokenizer sha256) of the held-out split."""
    from tokenizers import Tokenizer

    _, heldout, summary = tdm.collect_corpus(corpus_dir)
    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = tdm.encode_stream(tok, [t for _, t in heldout]).astype(np.int64)
    return ids, summary, hashlib.sha256(tok.to_str().encode()).hexdigest()


def n_windows(n_tokens: int, seq_len: int, max_tokens: int | None) -> int:
    """Window count exactly as the training script's ``evaluate``."""
    n_win = (n_tokens - 1) // seq_len
    if max_tokens is not None:
        n_win = min(n_win, max(1, max_tokens // seq_len))
    return n_win


def hf_loss(tdm, hf_dir: Path, ids: np.ndarray, seq_len: int, max_tokens: int | None, device: str, threads):
    """Mean next-token loss of the fp32 transformers model (the training script's ``evaluate``)."""
    import torch
    from transformers import Qwen3NextForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = Qwen3NextForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(device)
    loss, n = tdm.evaluate(model, torch.from_numpy(ids), seq_len, 8, torch.device(device), max_tokens)
    return loss, n


def moeflux_loss(model_dir: Path, ids: np.ndarray, seq_len: int, max_tokens: int | None, chunk_size: int,
                 progress: bool = True):
    """Mean next-token loss of a moeflux model directory on the same windows (float64 log-softmax)."""
    from moeflux import Model

    m = Model.open(model_dir, chunk_size=chunk_size)
    n_win = n_windows(len(ids), seq_len, max_tokens)
    total, count = 0.0, 0
    t0 = time.time()
    for w in range(n_win):
        win = ids[w * seq_len: w * seq_len + seq_len + 1]
        logits = m.logits(win[:-1]).astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        total += float((lse - logits[np.arange(seq_len), win[1:]]).sum())
        count += seq_len
        if progress and (w + 1) % 25 == 0:
            rate = count / (time.time() - t0)
            print(f"  {model_dir.name}: {w + 1}/{n_win} windows, running loss {total / count:.4f}, "
                  f"{rate:.0f} tok/s", file=sys.stderr, flush=True)
    return total / count, count


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_info(args, tdm, summary, tok_sha, results, model_dir: Path) -> dict:
    """The ``demo_info.json`` record of the shipped model."""
    meta = json.loads((model_dir / "moeflux.json").read_text())
    log = json.loads((args.hf / "train_log.json").read_text()) if (args.hf / "train_log.json").is_file() else {}
    mine = results["moeflux"][str(model_dir)]
    train, ev, model = log.get("train", {}), log.get("eval", {}), log.get("model", {})
    corpus_log = log.get("corpus", {})
    loss_q, loss_f = mine["loss"], results["hf"]["loss"]
    return {
        "name": "moeflux demo: Python stdlib completion model (Qwen3-Next architecture)",
        "architecture": "Qwen3NextForCausalLM: 8 layers (linear_attention x3, full_attention) x2, hidden 256, "
                        "16 experts top-4 + shared expert, vocab 4096 byte-level BPE",
        "params": model.get("params"),
        "active_params_per_token": model.get("active_params_per_token"),
        "bits": meta["bits"],
        "group_size": meta["group_size"],
        "package_bytes": dir_bytes(model_dir),  # without demo_info.json itself
        "heldout_loss": round(loss_f, 4),
        "heldout_loss_quantized": round(loss_q, 4),
        "heldout_loss_increase_pct": round(100.0 * (loss_q - loss_f) / loss_f, 2),
        "heldout_tokens": mine["tokens"],
        "heldout_eval": {
            "unit": "nats/token, mean next-token cross-entropy",
            "windows": f"the first {mine['tokens'] // args.seq_len} non-overlapping windows of {args.seq_len} "
                       f"inputs of the held-out token stream (EOT before every file), each scored on its next token",
            "unquantized": f"transformers {results['hf'].get('transformers')} fp32 on {results['hf'].get('device')}",
            "quantized": f"moeflux CPU backend, Model.logits per window (chunk {args.chunk_size})",
            "other_conversions": {
                f"{v['bits']}-bit, group {v['group_size']}": {
                    "heldout_loss": round(v["loss"], 4),
                    "increase_pct": round(v.get("increase_pct", float("nan")), 2),
                    "bytes": v["bytes"],
                }
                for k, v in results["moeflux"].items()
                if k != str(model_dir)
            },
            "heldout_loss_training_run": round(ev.get("heldout_loss") or float("nan"), 4),
            "train_split_loss_training_run": round(ev.get("train_split_loss") or float("nan"), 4),
        },
        "train": {
            "script": "scripts/train_demo_model.py",
            "args": {k: log.get("args", {}).get(k) for k in ("steps", "batch_size", "seq_len", "lr", "seed")},
            "steps": train.get("steps_done"),
            "tokens_seen": train.get("tokens_seen"),
            "seconds": train.get("seconds"),
            "final_train_loss_mean_last5": round(train.get("final_train_loss_mean_last5") or float("nan"), 4),
            "autocast": train.get("autocast"),
            "versions": log.get("versions"),
            "heldout_subset_curve": {str(r["step"]): r["heldout_subset_loss"] for r in log.get("heldout_curve", [])},
        },
        "corpus": {
            "description": "every *.py file of the CPython standard library, sorted by relative path, skipping "
                           "site-packages, dist-packages, __pycache__ and non-UTF-8 files",
            "python_version": corpus_log.get("corpus_python_version", summary["corpus_python_version"]),
            "heldout_rule": summary["heldout_rule"],
            "n_train_files": corpus_log.get("n_train_files"),
            "n_heldout_files": summary["n_heldout_files"],
            "file_list_sha256": summary["file_list_sha256"],
            "file_list_matches_training_run": summary["file_list_sha256"] == corpus_log.get("file_list_sha256"),
            "tokenizer_sha256": tok_sha,
            "tokenizer_matches_training_run": tok_sha == log.get("tokenizer", {}).get("sha256"),
        },
        "measured": {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                     "python": platform.python_version()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", type=Path, required=True, help="the training script's output directory")
    ap.add_argument("--model", type=Path, nargs="+", default=[SHIPPED], help="moeflux model directories")
    ap.add_argument("--corpus-dir", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first windows (default all)")
    ap.add_argument("--chunk-size", type=int, default=512, help="moeflux prefill chunk")
    ap.add_argument("--device", default="cpu", help="torch device of the transformers run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--skip-hf", action="store_true", help="only the moeflux models")
    ap.add_argument("--write-info", action="store_true", help="write demo_info.json into the first --model")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = ap.parse_args(argv)
    if args.write_info and args.skip_hf:
        ap.error("--write-info needs the unquantized loss (drop --skip-hf)")

    tdm = load_train_module()
    tokenizer = args.model[0] / "tokenizer.json"
    ids, summary, tok_sha = heldout_stream(tdm, args.corpus_dir, tokenizer)
    print(f"held-out: {summary['n_heldout_files']} files, {len(ids)} tokens, file list sha256 "
          f"{summary['file_list_sha256'][:16]}, tokenizer sha256 {tok_sha[:16]}", file=sys.stderr)
    for m in args.model[1:]:
        other = hashlib.sha256((m / "tokenizer.json").read_bytes()).hexdigest()
        if other != hashlib.sha256(tokenizer.read_bytes()).hexdigest():
            raise SystemExit(f"{m}: tokenizer.json differs from {args.model[0]}'s; not the same token set")

    results = {"heldout_files": summary["n_heldout_files"], "heldout_stream_tokens": int(len(ids)),
               "file_list_sha256": summary["file_list_sha256"], "seq_len": args.seq_len, "moeflux": {}}
    if not args.skip_hf:
        import torch
        import transformers

        t0 = time.time()
        loss, n = hf_loss(tdm, args.hf, ids, args.seq_len, args.max_tokens, args.device, args.threads)
        results["hf"] = {"loss": loss, "tokens": n, "seconds": round(time.time() - t0, 1),
                         "transformers": transformers.__version__, "torch": torch.__version__,
                         "device": args.device}
        print(f"unquantized (transformers fp32, {args.device}): {loss:.5f} nats/token on {n} tokens, "
              f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    for m in args.model:
        t0 = time.time()
        meta = json.loads((m / "moeflux.json").read_text())
        loss, n = moeflux_loss(m, ids, args.seq_len, args.max_tokens, args.chunk_size)
        rec = {"loss": loss, "tokens": n, "bits": meta["bits"], "group_size": meta["group_size"],
               "bytes": dir_bytes(m), "seconds": round(time.time() - t0, 1)}
        if "hf" in results:
            rec["increase_pct"] = 100.0 * (loss - results["hf"]["loss"]) / results["hf"]["loss"]
            if n != results["hf"]["tokens"]:
                raise SystemExit(f"token counts differ: {n} vs {results['hf']['tokens']}")
        results["moeflux"][str(m)] = rec
        print(f"{m} ({meta['bits']}-bit, group {meta['group_size']}, {rec['bytes'] / 1e6:.2f} MB): "
              f"{loss:.5f} nats/token on {n} tokens"
              + (f" ({rec['increase_pct']:+.2f}% vs unquantized)" if "increase_pct" in rec else "")
              + f", {time.time() - t0:.0f}s", file=sys.stderr, flush=True)

    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.write_info:
        path = args.model[0] / "demo_info.json"
        path.unlink(missing_ok=True)
        info = build_info(args, tdm, summary, tok_sha, results, args.model[0])
        path.write_text(json.dumps(info, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
