"""The embedded demo model: what ``moeflux demo`` and ``Model.open("demo")`` run with no network.

The package ships a small Qwen3-Next-architecture model trained by ``scripts/train_demo_model.py`` on
the Python standard library's source (a completion model for Python code), converted to moeflux
format, in ``moeflux/demo_model/``. A build without it (e.g. a source checkout before the model is
added) falls back to a tiny random-weight model that the package writes itself into the cache: it
exercises the whole engine but produces noise, and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["DEMO_PROMPT", "demo_model_dir", "describe_demo_model"]

#: Ends on a token boundary (after ``:``): byte-level BPE merges a newline with the indentation after it,
#: so a prompt ending in ``"\n    "`` splits a token the model never saw split and derails it.
DEMO_PROMPT = "class Point:\n    def __init__(self, x, y):"
PACKAGED = Path(__file__).resolve().parent / "demo_model"


def demo_model_dir() -> Path:
    """The packaged trained model, or a random-weight stand-in built on first use."""
    if (PACKAGED / "moeflux.json").is_file():
        return PACKAGED
    from .convert import convert, default_cache_dir, is_model_dir
    from .synthetic import make_qwen3_next

    root = default_cache_dir() / "demo-random-v1"
    dst = root / "model"
    if not is_model_dir(dst):
        hf = make_qwen3_next(root / "hf", seed=0)
        convert(hf, dst, bits=4, group_size=64, progress=False)
    return dst


def describe_demo_model(path: Path) -> str:
    """One line: what the demo model is and how good it is."""
    info = path / "demo_info.json"
    if info.is_file():
        d = json.loads(info.read_text())
        params = d.get("params", "?")
        if isinstance(params, (int, float)):
            params = f"{params / 1e6:.1f} M"
        return (
            f"{d.get('name', 'trained demo model')}, {params} parameters, "
            f"{d.get('bits', '?')}-bit; held-out loss {d.get('heldout_loss_quantized', '?')} nats/token "
            f"(unquantized {d.get('heldout_loss', '?')})"
        )
    return f"random-weight Qwen3-Next stand-in at {path} (no trained model packaged: output is noise)"
