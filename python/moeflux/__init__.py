"""moeflux: an op-graph engine for Qwen3-Next-family Mixture-of-Experts models.

The compiled core (``moeflux._core``, Rust) owns backends, buffers and weight files; this package
adds the op dataclasses (:mod:`moeflux.ops`) and :class:`Graph`.

Example:
    >>> import numpy as np, moeflux
    >>> be = moeflux.Backend("cpu")
    >>> buf = be.alloc(16, role="act", label="x")
    >>> be.upload(buf, np.arange(4, dtype=np.float32))
    >>> be.download(buf, shape=(2,))
    array([0., 1.], dtype=float32)
"""

from __future__ import annotations

from . import ops
from ._core import (
    Backend,
    BackendError,
    BufId,
    GraphError,
    MoefluxError,
    PlanReport,
    RoleError,
    SizeError,
    WeightFile,
    WeightFileError,
    WeightWriter,
    __version__,
    dequantize,
    quantize,
)
from ._graph import Graph
from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig
from .convert import ConvertError, ModelDir
from .model import GenerationStats, Model, ModelError

__all__ = [
    "__version__",
    # buffers and backends
    "Backend",
    "BufId",
    "PlanReport",
    # graphs and ops
    "Graph",
    "ops",
    # weight files and quantization
    "WeightFile",
    "WeightWriter",
    "quantize",
    "dequantize",
    # models
    "Model",
    "ModelConfig",
    "ModelDir",
    "GenerationStats",
    # errors
    "MoefluxError",
    "GraphError",
    "SizeError",
    "RoleError",
    "WeightFileError",
    "BackendError",
    "ConfigError",
    "CheckpointError",
    "ConvertError",
    "ModelError",
]
