#!/usr/bin/env python3
"""Train the small Qwen3-Next-architecture demo model that ships with moeflux.

The corpus is the Python standard library's own source (present on every machine, no download), so the result is a
small Python-code completion model. The script:

1. collects ``*.py`` files under ``--corpus-dir`` (default: this interpreter's stdlib), sorted by relative path,
   skipping ``site-packages``/``dist-packages``/``__pycache__`` and files that are not valid UTF-8;
2. splits them into train / held-out by a hash of the relative path (``sha256(path) % 50 == 0`` is held out), so the
   same file is held out under every Python version even though the file lists differ;
3. trains a byte-level BPE tokenizer (``tokenizers``) on the training split, with ``<|endoftext|>`` as the single
   special token (EOS, also placed before every file);
4. trains ``Qwen3NextForCausalLM`` (both layer types, sparse MoE with a shared expert) on random windows of the
   concatenated training tokens, AdamW + warmup + cosine, bf16 autocast on CUDA with fp32 master weights;
5. evaluates the held-out loss in fp32 and saves the model (fp32 safetensors), the tokenizer files and
   ``train_log.json`` (config, corpus hashes, loss curve, final numbers) into ``--out``.

``--eval-only DIR`` instead loads a saved model directory and reports its held-out loss on this machine's corpus
(the file split is by path, so it is comparable across Python versions as long as the same paths are held out).

Everything is seeded (``--seed``); with the same corpus, device and library versions a run is repeatable up to
the nondeterminism of CUDA's atomic adds in the backward pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

EOT = "<|endoftext|>"
HOLDOUT_MOD = 50
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


# ----------------------------------------------------------------------------------------------------------------
# Corpus


def collect_corpus(root: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict]:
    """Return (train, heldout) lists of (relative path, text) and a summary dict with hashes."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                full = Path(dirpath) / name
                paths.append(full.relative_to(root).as_posix())
    paths.sort()
    train, heldout, skipped = [], [], []
    list_hash = hashlib.sha256()
    content_hash = hashlib.sha256()
    heldout_list = []
    for rel in paths:
        raw = (root / rel).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        if not text.strip():
            continue
        list_hash.update(rel.encode() + b"\n")
        content_hash.update(rel.encode() + b"\0" + hashlib.sha256(raw).digest())
        if is_heldout(rel):
            heldout.append((rel, text))
            heldout_list.append(rel)
        else:
            train.append((rel, text))
    summary = {
        "corpus_dir": str(root),
        "interpreter_python_version": platform.python_version(),
        "corpus_python_version": corpus_version_guess(root),
        "n_files": len(train) + len(heldout),
        "n_train_files": len(train),
        "n_heldout_files": len(heldout),
        "n_skipped_non_utf8": len(skipped),
        "train_bytes": sum(len(t.encode()) for _, t in train),
        "heldout_bytes": sum(len(t.encode()) for _, t in heldout),
        "file_list_sha256": list_hash.hexdigest(),
        "content_sha256": content_hash.hexdigest(),
        "heldout_rule": f"sha256(relative posix path) as big-endian int % {HOLDOUT_MOD} == 0",
        "heldout_files": heldout_list,
    }
    return train, heldout, summary


def corpus_version_guess(root: Path) -> str | None:
    """The Python version named in the corpus path (``.../python3.11`` or a copy named ``python3.11.7``)."""
    import re

    found = re.findall(r"python(3\.\d+(?:\.\d+)?)", str(root.resolve()))
    return found[-1] if found else None


def is_heldout(rel: str) -> bool:
    """The held-out rule: a stable hash of the relative path, independent of which other files exist."""
    return int.from_bytes(hashlib.sha256(rel.encode()).digest(), "big") % HOLDOUT_MOD == 0


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def save_tokenizer(tok, out: Path, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    # The generic class name loads under every transformers version (v5's own name is TokenizersBackend).
    p = out / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def encode_stream(tok, texts: list[str]):
    """Concatenate the files as ``EOT file EOT file ...`` (the stream starts with EOT)."""
    import numpy as np

    eot = tok.token_to_id(EOT)
    encs = tok.encode_batch(texts, add_special_tokens=False)
    parts = []
    for e in encs:
        parts.append(np.array([eot] + e.ids, dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# ----------------------------------------------------------------------------------------------------------------
# Model


def make_config(vocab_size: int, eot_id: int, args):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,  # unused: every layer is sparse
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=max(1, args.hidden_size // 128),
        head_dim=64,
        linear_num_key_heads=max(1, args.hidden_size // 128),
        linear_num_value_heads=max(2, args.hidden_size // 64),
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate,
        shared_expert_intermediate_size=args.shared_intermediate,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        router_aux_loss_coef=args.aux_coef,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        full_attention_interval=args.full_attention_interval,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        use_cache=True,
    )


def add_legacy_config_keys(out: Path, args) -> None:
    """Also write the hub-style top-level keys (mlx_lm and older loaders read these, not layer_types)."""
    p = out / "config.json"
    cfg = json.loads(p.read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("full_attention_interval", args.full_attention_interval)
    cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    cfg.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25))
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lm_loss(logits, targets):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def evaluate(
    model, tokens, seq_len: int, batch_size: int, device, max_tokens: int | None = None
) -> tuple[float, int]:
    """Mean next-token loss (nats) over non-overlapping windows of ``tokens``, fp32, no autocast."""
    import torch

    n_win = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n_win = min(n_win, max(1, max_tokens // seq_len))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b0 in range(0, n_win, batch_size):
            idx = torch.arange(b0, min(n_win, b0 + batch_size)) * seq_len
            win = torch.stack([tokens[i : i + seq_len + 1] for i in idx.tolist()]).to(device)
            logits = model(input_ids=win[:, :-1], use_cache=False).logits
            loss = lm_loss(logits, win[:, 1:])
            n = win[:, 1:].numel()
            total += loss.item() * n
            count += n
    if was_training:
        model.train()
    return (total / max(count, 1)), count


# ----------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="output directory (created)")
    ap.add_argument("--corpus-dir", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default: min(200, steps // 10))")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    ap.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="autocast dtype (default: bf16 on cuda)"
    )
    ap.add_argument("--max-minutes", type=float, default=None, help="stop training cleanly after this long")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--full-attention-interval", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-intermediate", type=int, default=64)
    ap.add_argument("--shared-intermediate", type=int, default=256)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument(
        "--eval-every", type=int, default=250, help="held-out subset eval period (0: only at the end)"
    )
    ap.add_argument("--eval-subset-tokens", type=int, default=65536)
    ap.add_argument("--eval-max-tokens", type=int, default=None, help="cap for the final held-out eval")
    ap.add_argument("--max-shard-size", default="100MB")
    ap.add_argument("--eval-only", type=Path, default=None, help="evaluate a saved model directory and exit")
    args = ap.parse_args(argv)
    for name in ("hidden_size", "moe_intermediate", "shared_intermediate"):
        if getattr(args, name) % 64:
            ap.error(
                f"--{name.replace('_', '-')} must be a multiple of 64 (the engine quantizes in groups of 64)"
            )
    if args.eval_only is None and args.out is None:
        ap.error("--out is required")
    return args


def log(msg: str) -> None:
    print(msg, flush=True)


def eval_only(args) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3NextForCausalLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _, heldout, summary = collect_corpus(args.corpus_dir)
    tok = Tokenizer.from_file(str(args.eval_only / "tokenizer.json"))
    ids = torch.from_numpy(encode_stream(tok, [t for _, t in heldout]).astype("int64"))
    model = Qwen3NextForCausalLM.from_pretrained(str(args.eval_only), dtype=torch.float32).to(device)
    t0 = time.time()
    loss, n = evaluate(model, ids, args.seq_len, args.batch_size, device, args.eval_max_tokens)
    bpb = loss / math.log(2) / (summary["heldout_bytes"] / max(1, len(ids)))
    log(
        json.dumps(
            {
                "model": str(args.eval_only),
                "corpus_python_version": summary["corpus_python_version"],
                "heldout_files": summary["n_heldout_files"],
                "file_list_sha256": summary["file_list_sha256"],
                "heldout_loss": loss,
                "heldout_tokens": n,
                "heldout_bits_per_byte_approx": bpb,
                "seconds": round(time.time() - t0, 1),
            },
            indent=2,
        )
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.eval_only is not None:
        eval_only(args)
        return

    import numpy as np
    import torch
    import transformers
    from transformers import Qwen3NextForCausalLM

    t_start = time.time()
    deadline = None if args.max_minutes is None else t_start + 60.0 * args.max_minutes
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # Corpus and tokenizer
    train_files, heldout_files, corpus = collect_corpus(args.corpus_dir)
    log(
        f"corpus: {corpus['corpus_dir']} (Python {corpus['corpus_python_version']}): {corpus['n_train_files']} train / "
        f"{corpus['n_heldout_files']} held-out files, {corpus['train_bytes']} / {corpus['heldout_bytes']} bytes, "
        f"{corpus['n_skipped_non_utf8']} non-UTF-8 skipped, file list sha256 {corpus['file_list_sha256'][:16]}"
    )
    t0 = time.time()
    tok = train_tokenizer([t for _, t in train_files], args.vocab_size)
    vocab = tok.get_vocab_size()
    eot_id = tok.token_to_id(EOT)
    train_ids = encode_stream(tok, [t for _, t in train_files])
    heldout_ids = encode_stream(tok, [t for _, t in heldout_files])
    tok_sha = hashlib.sha256(tok.to_str().encode()).hexdigest()
    log(
        f"tokenizer: vocab {vocab}, eot id {eot_id}, {len(train_ids)} train / {len(heldout_ids)} held-out tokens, "
        f"{corpus['train_bytes'] / max(1, len(train_ids)):.2f} bytes/token, sha256 {tok_sha[:16]}, "
        f"{time.time() - t0:.1f}s"
    )
    save_tokenizer(tok, out, model_max_length=4096)
    train_t = torch.from_numpy(train_ids.astype(np.int64))
    heldout_t = torch.from_numpy(heldout_ids.astype(np.int64))
    bytes_per_tok_heldout = corpus["heldout_bytes"] / max(1, len(heldout_ids))

    # Model
    config = make_config(vocab, eot_id, args)
    torch.manual_seed(args.seed)
    model = Qwen3NextForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    n_active = n_params - n_expert + n_expert * args.top_k // args.experts
    model.to(device)
    model.train()
    experts_impl = getattr(model.config, "_experts_implementation", None)
    log(
        f"model: {n_params / 1e6:.3f} M params ({n_active / 1e6:.3f} M active per token), layer types "
        f"{config.layer_types}, experts impl {experts_impl}, device {device}, autocast {dtype}"
    )

    opt = torch.optim.AdamW(
        param_groups(model, args.weight_decay),
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )
    warmup = args.warmup if args.warmup is not None else min(200, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (
            args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        )

    gen = torch.Generator().manual_seed(args.seed)
    n_start = len(train_t) - args.seq_len - 1
    offsets = torch.arange(args.seq_len + 1)
    curve, evals = [], []
    tokens_seen = 0
    t_train = time.time()
    t_last, tok_last = t_train, 0
    step = 0
    stopped_by = "steps"
    for step in range(args.steps):
        if deadline is not None and time.time() >= deadline:
            stopped_by = "max-minutes"
            break
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n_start, (args.batch_size,), generator=gen)
        batch = train_t[starts[:, None] + offsets].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outp = model(input_ids=batch[:, :-1], use_cache=False, output_router_logits=True)
        loss = lm_loss(outp.logits, batch[:, 1:])
        aux = outp.aux_loss.float() if outp.aux_loss is not None else torch.zeros((), device=device)
        total = loss + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        tokens_seen += batch[:, 1:].numel()
        if step % args.log_every == 0 or step == args.steps - 1:
            lv, av, gv = loss.item(), aux.item(), gnorm.item()
            now = time.time()
            tps = (tokens_seen - tok_last) / max(1e-9, now - t_last)
            t_last, tok_last = now, tokens_seen
            rec = {
                "step": step,
                "loss": round(lv, 5),
                "aux": round(av, 5),
                "grad_norm": round(gv, 4),
                "lr": lr,
                "tokens": tokens_seen,
                "elapsed_s": round(now - t_train, 2),
                "tok_per_s": round(tps),
            }
            curve.append(rec)
            log(
                f"step {step:6d} loss {lv:.4f} aux {av:.3f} gnorm {gv:.3f} lr {lr:.2e} "
                f"tok {tokens_seen} {tps:,.0f} tok/s {now - t_train:.0f}s"
            )
            if not math.isfinite(lv):
                raise SystemExit("loss is not finite")
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            hl, hn = evaluate(
                model, heldout_t, args.seq_len, args.batch_size, device, args.eval_subset_tokens
            )
            evals.append({"step": step, "heldout_subset_loss": round(hl, 5), "tokens": hn})
            log(f"eval step {step} held-out subset loss {hl:.4f} ({hn} tokens)")
            t_last = time.time()
    else:
        step = args.steps
    steps_done = step
    train_seconds = time.time() - t_train
    log(
        f"training stopped by {stopped_by} after {steps_done} steps, {tokens_seen} tokens, {train_seconds:.1f}s"
    )

    # Final evaluation (fp32, no autocast)
    t0 = time.time()
    held_loss, held_n = evaluate(
        model, heldout_t, args.seq_len, args.batch_size, device, args.eval_max_tokens
    )
    train_loss_eval, train_n = evaluate(model, train_t, args.seq_len, args.batch_size, device, held_n)
    bpb = held_loss / math.log(2) / bytes_per_tok_heldout
    log(
        f"final: held-out loss {held_loss:.4f} ({held_n} tokens, ~{bpb:.3f} bits/byte), "
        f"train-split loss {train_loss_eval:.4f} ({train_n} tokens), eval {time.time() - t0:.1f}s"
    )

    # Sample
    sample = None
    try:
        from transformers import PreTrainedTokenizerFast

        hf_tok = PreTrainedTokenizerFast.from_pretrained(str(out))
        prompt = "def fibonacci(n):"
        enc = hf_tok(prompt, return_tensors="pt").to(device)
        model.eval()
        with torch.no_grad():
            gen_ids = model.generate(**enc, max_new_tokens=64, do_sample=False, pad_token_id=eot_id)
        sample = {"prompt": prompt, "completion": hf_tok.decode(gen_ids[0, enc["input_ids"].shape[1] :])}
        log(f"sample greedy completion of {prompt!r}:\n{prompt}{sample['completion']}")
    except Exception as e:  # a sample is a nicety; never lose the checkpoint over it
        log(f"sample generation failed: {e!r}")

    # Save
    model.to("cpu").to(torch.float32)
    model.save_pretrained(str(out), max_shard_size=args.max_shard_size)
    add_legacy_config_keys(out, args)
    saved = sorted(p.name for p in out.iterdir())
    run_log = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor(),
        },
        "corpus": corpus,
        "tokenizer": {
            "vocab_size": vocab,
            "eot_id": eot_id,
            "sha256": tok_sha,
            "train_tokens": int(len(train_ids)),
            "heldout_tokens": int(len(heldout_ids)),
        },
        "model": {
            "params": n_params,
            "active_params_per_token": n_active,
            "experts_implementation": experts_impl,
            "layer_types": config.layer_types,
        },
        "train": {
            "steps_done": steps_done,
            "stopped_by": stopped_by,
            "tokens_seen": tokens_seen,
            "seconds": round(train_seconds, 1),
            "tok_per_s": round(tokens_seen / max(1e-9, train_seconds)),
            "autocast": dtype,
            "final_train_loss": curve[-1]["loss"] if curve else None,
            "final_train_loss_mean_last5": (sum(r["loss"] for r in curve[-5:]) / len(curve[-5:]))
            if curve
            else None,
        },
        "eval": {
            "heldout_loss": held_loss,
            "heldout_tokens": held_n,
            "heldout_bits_per_byte": bpb,
            "train_split_loss": train_loss_eval,
            "train_split_tokens": train_n,
            "dtype": "fp32",
        },
        "sample": sample,
        "curve": curve,
        "heldout_curve": evals,
        "files": saved,
        "total_seconds": round(time.time() - t_start, 1),
    }
    (out / "train_log.json").write_text(json.dumps(run_log, indent=1) + "\n")
    log(f"saved to {out}: {saved}; total {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
