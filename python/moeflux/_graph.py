"""``moeflux.Graph``: an ordered list of ops with a cached compiled form for fast replay."""

from __future__ import annotations

import dataclasses
import operator
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from . import _core

if TYPE_CHECKING:
    from .ops import Op

__all__ = ["Graph"]


class Graph:
    """A straight-line list of ops that a backend runs in order.

    The graph compiles its ops to Rust once and caches the result, so executing the same graph
    again (one decode step per token) touches no Python op object. ``add`` invalidates the cache;
    ``set_u32`` patches both the compiled graph and the Python op in place.

    Args:
        ops: the initial ops (any iterable).

    Example:
        >>> import numpy as np, moeflux
        >>> from moeflux import ops
        >>> be = moeflux.Backend("cpu")
        >>> x, gate = be.alloc(16, role="act", label="x"), be.alloc(16, role="act", label="gate")
        >>> be.upload(x, np.full(4, 2, np.float32))  # gate stays 0: sigmoid(0) = 0.5
        >>> g = moeflux.Graph([ops.SigmoidGateNTokens(x, gate, dim=2, n_tokens=1, label="gate")])
        >>> be.execute(g)  # token 0 only
        >>> g.set_u32(0, "n_tokens", 2)
        >>> g.ops[0].n_tokens
        2
        >>> be.execute(g, label="step")  # both tokens, same compiled graph
        >>> be.download(x)
        array([0.5, 0.5, 1. , 1. ], dtype=float32)
        >>> g.add(ops.ZeroBuffer(x, n_bytes=16))
        Graph(2 ops)
    """

    __slots__ = ("_compiled", "_ops")

    def __init__(self, ops: Iterable[Op] = ()) -> None:
        self._ops: list[Any] = list(ops)
        self._compiled: _core.CompiledGraph | None = None

    def add(self, op: Op) -> Graph:
        """Append ``op`` (invalidates the compiled cache). Returns the graph."""
        self._ops.append(op)
        self._compiled = None
        return self

    def extend(self, ops: Iterable[Op]) -> Graph:
        """Append every op of ``ops``. Returns the graph."""
        self._ops.extend(ops)
        self._compiled = None
        return self

    @property
    def ops(self) -> list[Op]:
        """A copy of the op list (mutating it does not change the graph)."""
        return list(self._ops)

    def compile(self) -> _core.CompiledGraph:
        """The compiled form, built on first use after a change and cached.

        Raises:
            GraphError: an unknown op class or a field of the wrong type.
            RoleError: a buffer of a role the field does not accept.
        """
        if self._compiled is None:
            self._compiled = _core.CompiledGraph(self._ops)
        return self._compiled

    def set_u32(self, op_index: int, field: str, value: int) -> None:
        """Set u32 field ``field`` of op ``op_index`` to ``value`` without recompiling.

        For the positions and lengths of a replayed decode graph.

        Raises:
            GraphError: no such op or field, the field is not a u32, or the value is out of range.
        """
        n = len(self._ops)
        index = operator.index(op_index)
        if -n <= index < 0:
            index += n
        self.compile().set_u32(index, field, value)
        self._ops[index] = dataclasses.replace(self._ops[index], **{field: operator.index(value)})

    def dump(self) -> str:
        """One numbered line per op: label, kind and fields."""
        return self.compile().dump()

    def __len__(self) -> int:
        return len(self._ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(list(self._ops))

    def __getitem__(self, index: int) -> Op:
        return self._ops[index]

    def __repr__(self) -> str:
        return f"Graph({len(self._ops)} ops)"
