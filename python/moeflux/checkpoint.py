"""Lazy, tensor-by-tensor access to a safetensors checkpoint (single file or sharded), with the
tensor names of the three layouts a converter meets normalised to one canonical form.

Canonical names follow the Hugging Face Qwen3-Next state dict: ``model.embed_tokens.weight``,
``model.layers.{i}....``, ``model.norm.weight``, ``lm_head.weight``. The Qwen3.5 wrapper prefix
``model.language_model.`` and the MLX Qwen3.5 prefix ``language_model.`` (``language_model.model.``,
``language_model.lm_head.``) are removed; multi-token-prediction (``mtp.*``) and vision
(``model.visual.*``, ``vision_tower.*``) tensors are skipped. Expert tensors keep their layout's
names (per-expert ``mlp.experts.{e}.*``, fused ``mlp.experts.gate_up_proj`` / ``down_proj``, MLX
``mlp.switch_mlp.*``): the converter regroups them.

Tensors are read with the ``safetensors`` package into NumPy (bf16 through ``ml_dtypes``), one
at a time; stacked tensors can be read one leading index at a time (:meth:`Checkpoint.get_index`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .config import MoefluxError

__all__ = ["CheckpointError", "Checkpoint", "canonical_name", "safetensors_files"]

PathLike = Union[str, "os.PathLike[str]"]

INDEX_NAME = "model.safetensors.index.json"

_SKIP_PREFIXES = (
    "model.visual.",
    "visual.",
    "vision_tower.",
    "model.vision_tower.",
    "language_model.vision_tower.",
)
_SKIP_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(MoefluxError, ValueError):
    """A checkpoint that cannot be read as the config describes it: missing or unexpected
    tensors, wrong shapes or dtypes, missing shards, truncated or corrupt safetensors files."""


def canonical_name(name: str) -> Optional[str]:
    """The canonical name of a checkpoint tensor, or ``None`` for a tensor the engine skips
    (``mtp.*``, vision tower, ``rotary_emb.inv_freq``)."""
    if name.startswith(_SKIP_PREFIXES) or name.endswith(_SKIP_SUFFIXES):
        return None
    if name.startswith("model.language_model."):
        name = "model." + name[len("model.language_model.") :]
    elif name.startswith("language_model.model."):
        name = "model." + name[len("language_model.model.") :]
    elif name.startswith("language_model."):
        name = name[len("language_model.") :]
    if "mtp" in name.split("."):
        return None
    return name


def safetensors_files(path: PathLike) -> Tuple[List[Path], Optional[Dict[str, str]]]:
    """The safetensors files of a checkpoint (a directory or one ``.safetensors`` file) and, for
    a sharded checkpoint, the index's ``weight_map`` (tensor name -> file name)."""
    p = Path(path)
    if p.is_file():
        return [p], None
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint directory or file")
    index = p / INDEX_NAME
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        names = sorted(set(wm.values()))
        missing = [n for n in names if not (p / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{p}: shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing[:5])}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        return [p / n for n in names], dict(wm)
    files = sorted(p.glob("model*.safetensors")) or sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{p}: no .safetensors files (and no {INDEX_NAME})")
    return files, None


class _Entry:
    __slots__ = ("source", "file", "shape", "dtype")

    def __init__(self, source: str, file: int, shape: Tuple[int, ...], dtype: str):
        self.source = source
        self.file = file
        self.shape = shape
        self.dtype = dtype


_DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "U8": 1,
    "I8": 1,
    "I64": 8,
    "BOOL": 1,
}


class Checkpoint:
    """A checkpoint's tensors by canonical name. Opens every shard's header eagerly (so missing
    shards and truncated files are reported at once) and reads tensor data only on request.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        self.files, weight_map = safetensors_files(self.path)
        self._handles = []
        self._entries: Dict[str, _Entry] = {}
        self.skipped: List[str] = []
        try:
            for fi, f in enumerate(self.files):
                try:
                    h = safe_open(str(f), framework="numpy")
                except Exception as e:  # SafetensorError, OSError
                    raise CheckpointError(f"{f}: truncated or corrupt safetensors file ({e})") from None
                self._handles.append(h)
                for src in h.keys():
                    if weight_map is not None and weight_map.get(src) not in (None, f.name):
                        raise CheckpointError(
                            f"{f}: holds `{src}` but {INDEX_NAME} places it in {weight_map[src]}"
                        )
                    canon = canonical_name(src)
                    if canon is None:
                        self.skipped.append(src)
                        continue
                    sl = h.get_slice(src)
                    entry = _Entry(src, fi, tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
                    prev = self._entries.get(canon)
                    if prev is not None and prev.source == src:
                        raise CheckpointError(
                            f"{self.path}: tensor `{src}` is in both {self.files[prev.file].name} and {f.name}"
                        )
                    if prev is not None:
                        raise CheckpointError(
                            f"{self.path}: tensors `{prev.source}` ({self.files[prev.file].name}) and `{src}` "
                            f"({f.name}) both map to `{canon}`"
                        )
                    self._entries[canon] = entry
            if weight_map is not None:
                present = {e.source for e in self._entries.values()} | set(self.skipped)
                absent = [n for n in weight_map if n not in present]
                if absent:
                    raise CheckpointError(
                        f"{self.path}: {len(absent)} tensor(s) listed in {INDEX_NAME} are not in their shard "
                        f"(truncated or replaced file?), e.g. `{absent[0]}`"
                    )
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        for h in self._handles:
            try:
                h.__exit__(None, None, None)
            except Exception:
                pass
        self._handles = []

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ metadata

    def names(self) -> List[str]:
        """Canonical names of every tensor not skipped, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry:
        e = self._entries.get(name)
        if e is None:
            raise CheckpointError(f"{self.path}: missing tensor `{name}`{self._hint(name)}")
        return e

    def _hint(self, name: str) -> str:
        stem = name.rsplit(".", 1)[0]
        near = [n for n in self._entries if n.startswith(stem)]
        if near:
            return f" (found {', '.join(sorted(near)[:4])})"
        return ""

    def source_name(self, name: str) -> str:
        """The tensor's name in the checkpoint files."""
        return self._entry(name).source

    def file_of(self, name: str) -> Path:
        return self.files[self._entry(name).file]

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """safetensors dtype string: ``F32``, ``BF16``, ``F16``, ``U32``, ..."""
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        e = self._entry(name)
        return int(np.prod(e.shape, dtype=np.int64)) * _DTYPE_SIZES.get(e.dtype, 4)

    def is_float(self, name: str) -> bool:
        return self.dtype(name) in ("F32", "F16", "BF16")

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self._entries)

    # ------------------------------------------------------------------ data

    def expect(self, name: str, shape: Sequence[int], float_only: bool = False) -> Tuple[int, ...]:
        """Check that ``name`` exists with ``shape`` (and a float dtype if asked); return the shape."""
        got = self.shape(name)
        want = tuple(int(d) for d in shape)
        if got != want:
            raise CheckpointError(
                f"{self.path}: tensor `{self.source_name(name)}` has shape {list(got)}, expected {list(want)}"
            )
        if float_only and not self.is_float(name):
            raise CheckpointError(
                f"{self.path}: tensor `{self.source_name(name)}` has dtype {self.dtype(name)}, expected a float "
                "(F32, F16 or BF16)"
            )
        return got

    def get(self, name: str, shape: Optional[Sequence[int]] = None) -> np.ndarray:
        """Read tensor ``name`` (checking ``shape`` when given) as a NumPy array."""
        if shape is not None:
            self.expect(name, shape)
        e = self._entry(name)
        try:
            arr = self._handles[e.file].get_tensor(e.source)
        except Exception as exc:
            raise CheckpointError(f"{self.files[e.file]}: cannot read `{e.source}`: {exc}") from None
        return _fix_dtype(arr, e.dtype)

    def get_index(self, name: str, index: int) -> np.ndarray:
        """Read ``tensor[index]`` of a stacked tensor (only that slice is read)."""
        e = self._entry(name)
        if not e.shape or not 0 <= index < e.shape[0]:
            raise CheckpointError(
                f"{self.path}: index {index} out of range for `{e.source}` of shape {list(e.shape)}"
            )
        try:
            arr = self._handles[e.file].get_slice(e.source)[index : index + 1]
        except Exception as exc:
            raise CheckpointError(f"{self.files[e.file]}: cannot read `{e.source}`[{index}]: {exc}") from None
        arr = np.asarray(arr)
        return _fix_dtype(arr.reshape(e.shape[1:]), e.dtype)

    def has_any(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n in self._entries)

    def with_prefix(self, prefix: str) -> List[str]:
        return sorted(n for n in self._entries if n.startswith(prefix))


def _fix_dtype(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    """Make sure bf16 data comes back as ``ml_dtypes.bfloat16`` (older safetensors return raw u16)."""
    if st_dtype == "BF16" and arr.dtype != _bf16():
        if arr.dtype.itemsize != 2:
            raise CheckpointError(f"bf16 tensor came back as {arr.dtype}")
        arr = arr.view(_bf16())
    return np.ascontiguousarray(arr)


def _bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
