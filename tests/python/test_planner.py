"""Planner properties visible from Python: a planned backend computes bit-for-bit what an unplanned
one does on every buffer the plan must keep, the report's numbers are consistent, `alias=False`
changes nothing, commit_plan can be called again (earlier colours stay pinned), and executing a
graph that would need two aliased buffers live at once is refused with GraphError.

What a plan must keep, from the planner's contract: persistent buffers, buffers that are not
produced inside the graph (read before or at their first write, or never written), and outputs
(buffers whose last access is a write). Random graphs only read what the graph wrote before (or
what was there on entry), and every write starts at byte 0, so a produced buffer is compared over
the prefix the graph wrote. The colouring itself is tested in Rust.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

import moeflux
from moeflux import ops

BACKEND = "cpu"
ROLES = ["residual", "act", "moe_sum", "moe_scratch"]
MAXF = 48  # the most floats any generated op touches in one buffer


def _backend():
    try:
        return moeflux.Backend(BACKEND, weights=None)
    except moeflux.BackendError as e:  # pragma: no cover
        pytest.skip(f"backend {BACKEND!r} unavailable: {e}")


class Sketch:
    """A random graph over a buffer list, with the facts needed to know what a plan keeps."""

    def __init__(self, bufs):
        self.bufs = bufs  # dicts: role, floats, persistent
        self.ops = []  # (kind, {field: buffer index or scalar})
        self.uses = []  # per op: [(buffer index, "r" | "w" | "rw", floats)]
        self.state = [None] * len(bufs)  # None untouched, "in" live-in, "prod" produced
        self.defined = [0] * len(bufs)  # floats written so far (produced buffers)

    def __repr__(self):
        bufs = ", ".join(
            f"b{i}:{b['role']}[{b['floats']}]{'P' if b['persistent'] else ''}"
            for i, b in enumerate(self.bufs)
        )
        body = "; ".join(f"{kind}({', '.join(f'{k}={v}' for k, v in f.items())})" for kind, f in self.ops)
        return f"Sketch(bufs=[{bufs}], ops=[{body}])"

    def readable(self, i, n):
        return self.state[i] in (None, "in") or self.defined[i] >= n

    def touch(self, i, access, n):
        if self.state[i] is None:
            self.state[i] = "prod" if access == "w" else "in"
        if "w" in access and self.state[i] == "prod":
            self.defined[i] = max(self.defined[i], n)

    def kept(self, inputs=True):
        """{buffer index: floats to compare} for every buffer the plan must keep. With
        `inputs=False`, only persistent buffers and outputs: once other graphs' plans have pinned
        colours, a buffer this graph reads may share memory with one it writes after the read."""
        last_r, last_w = {}, {}
        for k, uses in enumerate(self.uses):
            for i, acc, _ in uses:
                if "r" in acc:
                    last_r[i] = k
                if "w" in acc:
                    last_w[i] = k
        out = {}
        for i, b in enumerate(self.bufs):
            produced = self.state[i] == "prod"
            output = i in last_w and last_w[i] >= last_r.get(i, -1)
            if b["persistent"] or output or (inputs and not produced):
                out[i] = self.defined[i] if produced and not b["persistent"] else b["floats"]
        return out


OPS = {
    # kind: [(field, roles, access, extent key)]; extents: "n" = T*D, "t" = T, "h" = n/2 (SplitQGate)
    "ResidualAddNTokens": [
        ("a", ["residual"], "r", "n"),
        ("b", ["act"], "r", "n"),
        ("out", ["residual"], "w", "n"),
    ],
    "SigmoidGateNTokens": [("x", ["act"], "rw", "n"), ("gate", ["act"], "r", "n")],
    "SwigluFusedBatched": [
        ("gate", ["act", "moe_scratch"], "r", "n"),
        ("up", ["act", "moe_scratch"], "r", "n"),
        ("out", ["act", "moe_scratch"], "w", "n"),
    ],
    "MoeCombineResidualNTokens": [
        ("h_mid", ["residual"], "r", "n"),
        ("moe_sum", ["moe_sum"], "r", "n"),
        ("shared_out", ["act"], "r", "n"),
        ("shared_gate", ["act"], "r", "t"),
        ("hidden_out", ["residual"], "w", "n"),
    ],
    "ZeroBuffer": [("buf", ROLES, "w", "n")],
    "SplitQGate": [
        ("q_proj", ["act"], "r", "n"),
        ("q_out", ["act"], "w", "h"),
        ("gate_out", ["act"], "w", "h"),
    ],
}


def _draw_ops(draw, sk: Sketch, n_ops: int):
    """Append up to `n_ops` random ops to `sk`, each reading only what is defined."""
    bufs = sk.bufs
    attempts = 0
    while len(sk.ops) < n_ops and attempts < 4 * n_ops:
        attempts += 1
        kind = draw(st.sampled_from(sorted(OPS)))
        t = draw(st.integers(1, 3))
        if kind == "SplitQGate":
            heads, hd = draw(st.integers(1, 2)), draw(st.integers(1, 4))
            ext = {"n": 2 * t * heads * hd, "h": t * heads * hd}
            scalars = dict(num_heads=heads, head_dim=hd, n_tokens=t)
        else:
            d = draw(st.integers(1, 8))
            ext = {"n": t * d, "t": t}
            scalars = {"ZeroBuffer": dict(n_bytes=4 * t * d), "SwigluFusedBatched": dict(total=t * d)}.get(
                kind, dict(n_tokens=t, dim=d)
            )
        chosen, uses, ok = {}, [], True
        for field, roles, acc, ek in OPS[kind]:
            n = ext[ek]
            cands = [
                i
                for i, b in enumerate(bufs)
                if b["role"] in roles and i not in chosen.values() and ("r" not in acc or sk.readable(i, n))
            ]
            if not cands:
                ok = False
                break
            # favour chains: reads of values the graph produced, writes into fresh buffers
            pref = [i for i in cands if sk.state[i] == ("prod" if "r" in acc else None)]
            if pref and draw(st.integers(0, 3)) > 0:
                cands = pref
            chosen[field] = draw(st.sampled_from(cands))
            uses.append((chosen[field], acc, n))
        if not ok:
            continue
        for i, acc, n in uses:  # an op reads its operands before it writes
            if "r" in acc:
                sk.touch(i, acc, n)
        for i, acc, n in uses:
            if acc == "w":
                sk.touch(i, "w", n)
        sk.ops.append((kind, dict(chosen, **scalars)))
        sk.uses.append(uses)


@st.composite
def sketches(draw, bufs=None, min_ops=2, max_ops=14):
    """A random Sketch; over `bufs` (copied) when given, else over freshly drawn buffers."""
    if bufs is None:
        bufs = []
        for role in ROLES:
            for _ in range(draw(st.integers(4 if role == "act" else 2, 8 if role == "act" else 5))):
                bufs.append(
                    dict(
                        role=role,
                        floats=MAXF + draw(st.integers(0, 8)),
                        persistent=draw(st.sampled_from([False, False, False, True])),
                    )
                )
    sk = Sketch([dict(b) for b in bufs])
    _draw_ops(draw, sk, draw(st.integers(min_ops, max_ops)))
    return sk


def materialize(sk: Sketch, be, seed: int, upload=True):
    """Allocate the sketch's buffers on `be` (same order, so same ids), fill them with seeded data,
    and build the graph."""
    ids = [
        be.alloc(b["floats"] * 4, role=b["role"], label=f"b{i}", persistent=b["persistent"])
        for i, b in enumerate(sk.bufs)
    ]
    if upload:
        fill(sk, be, ids, seed)
    return ids, build_graph(sk, ids)


def build_graph(sk: Sketch, ids):
    def fields_of(kind, fields):
        bufs = {f for f, _, _, _ in OPS[kind]}
        return {f: (ids[v] if f in bufs else v) for f, v in fields.items()}

    return moeflux.Graph(
        [
            getattr(ops, kind)(label=f"op{k}", **fields_of(kind, fields))
            for k, (kind, fields) in enumerate(sk.ops)
        ]
    )


def fill(sk: Sketch, be, ids, seed: int, only=None):
    """Seeded contents for every buffer (or only those in `only`); the same data per buffer
    whichever subset is filled."""
    rng = np.random.default_rng(seed)
    for i, b in enumerate(sk.bufs):
        data = rng.standard_normal(b["floats"]).astype(np.float32)
        if only is None or i in only:
            be.upload(ids[i], data)


def touched(sk: Sketch):
    return {i for uses in sk.uses for i, _, _ in uses}


def snapshot(be, ids, kept):
    return {i: be.download(ids[i], dtype=np.uint32, shape=(n,)) for i, n in kept.items()}


def assert_same(planned, fresh, sk: Sketch, graph):
    for i in fresh:
        diff = np.flatnonzero(planned[i] != fresh[i])
        assert diff.size == 0, (
            f"buffer b{i} ({sk.bufs[i]}) differs at {diff.size} of {fresh[i].size} floats "
            f"(first {diff[0]})\n{graph.dump()}"
        )


def check_report(rep, sk: Sketch, be):
    logical = sum(b["floats"] * 4 for b in sk.bufs)
    assert rep.lower_bound_bytes <= rep.physical_bytes <= rep.logical_bytes, rep
    assert rep.logical_bytes == logical, (rep, logical)
    aliasable = sum(1 for i, b in enumerate(sk.bufs) if sk.state[i] == "prod" and not b["persistent"])
    assert rep.aliased_buffers <= aliasable, (rep, aliasable)
    assert rep.colors <= rep.aliased_buffers, rep
    if rep.aliased_buffers == 0:
        assert rep.physical_bytes == rep.logical_bytes, rep
    assert be.buffer_count() == len(sk.bufs)
    assert be.physical_buffer_count() == len(sk.bufs) - rep.aliased_buffers + rep.colors, (
        rep,
        be.physical_buffer_count(),
    )


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(sk=sketches(), seed=st.integers(0, 2**32 - 1))
def test_planned_graph_matches_unplanned(sk, seed):
    kept = sk.kept()
    fresh = _backend()
    ids, graph = materialize(sk, fresh, seed)
    fresh.execute(graph)
    want = snapshot(fresh, ids, kept)

    planned = _backend()
    ids2, graph2 = materialize(sk, planned, seed)
    rep = planned.commit_plan(graph2)
    shared = rep.aliased_buffers - rep.colors  # ids living in another id's memory
    target(float(shared), label="ids sharing memory")  # steer towards graphs that alias
    event(f"ids sharing memory: {min(shared, 3)}{'+' if shared >= 3 else ''}")
    check_report(rep, sk, planned)
    planned.execute(graph2)
    assert_same(snapshot(planned, ids2, kept), want, sk, graph2)

    # deterministic: the same graph on another backend gets the same plan
    again = _backend()
    _, graph3 = materialize(sk, again, seed, upload=False)
    rep3 = again.commit_plan(graph3)
    assert (
        rep3.logical_bytes,
        rep3.physical_bytes,
        rep3.lower_bound_bytes,
        rep3.aliased_buffers,
        rep3.colors,
    ) == (rep.logical_bytes, rep.physical_bytes, rep.lower_bound_bytes, rep.aliased_buffers, rep.colors)


@SETTINGS
@given(sk=sketches(), seed=st.integers(0, 2**32 - 1))
def test_alias_false_changes_nothing(sk, seed):
    everything = {i: b["floats"] for i, b in enumerate(sk.bufs)}
    fresh = _backend()
    ids, graph = materialize(sk, fresh, seed)
    fresh.execute(graph)
    want = snapshot(fresh, ids, everything)

    be = _backend()
    ids2, graph2 = materialize(sk, be, seed)
    n_phys = be.physical_buffer_count()
    rep = be.commit_plan(graph2, alias=False)
    assert rep.aliased_buffers == 0 and rep.colors == 0, rep
    assert rep.physical_bytes == rep.logical_bytes == sum(b["floats"] * 4 for b in sk.bufs), rep
    assert rep.lower_bound_bytes <= rep.physical_bytes, rep
    assert be.physical_buffer_count() == n_phys
    be.execute(graph2)
    assert_same(snapshot(be, ids2, everything), want, sk, graph2)


def _run_or_refuse(be, sk: Sketch, ids, graph, seed, want):
    """Execute `graph` on `be` from the seeded contents: it must either refuse with GraphError (a
    committed layout makes two of its live buffers share memory) or match `want` bit for bit.
    Only persistent buffers and those whose contents the graph reads on entry are filled: another
    graph's plan may have made one of them share memory with a buffer this graph produces or does
    not use (persistent buffers never share memory)."""
    fill(sk, be, ids, seed, only={i for i in touched(sk) if sk.state[i] == "in" or sk.bufs[i]["persistent"]})
    try:
        be.execute(graph)
    except moeflux.GraphError:
        return False
    assert_same(snapshot(be, ids, {i: want[i].size for i in want}), want, sk, graph)
    return True


def _unplanned(sk: Sketch, seed):
    """Persistent buffers and outputs of `sk`'s graph run unplanned, restricted to buffers the
    graph touches (a buffer outside the graph may share memory, through another graph's plan,
    with one it writes)."""
    fresh = _backend()
    ids, graph = materialize(sk, fresh, seed)
    fresh.execute(graph)
    return snapshot(fresh, ids, {i: n for i, n in sk.kept(inputs=False).items() if i in touched(sk)})


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_replanning(data, seed):
    """commit_plan is re-callable: plan g1, then g2 over the same buffers (earlier colours stay
    pinned, so planning g2 may be refused with a MoefluxError). Afterwards each graph either
    leaves its outputs and persistent buffers exactly as unplanned or is refused with GraphError;
    g1 always runs when g2's planning added nothing. Re-committing g1 changes nothing."""
    sk1 = data.draw(sketches(min_ops=2))
    sk2 = data.draw(sketches(bufs=sk1.bufs, min_ops=2))
    want1, want2 = _unplanned(sk1, seed), _unplanned(sk2, seed)

    be = _backend()
    ids, g1 = materialize(sk1, be, seed, upload=False)
    g2 = build_graph(sk2, ids)
    rep1 = be.commit_plan(g1)
    n_phys = be.physical_buffer_count()
    again = be.commit_plan(g1)
    assert again.physical_bytes == rep1.physical_bytes and be.physical_buffer_count() == n_phys, (rep1, again)
    assert _run_or_refuse(be, sk1, ids, g1, seed, want1), "g1 refused right after planning it"
    try:
        rep2 = be.commit_plan(g2)
    except moeflux.MoefluxError:
        rep2 = None
    else:
        assert rep2.lower_bound_bytes <= rep2.physical_bytes <= rep2.logical_bytes, rep2
        assert _run_or_refuse(be, sk2, ids, g2, seed, want2), "g2 refused right after planning it"
    ran1 = _run_or_refuse(be, sk1, ids, g1, seed, want1)
    if rep2 is not None and rep2.aliased_buffers == 0:
        assert ran1, "g1 refused although planning g2 aliased nothing"


# ------------------------------------------------------------------------------------------------
# Deterministic cases


def _chain(be, n=4, dim=4):
    """r_{i+1} = r_i + b: a chain whose intermediates the planner can share."""
    r = [be.alloc(4 * dim, role="residual", label=f"r{i}") for i in range(n + 1)]
    b = be.alloc(4 * dim, role="act", label="b")
    g = moeflux.Graph(
        [
            ops.ResidualAddNTokens(a=r[i], b=b, out=r[i + 1], n_tokens=1, dim=dim, label=f"add{i}")
            for i in range(n)
        ]
    )
    return r, b, g


def test_chain_plan_and_unsafe_alias_is_refused():
    be = _backend()
    r, b, g = _chain(be)
    rep = be.commit_plan(g)
    # r1..r3 are intermediates ([0,1], [1,2], [2,3]); r4 is the output; r0 and b are inputs
    assert rep.aliased_buffers >= 2 and rep.colors >= 1, rep
    assert rep.physical_bytes < rep.logical_bytes, rep
    assert rep.lower_bound_bytes <= rep.physical_bytes, rep
    be.upload(r[0], np.arange(4, dtype=np.float32))
    be.upload(b, np.full(4, 0.5, dtype=np.float32))
    be.execute(g)
    assert be.download(r[4]).tolist() == [2.0, 3.0, 4.0, 5.0]

    # a graph in which every intermediate is written before any is read keeps them all live at
    # once: any two that share memory now overlap, and execute must refuse it
    bad = moeflux.Graph(
        [ops.ResidualAddNTokens(a=r[0], b=b, out=r[i], n_tokens=1, dim=4, label=f"w{i}") for i in range(1, 5)]
        + [
            ops.ResidualAddNTokens(a=r[i], b=b, out=r[0], n_tokens=1, dim=4, label=f"rd{i}")
            for i in range(1, 5)
        ]
    )
    with pytest.raises(moeflux.GraphError) as ei:
        be.execute(bad)
    assert isinstance(ei.value, ValueError)

    # the layout committed for g is unchanged: g still runs
    be.upload(r[0], np.arange(4, dtype=np.float32))
    be.execute(g)
    assert be.download(r[4]).tolist() == [2.0, 3.0, 4.0, 5.0]


def test_replanning_a_conflicting_graph_is_refused_cleanly():
    """Colours committed for one graph stay pinned; planning a graph that needs two of them live at
    once must fail with a MoefluxError (not a crash) and leave the first graph runnable."""
    be = _backend()
    r, b, g = _chain(be)
    be.commit_plan(g)
    bad = moeflux.Graph(
        [ops.ResidualAddNTokens(a=r[0], b=b, out=r[i], n_tokens=1, dim=4, label=f"w{i}") for i in range(1, 5)]
        + [
            ops.ResidualAddNTokens(a=r[i], b=b, out=r[0], n_tokens=1, dim=4, label=f"rd{i}")
            for i in range(1, 5)
        ]
    )
    with pytest.raises(moeflux.GraphError):
        be.commit_plan(bad)
    be.upload(r[0], np.arange(4, dtype=np.float32))
    be.upload(b, np.full(4, 0.5, dtype=np.float32))
    be.execute(g)
    assert be.download(r[4]).tolist() == [2.0, 3.0, 4.0, 5.0]


def test_chain_plan_shares_expected_pairs():
    """The greedy rule on a chain: intermediates alternate between two colours."""
    be = _backend()
    r, b, g = _chain(be, n=5)
    rep = be.commit_plan(g)
    # r1 [0,1], r2 [1,2], r3 [2,3], r4 [3,4], r5 output [4,5]: two colours, five aliased ids
    assert (rep.aliased_buffers, rep.colors) == (5, 2), rep
    assert rep.logical_bytes == 7 * 16 and rep.physical_bytes == 4 * 16, rep
    assert rep.lower_bound_bytes == rep.physical_bytes, rep
    assert be.physical_buffer_count() == 4


def test_recommit_report_is_consistent():
    """Committing the same graph again changes nothing, and its report keeps
    lower_bound <= physical <= logical."""
    be = _backend()
    r, b, g = _chain(be, n=5)
    rep = be.commit_plan(g)
    again = be.commit_plan(g)
    assert again.physical_bytes == rep.physical_bytes and be.physical_buffer_count() == 4, again
    assert again.lower_bound_bytes <= again.physical_bytes <= again.logical_bytes, again


def test_persistent_and_live_in_buffers_never_alias():
    be = _backend()
    dim = 4
    a = be.alloc(16, role="residual", label="a")
    p = [be.alloc(16, role="residual", label=f"p{i}", persistent=True) for i in range(3)]
    b = be.alloc(16, role="act", label="b")
    g = moeflux.Graph(
        [
            ops.ResidualAddNTokens(a=a, b=b, out=p[0], n_tokens=1, dim=dim),
            ops.ResidualAddNTokens(a=p[0], b=b, out=p[1], n_tokens=1, dim=dim),
            ops.ResidualAddNTokens(a=p[1], b=b, out=p[2], n_tokens=1, dim=dim),
        ]
    )
    rep = be.commit_plan(g)
    assert rep.aliased_buffers == 0 and rep.physical_bytes == rep.logical_bytes, rep
