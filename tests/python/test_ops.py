"""Per-op correctness matrix: every op on every backend over several shapes, against the float64
NumPy reference in `reference.py`.

Outputs are pre-filled with NaN and carry a guard tail, so unwritten elements and writes past the
end both fail; in-place ops get their real input. Integer outputs are compared exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeflux import ops

import reference as R
from opcases import MAX_ERR, Rig, build_expert_blob, check_close

BACKENDS = ["cpu", "metal-emu", "metal"]  # absent backends are skipped with the reason

# Relative error bound ||out - ref|| / ||ref|| per op (float32 kernels against float64 math).
# Anything looser than the 1e-5 default says why. Ops marked "exact" are compared bit for bit.
DEFAULT_TOL = 1e-5
TOL = {
    "RmsNormBf16NTokens": 1e-5,
    "RmsNormQkNTokens": 1e-5,
    "RmsNormPerHeadNTokens": 1e-5,
    "RopeNTokens": 1e-5,  # the angle may be the f32 product pos * inv_freq (as transformers does) or exact
    "SplitQGate": "exact",
    "ResidualAddNTokens": 1e-6,  # one correctly rounded add per element
    "ZeroBuffer": "exact",
    "MatvecNTokens": 1e-5,
    "SwigluFusedBatched": 1e-5,
    "SdpaCausalTiled": 1e-5,
    "SigmoidGateNTokens": 1e-5,
    "KvCacheAppendNTokens": "exact",
    "MoeSoftmaxTopK": 1e-5,  # weights; indices exact
    "MoeNormalizeWeights": 1e-5,
    "MoeBatchedPermuteFuse": 1e-5,
    "MoeGatherIdFuse": 1e-5,  # out_sum; htpe exact, hids by the sorted-by-expert rule
    "MoeCombineResidualNTokens": 1e-5,
    "Conv1dStepNTokens": 1e-5,  # conv_out; the new conv_state is exact (copied inputs)
    "ComputeDecayBetaNTokens": 1e-5,
    "GatedDeltaNetStepNTokens": 1e-5,
    "GatedDeltaNetChunkwise": 1e-5,
    "GatedRmsNormNTokens": 1e-5,
    "EmbedGatherNTokens": 1e-5,
}


def tol(op: str) -> float:
    t = TOL.get(op, DEFAULT_TOL)
    assert t != "exact"
    return t


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module", autouse=True)
def _error_summary():
    yield
    if MAX_ERR:
        print("\nlargest relative error per op:")
        for name in sorted(MAX_ERR):
            print(f"  {name:28s} {MAX_ERR[name]:.2e}   (bound {TOL.get(name, DEFAULT_TOL)})")


def cases(*dicts):
    """pytest params from case dicts, with readable ids."""
    return [pytest.param(d, id="-".join(f"{k}{v}" for k, v in d.items())) for d in dicts]


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def u32(a):
    return np.ascontiguousarray(a, dtype=np.uint32)


def inout(rig: Rig, role: str, x, label: str = ""):
    """An in-place operand: its real contents followed by a NaN guard."""
    x = f32(x).ravel()
    guard = np.full(5, 0x7FC00001, dtype=np.uint32).view(np.float32)
    return rig.inp(role, np.concatenate([x, guard]), label=label)


def normal(rig: Rig, *shape, scale=1.0, shift=0.0):
    return f32(rig.rng.standard_normal(shape) * scale + shift)


# ------------------------------------------------------------------------------------------------
# Norms


@pytest.mark.parametrize(
    "c",
    cases(
        dict(T=1, D=7, eps=1e-6, wd="bf16", role="residual"),
        dict(T=3, D=64, eps=1e-5, wd="f32", role="act"),
        dict(T=5, D=33, eps=1e-6, wd="f16", role="residual"),
        dict(T=2, D=256, eps=0.0, wd="bf16", role="act"),
        dict(T=17, D=96, eps=1e-6, wd="bf16", role="residual"),
    ),
)
def test_rms_norm(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "rms", c)
    w = rig.add_float("norm", rig.rng.uniform(0.5, 1.5, c["D"]), c["wd"])
    be = rig.open()
    x = normal(rig, c["T"], c["D"], scale=2.0, shift=0.3)
    xb = rig.inp(c["role"], x)
    ob = rig.out("normed", x.size)
    rig.run(
        ops.RmsNormBf16NTokens(
            x=xb,
            weight_off=be.weight_offset("norm"),
            out=ob,
            dim=c["D"],
            n_tokens=c["T"],
            eps=c["eps"],
            weight_dtype=c["wd"],
        )
    )
    rig.check("RmsNormBf16NTokens", ob, R.rms_norm(x, w, c["eps"]), tol("RmsNormBf16NTokens"))
    rig.check_exact(xb, x, what="input x")


@pytest.mark.parametrize(
    "c",
    cases(
        dict(T=1, nk=1, dk=8, koff=8, total=24),
        dict(T=3, nk=2, dk=16, koff=40, total=100),
        dict(T=4, nk=4, dk=32, koff=128, total=320),
        dict(T=2, nk=3, dk=5, koff=15, total=30),
        dict(T=9, nk=2, dk=128, koff=256, total=768),
    ),
)
def test_rms_norm_qk(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "qk", c)
    rig.open()
    x = normal(rig, c["T"], c["total"], scale=1.5, shift=0.2)
    xb = inout(rig, "act", x)
    rig.run(
        ops.RmsNormQkNTokens(
            x=xb,
            num_k_heads=c["nk"],
            key_dim=c["dk"],
            key_offset_per_token=c["koff"],
            per_token_total=c["total"],
            n_tokens=c["T"],
        )
    )
    ref = R.rms_norm_qk(x, c["nk"], c["dk"], c["koff"], c["total"])
    got = rig.fetch_out(xb, x.size).reshape(x.shape)
    n = c["nk"] * c["dk"]
    normed = np.zeros(c["total"], dtype=bool)
    normed[:n] = True
    normed[c["koff"] : c["koff"] + n] = True
    check_close("RmsNormQkNTokens", got[:, normed], ref[:, normed], tol("RmsNormQkNTokens"), "q/k regions")
    assert np.array_equal(got[:, ~normed].view(np.uint32), x[:, ~normed].view(np.uint32)), (
        "channels outside the q and k regions changed"
    )


@pytest.mark.parametrize(
    "c",
    cases(
        dict(T=1, H=1, hd=8, eps=1e-6, wd="bf16"),
        dict(T=3, H=4, hd=16, eps=1e-6, wd="f32"),
        dict(T=2, H=3, hd=64, eps=1e-5, wd="bf16"),
        dict(T=5, H=2, hd=24, eps=1e-6, wd="f16"),
        dict(T=9, H=2, hd=256, eps=1e-6, wd="bf16"),
    ),
)
def test_rms_norm_per_head(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "perhead", c)
    w = rig.add_float("qn", rig.rng.uniform(0.5, 1.5, c["hd"]), c["wd"])
    be = rig.open()
    x = normal(rig, c["T"], c["H"] * c["hd"], scale=3.0, shift=-0.1)
    xb = inout(rig, "act", x)
    rig.run(
        ops.RmsNormPerHeadNTokens(
            x=xb,
            weight_off=be.weight_offset("qn"),
            num_heads=c["H"],
            head_dim=c["hd"],
            n_tokens=c["T"],
            eps=c["eps"],
            weight_dtype=c["wd"],
        )
    )
    rig.check(
        "RmsNormPerHeadNTokens",
        xb,
        R.rms_norm_per_head(x, w, c["H"], c["hd"], c["eps"]),
        tol("RmsNormPerHeadNTokens"),
    )


@pytest.mark.parametrize(
    "c",
    cases(
        dict(V=1, dv=8, T=1, eps=1e-6, wd="f32"),
        dict(V=4, dv=32, T=3, eps=1e-6, wd="bf16"),
        dict(V=2, dv=128, T=2, eps=1e-5, wd="f16"),
        dict(V=3, dv=17, T=4, eps=1e-6, wd="bf16"),
    ),
)
def test_gated_rms_norm(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "grms", c)
    w = rig.add_float("gn", rig.rng.uniform(0.5, 1.5, c["dv"]), c["wd"])
    be = rig.open()
    n = c["T"] * c["V"] * c["dv"]
    v = normal(rig, n, scale=2.0, shift=0.1)
    z = normal(rig, n, scale=2.0)
    vb, zb = rig.inp("act", v), rig.inp("act", z)
    ob = rig.out("act", n)
    rig.run(
        ops.GatedRmsNormNTokens(
            values=vb,
            z=zb,
            weight_off=be.weight_offset("gn"),
            output=ob,
            num_v_heads=c["V"],
            value_dim=c["dv"],
            n_tokens=c["T"],
            eps=c["eps"],
            weight_dtype=c["wd"],
        )
    )
    rig.check(
        "GatedRmsNormNTokens",
        ob,
        R.gated_rms_norm(v, z, w, c["V"], c["dv"], c["eps"]),
        tol("GatedRmsNormNTokens"),
    )


# ------------------------------------------------------------------------------------------------
# Attention pieces


@pytest.mark.parametrize(
    "c",
    cases(
        dict(T=1, H=2, hd=8, rd=8, start=0, theta=1e4),
        dict(T=3, H=4, hd=16, rd=8, start=5, theta=1e4),
        dict(T=2, H=3, hd=64, rd=16, start=1000, theta=1e7),
        dict(T=4, H=1, hd=6, rd=2, start=3, theta=1e4),
        dict(T=5, H=2, hd=32, rd=32, start=70, theta=1e6),
        dict(T=1, H=2, hd=256, rd=64, start=4095, theta=1e7),
        dict(T=17, H=2, hd=128, rd=32, start=0, theta=1e7),
        dict(T=3, H=2, hd=128, rd=64, start=20000, theta=1e4),
    ),
)
def test_rope(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "rope", c)
    rig.open()
    rd, hd = c["rd"], c["hd"]
    inv_freq = f32(c["theta"] ** (-np.arange(0, rd, 2, dtype=np.float64) / rd))
    fb = rig.inp("inv_freq", inv_freq)
    x = normal(rig, c["T"], c["H"] * hd, shift=0.1)
    xb = inout(rig, "act", x)
    rig.run(
        ops.RopeNTokens(
            x=xb,
            inv_freq=fb,
            n_tokens=c["T"],
            num_heads=c["H"],
            head_dim=hd,
            rotary_dim=rd,
            start_pos=c["start"],
        )
    )
    got = rig.fetch_out(xb, x.size).reshape(c["T"], c["H"], hd)
    x3 = x.reshape(c["T"], c["H"], hd)
    # angle as the f32 product pos * inv_freq (what transformers computes) or exact: either passes
    refs = [
        R.rope(x, inv_freq, c["H"], hd, rd, c["start"], f32_angle=f).reshape(got.shape)[:, :, :rd]
        for f in (False, True)
    ]
    best = min(refs, key=lambda r: R.rel_err(got[:, :, :rd], r))
    check_close("RopeNTokens", got[:, :, :rd], best, tol("RopeNTokens"), "rotated channels")
    assert np.array_equal(got[:, :, rd:].view(np.uint32), x3[:, :, rd:].view(np.uint32)), (
        "channels >= rotary_dim changed"
    )


@pytest.mark.parametrize(
    "c",
    cases(
        dict(T=1, H=1, hd=4),
        dict(T=3, H=4, hd=16),
        dict(T=2, H=3, hd=7),
        dict(T=5, H=2, hd=64),
    ),
)
def test_split_q_gate(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "split", c)
    rig.open()
    n = c["T"] * c["H"] * c["hd"]
    qp = normal(rig, 2 * n)
    qb = rig.inp("act", qp)
    qo, go = rig.out("act", n), rig.out("act", n)
    rig.run(
        ops.SplitQGate(q_proj=qb, q_out=qo, gate_out=go, num_heads=c["H"], head_dim=c["hd"], n_tokens=c["T"])
    )
    q, g = R.split_q_gate(qp, c["H"], c["hd"])
    assert np.array_equal(rig.fetch_out(qo, n), f32(q).ravel()), "q_out"
    assert np.array_equal(rig.fetch_out(go, n), f32(g).ravel()), "gate_out"


@pytest.mark.parametrize(
    "c",
    cases(
        dict(T=1, H=2, hpk=1, hd=8, start=0, cap=1, scale=None),
        dict(T=1, H=4, hpk=2, hd=16, start=9, cap=16, scale=None),
        dict(T=5, H=4, hpk=4, hd=32, start=0, cap=5, scale=None),
        dict(T=7, H=6, hpk=2, hd=64, start=3, cap=12, scale=None),
        dict(T=3, H=2, hpk=2, hd=128, start=20, cap=30, scale=None),
        dict(T=33, H=2, hpk=1, hd=16, start=1, cap=40, scale=None),
        dict(T=4, H=4, hpk=4, hd=64, start=6, cap=10, scale=1.0),
        dict(T=2, H=8, hpk=4, hd=256, start=5, cap=8, scale=None),
    ),
)
def test_sdpa(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "sdpa", c)
    rig.open()
    T, H, hpk, hd = c["T"], c["H"], c["hpk"], c["hd"]
    kv_dim = H // hpk * hd
    scale = c["scale"] if c["scale"] is not None else hd**-0.5
    used = c["start"] + T
    q = normal(rig, T, H * hd)
    k = normal(rig, c["cap"], kv_dim)
    v = normal(rig, c["cap"], kv_dim)
    k[used:] = 50.0  # rows past the causal window must not be read
    v[used:] = -50.0
    qb, kb, vb = rig.inp("act", q), rig.inp("kv_cache_k", k), rig.inp("kv_cache_v", v)
    ob = rig.out("act", T * H * hd)
    rig.run(
        ops.SdpaCausalTiled(
            q=qb,
            k=kb,
            v=vb,
            attn_out=ob,
            n_tokens=T,
            num_heads=H,
            heads_per_kv=hpk,
            head_dim=hd,
            kv_dim=kv_dim,
            kv_start=c["start"],
            kv_len_total=c["cap"],
            softmax_scale=float(np.float32(scale)),
        )
    )
    ref = R.sdpa_causal(q, k, v, H, hpk, hd, c["start"], float(np.float32(scale)))
    rig.check("SdpaCausalTiled", ob, ref, tol("SdpaCausalTiled"))
    rig.check_exact(kb, k, what="k cache")
    rig.check_exact(vb, v, what="v cache")


@pytest.mark.parametrize(
    "c",
    cases(
        dict(kv=8, T=1, start=0, cap=4),
        dict(kv=32, T=3, start=5, cap=10),
        dict(kv=24, T=7, start=2, cap=9),
        dict(kv=256, T=1, start=100, cap=101),
    ),
)
def test_kv_cache_append(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "kvapp", c)
    rig.open()
    kc, vc = normal(rig, c["cap"], c["kv"]), normal(rig, c["cap"], c["kv"])
    ks, vs = normal(rig, c["T"], c["kv"]), normal(rig, c["T"], c["kv"])
    kcb, vcb = rig.inp("kv_cache_k", kc), rig.inp("kv_cache_v", vc)
    ksb, vsb = rig.inp("act", ks), rig.inp("act", vs)
    rig.run(
        ops.KvCacheAppendNTokens(
            k_src=ksb,
            v_src=vsb,
            k_cache=kcb,
            v_cache=vcb,
            kv_dim=c["kv"],
            n_tokens=c["T"],
            kv_start=c["start"],
        )
    )
    rk, rv = R.kv_append(kc, vc, ks, vs, c["start"])
    rig.check_exact(kcb, f32(rk), what="k cache (rows outside kv_start.. must not change)")
    rig.check_exact(vcb, f32(rv), what="v cache (rows outside kv_start.. must not change)")


# ------------------------------------------------------------------------------------------------
# Element-wise


@pytest.mark.parametrize("c", cases(dict(T=1, D=5), dict(T=3, D=64), dict(T=7, D=33)))
def test_residual_add(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "add", c)
    rig.open()
    a, b = normal(rig, c["T"], c["D"]), normal(rig, c["T"], c["D"], scale=0.3)
    ab, bb = rig.inp("residual", a), rig.inp("act", b)
    ob = rig.out("residual", a.size)
    rig.run(ops.ResidualAddNTokens(a=ab, b=bb, out=ob, n_tokens=c["T"], dim=c["D"]))
    rig.check("ResidualAddNTokens", ob, R.residual_add(a, b), tol("ResidualAddNTokens"))


@pytest.mark.parametrize(
    "c",
    cases(
        dict(role="act", size=64, n=64),
        dict(role="token_ids", size=40, n=13),
        dict(role="kv_cache_k", size=128, n=0),
        dict(role="moe_index", size=36, n=35),
        dict(role="delta_state", size=4096, n=4000),
        dict(role="moe_sum", size=100, n=1),
    ),
)
def test_zero_buffer(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "zero", c)
    rig.open()
    raw = rig.rng.integers(1, 256, c["size"]).astype(np.uint8)
    buf = rig.inp(c["role"], raw)
    rig.run(ops.ZeroBuffer(buf=buf, n_bytes=c["n"]))
    rig.check_exact(buf, R.zero_buffer(raw, c["n"]), dtype=np.uint8, what="bytes")


@pytest.mark.parametrize(
    "c",
    cases(
        dict(n=1, roles="act,act,act"),
        dict(n=7, roles="moe_scratch,moe_scratch,moe_scratch"),
        dict(n=1000, roles="act,moe_scratch,act"),
        dict(n=4099, roles="moe_scratch,act,moe_scratch"),
    ),
)
def test_swiglu(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "swiglu", c)
    rig.open()
    rg, ru, ro = c["roles"].split(",")
    g, u = normal(rig, c["n"], scale=3.0), normal(rig, c["n"])
    gb, ub = rig.inp(rg, g), rig.inp(ru, u)
    ob = rig.out(ro, c["n"])
    rig.run(ops.SwigluFusedBatched(gate=gb, up=ub, out=ob, total=c["n"]))
    rig.check("SwigluFusedBatched", ob, R.swiglu(g, u), tol("SwigluFusedBatched"))


@pytest.mark.parametrize("c", cases(dict(T=1, D=5), dict(T=4, D=64), dict(T=3, D=129)))
def test_sigmoid_gate(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "sgate", c)
    rig.open()
    x, g = normal(rig, c["T"], c["D"]), normal(rig, c["T"], c["D"], scale=3.0)
    xb, gb = inout(rig, "act", x), rig.inp("act", g)
    rig.run(ops.SigmoidGateNTokens(x=xb, gate=gb, dim=c["D"], n_tokens=c["T"]))
    rig.check("SigmoidGateNTokens", xb, R.sigmoid_gate(x, g), tol("SigmoidGateNTokens"))


@pytest.mark.parametrize("c", cases(dict(T=1, D=8), dict(T=4, D=64), dict(T=3, D=33)))
def test_moe_combine(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "combine", c)
    rig.open()
    T, D = c["T"], c["D"]
    h, m, s = normal(rig, T, D), normal(rig, T, D, scale=0.5), normal(rig, T, D, scale=0.5)
    g = normal(rig, T, scale=2.0)
    hb, mb, sb, gb = rig.inp("residual", h), rig.inp("moe_sum", m), rig.inp("act", s), rig.inp("act", g)
    ob = rig.out("residual", T * D)
    rig.run(
        ops.MoeCombineResidualNTokens(
            h_mid=hb, moe_sum=mb, shared_out=sb, shared_gate=gb, hidden_out=ob, n_tokens=T, dim=D
        )
    )
    rig.check("MoeCombineResidualNTokens", ob, R.moe_combine(h, m, s, g), tol("MoeCombineResidualNTokens"))


# ------------------------------------------------------------------------------------------------
# Quantized matrices


def _matvec_cases():
    out = []
    in_roles = ["normed", "act", "moe_scratch"]
    out_roles = ["act", "router_logits", "logits", "moe_scratch"]
    i = 0
    for bits in (4, 8):
        for gs in (32, 64, 128):
            for T in (1, 4):
                for sdt in ("bf16", "f32"):
                    out.append(
                        dict(
                            bits=bits,
                            gs=gs,
                            T=T,
                            sdt=sdt,
                            n_in=gs * (1 + i % 3),
                            n_out=(13, 37, 5)[i % 3],
                            ioff=4 * (i % 2) * (1 + i % 5),
                            ooff=4 * ((i // 2) % 2) * (1 + i % 3),
                            rin=in_roles[i % 3],
                            rout=out_roles[i % 4],
                        )
                    )
                    i += 1
    out.append(
        dict(bits=4, gs=64, T=33, sdt="bf16", n_in=256, n_out=65, ioff=0, ooff=0, rin="normed", rout="act")
    )
    out.append(
        dict(bits=4, gs=64, T=1, sdt="bf16", n_in=1024, n_out=64, ioff=0, ooff=0, rin="normed", rout="act")
    )
    out.append(
        dict(bits=8, gs=64, T=2, sdt="f16", n_in=128, n_out=9, ioff=16, ooff=8, rin="act", rout="logits")
    )
    out.append(
        dict(
            bits=8,
            gs=128,
            T=9,
            sdt="bf16",
            n_in=512,
            n_out=130,
            ioff=0,
            ooff=4,
            rin="act",
            rout="router_logits",
        )
    )
    return cases(*out)


@pytest.mark.parametrize("c", _matvec_cases())
def test_matvec(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "matvec", c)
    rig.add_quant("proj", c["n_out"], c["n_in"], c["gs"], c["bits"], c["sdt"])
    rig.open()
    wref, w = rig.quant("proj")
    T = c["T"]
    x = normal(rig, T, c["n_in"], shift=0.05)
    lead_in = c["ioff"] // 4
    xin = np.concatenate([normal(rig, lead_in, scale=100.0), x.ravel()])  # garbage before input_off
    xb = rig.inp(c["rin"], xin)
    lead_out = c["ooff"] // 4
    ob = rig.out(c["rout"], T * c["n_out"], lead=lead_out)
    rig.run(
        ops.MatvecNTokens(
            weight=wref,
            input=xb,
            input_off=c["ioff"],
            output=ob,
            output_off=c["ooff"],
            in_dim=c["n_in"],
            out_dim=c["n_out"],
            n_tokens=T,
        )
    )
    rig.check("MatvecNTokens", ob, R.matvec(w, x), tol("MatvecNTokens"), lead=lead_out)


def _embed_cases():
    out = []
    i = 0
    for bits in (4, 8):
        for gs in (32, 64, 128):
            for sdt in ("bf16", "f32"):
                for T in (1, 6):
                    out.append(
                        dict(bits=bits, gs=gs, sdt=sdt, T=T, vocab=(37, 5, 64)[i % 3], H=gs * (1 + i % 2))
                    )
                    i += 1
    return cases(*out)


@pytest.mark.parametrize("c", _embed_cases())
def test_embed_gather(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "embed", c)
    rig.add_quant("embed", c["vocab"], c["H"], c["gs"], c["bits"], c["sdt"], std=1.0)
    rig.open()
    wref, table = rig.quant("embed")
    ids = rig.rng.integers(0, c["vocab"], c["T"]).astype(np.uint32)
    if c["T"] > 1:
        ids[0], ids[1], ids[-1] = 0, c["vocab"] - 1, ids[2]  # both ends of the table and a repeat
    ib = rig.inp("token_ids", ids)
    ob = rig.out("residual", c["T"] * c["H"])
    rig.run(
        ops.EmbedGatherNTokens(
            token_ids=ib, weight=wref, hidden_out=ob, hidden_dim=c["H"], n_tokens=c["T"], vocab=c["vocab"]
        )
    )
    rig.check("EmbedGatherNTokens", ob, R.embed_gather(table, ids), tol("EmbedGatherNTokens"))


# ------------------------------------------------------------------------------------------------
# Routing and experts


@pytest.mark.parametrize(
    "c",
    cases(
        dict(T=1, E=8, k=1, ties=False),
        dict(T=3, E=16, k=4, ties=False),
        dict(T=2, E=10, k=10, ties=False),
        dict(T=5, E=64, k=8, ties=False),
        dict(T=4, E=12, k=3, ties=True),
        dict(T=2, E=6, k=6, ties=True),
        dict(T=3, E=512, k=10, ties=False),
    ),
)
def test_moe_softmax_topk(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "topk", c)
    rig.open()
    T, E, k = c["T"], c["E"], c["k"]
    if c["ties"]:
        logits = f32(rig.rng.integers(0, 3, (T, E)) * 0.5 - 0.25)
    else:  # distinct logits at least 0.05 apart, so float32 rounding cannot reorder them
        logits = f32(np.stack([rig.rng.permutation(E) * 0.05 + rig.rng.normal() for _ in range(T)]))
    lb = rig.inp("router_logits", logits)
    ib = rig.out("router_idx", T * k, dtype=np.uint32)
    wb = rig.out("router_weight", T * k)
    rig.run(ops.MoeSoftmaxTopK(logits=lb, indices_out=ib, weights_out=wb, n_tokens=T, n_experts=E, k=k))
    ridx, rw = R.softmax_topk(logits, k)
    got_idx = rig.fetch_out(ib, T * k, dtype=np.uint32).reshape(T, k)
    assert np.array_equal(got_idx, ridx), f"indices\n{got_idx}\n!=\n{ridx}"
    rig.check("MoeSoftmaxTopK", wb, rw, tol("MoeSoftmaxTopK"), "weights")


@pytest.mark.parametrize("c", cases(dict(T=1, k=1), dict(T=4, k=8), dict(T=3, k=10, special=True)))
def test_moe_normalize(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "norm_w", c)
    rig.open()
    w = f32(rig.rng.uniform(0.01, 1.0, (c["T"], c["k"])))
    if c.get("special"):
        w[1] = 0.0  # zero sum: left alone
        w[2, :] = -0.2
        w[2, 0] = 0.5  # negative sum: left alone
    wb = inout(rig, "router_weight", w)
    rig.run(ops.MoeNormalizeWeights(weights=wb, n_tokens=c["T"], k=c["k"]))
    ref = R.normalize_weights(w)
    got = rig.fetch_out(wb, w.size).reshape(w.shape)
    pos = w.astype(np.float64).sum(axis=1) > 0
    check_close("MoeNormalizeWeights", got[pos], ref[pos], tol("MoeNormalizeWeights"))
    assert np.array_equal(got[~pos].view(np.uint32), w[~pos].view(np.uint32)), "rows with sum <= 0 changed"


def _route(rng, T, E, k):
    """k distinct experts per token with positive weights summing to 1."""
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.uint32)
    w = rng.uniform(0.1, 1.0, (T, k))
    return idx, f32(w / w.sum(axis=1, keepdims=True))


def _expert_base(rig: Rig, blob: np.ndarray, borrowed: bool):
    if borrowed:
        arr = blob.copy()
        arr.flags.writeable = False
        return rig.be.register_borrowed(arr, role="expert_base", label="experts")
    return rig.inp("expert_base", blob, label="experts")


@pytest.mark.parametrize(
    "c",
    cases(
        dict(T=1, H=64, I=32, bits=4, gs=32, sdt="bf16", E=4, k=2, pool=False, borrowed=True),
        dict(T=5, H=128, I=64, bits=8, gs=64, sdt="bf16", E=8, k=3, pool=True, borrowed=False),
        dict(T=3, H=128, I=128, bits=4, gs=128, sdt="f32", E=6, k=4, pool=True, borrowed=True),
        dict(T=4, H=64, I=64, bits=4, gs=64, sdt="bf16", E=5, k=2, pool=False, borrowed=False, unrouted=1),
        dict(T=9, H=256, I=128, bits=4, gs=64, sdt="bf16", E=16, k=4, pool=True, borrowed=False),
        dict(T=2, H=64, I=32, bits=8, gs=32, sdt="f32", E=3, k=1, pool=True, borrowed=True, unrouted=2),
    ),
)
def test_moe_batched_permute_fuse(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "moe_bucket", c)
    rig.open()
    T, H, inter, E, k = c["T"], c["H"], c["I"], c["E"], c["k"]
    idx, w = _route(rig.rng, T, E, k)
    n_unrouted = c.get("unrouted", 0)  # the last tokens get no assignment: their out_sum rows are 0
    used = sorted(set(idx[: T - n_unrouted].ravel().tolist()))
    block = R.expert_layout(H, inter, c["bits"], c["gs"], c["sdt"])["block_bytes"]
    if c["pool"]:
        n_slots = len(used) + 2
        stride = (block + 255) // 256 * 256 + 256
        slot_of = dict(zip(used, rig.rng.permutation(n_slots)[: len(used)].tolist()))
        if all(slot_of[e] == e for e in used):  # make sure some slot differs from its expert id
            slot_of = {e: n_slots - 1 - i for i, e in enumerate(used)}
    else:
        n_slots, stride, slot_of = E, block, {e: e for e in used}
    blob, mats, layout = build_expert_blob(rig.rng, n_slots, stride, H, inter, c["bits"], c["gs"], c["sdt"])
    # host-built buckets: experts ascending, CSR offsets, token order inside a bucket
    buckets, tok, bw, slots = [0], [], [], []
    for e in used:
        for t in range(T - n_unrouted):
            for j in range(k):
                if idx[t, j] == e:
                    tok.append(t)
                    bw.append(w[t, j])
        buckets.append(len(tok))
        slots.append(slot_of[e])
    total = len(tok)
    x = normal(rig, T, H)
    eb = _expert_base(rig, blob, c["borrowed"])
    sb = rig.inp("moe_index", u32(slots))
    xb = rig.inp("normed", x)
    tb = rig.inp("moe_index", u32(tok))
    wb = rig.inp("router_weight", f32(bw))
    gb, ub, ab = (rig.out("moe_scratch", total * inter) for _ in range(3))
    ob = rig.out("moe_scratch", total * H)
    sumb = rig.out("moe_sum", T * H)
    rig.run(
        ops.MoeBatchedPermuteFuse(
            expert_base=eb,
            expert_stride=stride,
            layout=layout,
            expert_indices=sb,
            expert_slots=slots,
            bucket_input=xb,
            bucket_gate=gb,
            bucket_up=ub,
            bucket_act=ab,
            bucket_out=ob,
            bucket_token_idx=tb,
            bucket_weights=wb,
            out_sum=sumb,
            n_tokens=T,
            buckets=buckets,
        )
    )
    by_slot = {s: mats[s] for s in slots}
    ref, rows = R.moe_batched(x, by_slot, slots, buckets, tok, np.asarray(bw, dtype=np.float64))
    t_name = "MoeBatchedPermuteFuse"
    got = rig.fetch_out(sumb, T * H).reshape(T, H)
    routed = T - n_unrouted
    if routed:
        check_close(t_name, got[:routed], ref[:routed], tol(t_name), "out_sum")
    assert np.all(got[routed:] == 0.0), "out_sum rows of tokens without assignments must be zero"
    if total == 0:
        return
    rig.check(t_name, gb, rows["gate"], tol(t_name), "bucket_gate rows")
    rig.check(t_name, ub, rows["up"], tol(t_name), "bucket_up rows")
    rig.check(t_name, ab, rows["act"], tol(t_name), "bucket_act rows")
    rig.check(t_name, ob, rows["out"], tol(t_name), "bucket_out rows (unweighted expert output)")


@pytest.mark.parametrize(
    "c",
    cases(
        dict(T=1, E=4, k=1, H=64, I=32, bits=4, gs=32, sdt="bf16", pad=0),
        dict(T=4, E=8, k=8, H=64, I=64, bits=4, gs=64, sdt="bf16", pad=0),
        dict(T=6, E=16, k=4, H=128, I=64, bits=8, gs=64, sdt="bf16", pad=64),
        dict(T=3, E=5, k=2, H=128, I=128, bits=4, gs=128, sdt="f32", pad=1000),
        dict(T=13, E=8, k=2, H=64, I=32, bits=8, gs=32, sdt="bf16", pad=0),
    ),
)
def test_moe_gather_id_fuse(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "moe_gather", c)
    rig.open()
    T, E, k, H, inter = c["T"], c["E"], c["k"], c["H"], c["I"]
    block = R.expert_layout(H, inter, c["bits"], c["gs"], c["sdt"])["block_bytes"]
    stride = block + (c["pad"] + 3) // 4 * 4
    blob, mats, layout = build_expert_blob(rig.rng, E, stride, H, inter, c["bits"], c["gs"], c["sdt"])
    idx, w = _route(rig.rng, T, E, k)
    x = normal(rig, T, H)
    eb = _expert_base(rig, blob, borrowed=c["pad"] == 0)
    ib, wb, xb = rig.inp("router_idx", idx), rig.inp("router_weight", w), rig.inp("normed", x)
    sumb = rig.out("moe_sum", T * H)
    htpe = rig.out("moe_index", E, dtype=np.uint32)
    hids = rig.out("moe_index", T * k, dtype=np.uint32)
    gm, um = rig.out("moe_scratch", T * k * inter), rig.out("moe_scratch", T * k * inter)
    dm = rig.out("moe_scratch", T * k * H)
    rig.run(
        ops.MoeGatherIdFuse(
            expert_base=eb,
            expert_stride=stride,
            layout=layout,
            indices=ib,
            weights=wb,
            mlp_in=xb,
            out_sum=sumb,
            htpe=htpe,
            hids=hids,
            gate_mid=gm,
            up_mid=um,
            down_mid=dm,
            n_tokens=T,
            n_experts=E,
            k=k,
        )
    )
    ref, counts = R.moe_gather(x, mats, idx, w.astype(np.float64))
    rig.check("MoeGatherIdFuse", sumb, ref, tol("MoeGatherIdFuse"), "out_sum")
    got_counts = rig.fetch_out(htpe, E, dtype=np.uint32)
    assert np.array_equal(got_counts, counts), f"htpe {got_counts} != {counts}"
    got_ids = rig.fetch_out(hids, T * k, dtype=np.uint32).astype(np.int64)
    assert sorted(got_ids.tolist()) == list(range(T * k)), (
        f"hids is not a permutation of the assignments: {got_ids}"
    )
    experts_in_order = idx.ravel()[got_ids]
    assert np.all(np.diff(experts_in_order.astype(np.int64)) >= 0), (
        f"hids not sorted by expert: {experts_in_order}"
    )


# ------------------------------------------------------------------------------------------------
# Linear attention


@pytest.mark.parametrize(
    "c",
    cases(
        dict(C=8, T=1, wd="bf16"),
        dict(C=33, T=5, wd="f32"),
        dict(C=64, T=2, wd="f16"),
        dict(C=24, T=7, wd="bf16"),
    ),
)
def test_conv1d_step(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "conv", c)
    C, T = c["C"], c["T"]
    w = rig.add_float("conv", rig.rng.standard_normal(C * 4) * 0.5, c["wd"]).reshape(C, 4)
    be = rig.open()
    x, st = normal(rig, T, C), normal(rig, 3, C)
    xb = rig.inp("act", x)
    sb = inout(rig, "conv_state", st)
    ob = rig.out("act", T * C)
    rig.run(
        ops.Conv1dStepNTokens(
            qkv_in=xb,
            conv_state=sb,
            weight_off=be.weight_offset("conv"),
            conv_out=ob,
            conv_dim=C,
            n_tokens=T,
            weight_dtype=c["wd"],
        )
    )
    ref, ref_state = R.conv1d_step(x, st, w)
    rig.check("Conv1dStepNTokens", ob, ref, tol("Conv1dStepNTokens"), "conv_out")
    got_state = rig.fetch_out(sb, 3 * C)
    assert np.array_equal(got_state.view(np.uint32), f32(ref_state).ravel().view(np.uint32)), (
        "conv_state must hold the last 3 inputs, oldest first"
    )


@pytest.mark.parametrize(
    "c",
    cases(
        dict(V=1, T=1, wd="bf16"),
        dict(V=4, T=3, wd="f32"),
        dict(V=32, T=5, wd="bf16"),
        dict(V=6, T=2, wd="f16"),
    ),
)
def test_compute_decay_beta(backend, tmp_path, c):
    rig = Rig(backend, tmp_path, "decay", c)
    V, T = c["V"], c["T"]
    a_log = rig.add_float("A_log", np.log(rig.rng.uniform(1.0, 16.0, V)), c["wd"])
    dt_bias = rig.add_float("dt_bias", rig.rng.standard_normal(V) * 0.5, c["wd"])
    be = rig.open()
    alpha, beta = normal(rig, T, V), normal(rig, T, V, scale=2.0)
    ab, bb = rig.inp("act", alpha), rig.inp("act", beta)
    gb, btb = rig.out("act", T * V), rig.out("act", T * V)
    rig.run(
        ops.ComputeDecayBetaNTokens(
            alpha_in=ab,
            beta_in=bb,
            a_log_off=be.weight_offset("A_log"),
            dt_bias_off=be.weight_offset("dt_bias"),
            g_decay_out=gb,
            beta_gate_out=btb,
            num_v_heads=V,
            n_tokens=T,
            weight_dtype=c["wd"],
        )
    )
    g, b = R.decay_beta(alpha, beta, a_log, dt_bias)
    rig.check("ComputeDecayBetaNTokens", gb, g, tol("ComputeDecayBetaNTokens"), "g_decay")
    rig.check("ComputeDecayBetaNTokens", btb, b, tol("ComputeDecayBetaNTokens"), "beta_gate")


def _gdn_inputs(rig: Rig, V, dv, kpv, dk, T, g_lo=0.3):
    """Realistic GatedDeltaNet inputs: unit-norm keys, queries scaled by dk^-0.5 (as after
    RmsNormQk), decays in (g_lo, 1), betas in (0.05, 1), a non-zero initial state."""
    nk = V // kpv
    q = rig.rng.standard_normal((T, nk, dk))
    k = rig.rng.standard_normal((T, nk, dk))
    q = q / np.linalg.norm(q, axis=-1, keepdims=True) / math.sqrt(dk)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rig.rng.standard_normal((T, V * dv))
    conv = f32(np.concatenate([q.reshape(T, -1), k.reshape(T, -1), v], axis=1))
    g = f32(rig.rng.uniform(g_lo, 1.0, (T, V)))
    beta = f32(rig.rng.uniform(0.05, 1.0, (T, V)))
    state = f32(rig.rng.standard_normal((V, dk, dv)) * 0.5)
    return conv, g, beta, state


def _run_gdn(backend, tmp_path, c, chunk):
    name = "GatedDeltaNetChunkwise" if chunk else "GatedDeltaNetStepNTokens"
    rig = Rig(backend, tmp_path, name, c)
    rig.open()
    V, dv, kpv, dk, T = c["V"], c["dv"], c["kpv"], c["dk"], c["T"]
    conv, g, beta, state = _gdn_inputs(rig, V, dv, kpv, dk, T, c.get("g_lo", 0.3))
    stb = inout(rig, "delta_state", state)
    cb, gb, bb = rig.inp("act", conv), rig.inp("act", g), rig.inp("act", beta)
    ob = rig.out("act", T * V * dv)
    fields = dict(
        state=stb,
        conv_out=cb,
        g_decay=gb,
        beta_gate=bb,
        output=ob,
        num_v_heads=V,
        value_dim=dv,
        k_heads_per_v=kpv,
        key_dim=dk,
        n_tokens=T,
    )
    op = (
        ops.GatedDeltaNetChunkwise(chunk_size=chunk, **fields)
        if chunk
        else ops.GatedDeltaNetStepNTokens(**fields)
    )
    rig.run(op)
    ref, ref_state = R.gated_delta_net(state, conv, g, beta, V, dv, kpv, dk)
    rig.check(name, ob, ref, tol(name), "output")
    rig.check(name, stb, ref_state, tol(name), "state")


@pytest.mark.parametrize(
    "c",
    cases(
        dict(V=1, dv=8, kpv=1, dk=8, T=1),
        dict(V=2, dv=16, kpv=2, dk=16, T=3),
        dict(V=4, dv=32, kpv=2, dk=16, T=5),
        dict(V=4, dv=8, kpv=4, dk=24, T=9),
        dict(V=2, dv=128, kpv=1, dk=128, T=4),
        dict(V=2, dv=16, kpv=1, dk=16, T=40, g_lo=0.01),
    ),
)
def test_gated_delta_net_step(backend, tmp_path, c):
    _run_gdn(backend, tmp_path, c, 0)


@pytest.mark.parametrize(
    "c",
    cases(
        dict(V=2, dv=16, kpv=1, dk=16, T=1, chunk=1),
        dict(V=2, dv=16, kpv=2, dk=16, T=7, chunk=4),
        dict(V=4, dv=8, kpv=2, dk=24, T=9, chunk=1),
        dict(V=2, dv=32, kpv=1, dk=32, T=21, chunk=16),
        dict(V=2, dv=16, kpv=2, dk=16, T=70, chunk=64),
        dict(V=1, dv=8, kpv=1, dk=8, T=5, chunk=64),
        dict(V=4, dv=32, kpv=4, dk=16, T=33, chunk=16),
        dict(V=2, dv=16, kpv=1, dk=16, T=67, chunk=64, g_lo=0.01),
        dict(V=2, dv=128, kpv=2, dk=128, T=18, chunk=4),
    ),
)
def test_gated_delta_net_chunkwise(backend, tmp_path, c):
    _run_gdn(backend, tmp_path, c, c["chunk"])
