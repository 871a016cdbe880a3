"""mlx_lm twins of the package's synthetic checkpoints, for the tests.

The checkpoint builders live in :mod:`moeflux.synthetic` (re-exported here); this module adds
:func:`mlx_quantize` (``mlx_lm.convert`` of a builder's directory) and :func:`mlx_logits` /
:func:`mlx_greedy` (fp32 mlx_lm logits / greedy continuation of token ids).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from moeflux.synthetic import (  # noqa: F401  (re-exported for the tests)
    EOS_ID,
    VOCAB,
    PathLike,
    make,
    make_qwen3_5_moe,
    make_qwen3_next,
    write_tokenizer,
)

# ---------------------------------------------------------------------------- mlx_lm twins


def tiny_pair(root: PathLike, kind: str = "next", bits: int = 4, group_size: int = 64, **kw):
    """``(hf_dir, mlx_dir)`` under ``root``: a tiny checkpoint and its mlx_lm-quantized twin."""
    root = Path(root)
    hf = make(kind, root / f"{kind}-hf", **kw)
    return hf, mlx_quantize(hf, root / f"{kind}-mlx{bits}-g{group_size}", bits, group_size)


def mlx_quantize(hf_dir: PathLike, mlx_dir: PathLike, bits: int = 4, group_size: int = 64) -> Path:
    """``mlx_lm.convert`` of ``hf_dir`` into the quantized MLX directory ``mlx_dir`` (must not exist)."""
    import contextlib
    import io

    from mlx_lm import convert

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        convert(str(hf_dir), str(mlx_dir), quantize=True, q_bits=bits, q_group_size=group_size)
    return Path(mlx_dir)


_MODELS: Dict[str, object] = {}


def mlx_load(model_dir: PathLike):
    """The mlx_lm model of a directory (cached per path)."""
    key = str(Path(model_dir).resolve())
    if key not in _MODELS:
        from mlx_lm.utils import load_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = load_model(Path(model_dir))
        _MODELS[key] = model
    return _MODELS[key]


def mlx_logits(model_dir: PathLike, ids: Sequence[int]) -> np.ndarray:
    """mlx_lm's logits ``[len(ids), vocab]`` (float32) for one sequence, in one forward pass."""
    import mlx.core as mx

    model = mlx_load(model_dir)
    out = model(mx.array(np.asarray(ids, dtype=np.int32))[None])
    return np.array(out[0].astype(mx.float32))


def mlx_greedy(model_dir: PathLike, ids: Sequence[int], n: int) -> List[int]:
    """Greedy continuation of ``ids`` by ``n`` tokens with mlx_lm's caches (prefill, then decode)."""
    import mlx.core as mx

    model = mlx_load(model_dir)
    cache = model.make_cache()
    logits = model(mx.array(np.asarray(ids, dtype=np.int32))[None], cache=cache)
    out: List[int] = []
    for _ in range(n):
        tok = int(mx.argmax(logits[0, -1]).item())
        out.append(tok)
        logits = model(mx.array([[tok]], dtype=mx.int32), cache=cache)
    return out


def mlx_tensors(model_dir: PathLike) -> Dict[str, np.ndarray]:
    """Every tensor of an MLX directory as NumPy (bf16 via ml_dtypes), by file name."""
    from safetensors.numpy import load_file

    out: Dict[str, np.ndarray] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
