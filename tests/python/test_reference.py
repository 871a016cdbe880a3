"""Self-tests of the float64 reference (`reference.py`) against hand computations and alternative
formulations; they need no backend."""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference as R


def test_decode_floats_and_unpack():
    raw = np.array([0x3F80, 0xC000, 0x3E80], dtype="<u2").view(np.uint8)
    assert R.decode_floats(raw, "bf16").tolist() == [1.0, -2.0, 0.25]
    raw16 = np.array([1.5, -3.0], dtype="<f2").view(np.uint8)
    assert R.decode_floats(raw16, "f16").tolist() == [1.5, -3.0]
    assert R.unpack_words(np.array([[0x76543210]], dtype=np.uint32), 4, 8).tolist() == [list(range(8))]
    assert R.unpack_words(np.array([[0x04030201, 0xFF000080]], dtype=np.uint32), 8, 8).tolist() == [
        [1, 2, 3, 4, 128, 0, 0, 255]
    ]


def test_dequant_by_hand():
    words = np.array([[0x76543210, 0xFEDCBA98]], dtype=np.uint32)
    w = R.dequant(words, np.array([[2.0, -1.0]]), np.array([[-1.0, 0.5]]), 1, 16, 8, 4)
    assert w.tolist() == [[2.0 * q - 1.0 for q in range(8)] + [-1.0 * q + 0.5 for q in range(8, 16)]]


@pytest.mark.parametrize("bits,gs", [(4, 32), (4, 64), (8, 64), (8, 128)])
def test_quantize_dequant_round_trip(bits, gs):
    rng = np.random.default_rng(bits * 1000 + gs)
    w = rng.standard_normal((5, 2 * gs)).astype(np.float32)
    words, s, b = R.quantize_mlx(w, gs, bits)
    deq = R.dequant(words, s, b, 5, 2 * gs, gs, bits)
    # rounding error is half a step, except past the far extreme where rescaling the step to
    # hit the near extreme exactly can clip by up to one step
    ratio = np.abs(deq - w) / np.abs(s).repeat(gs, axis=1)
    assert ratio.max() <= 1.0 + 1e-4
    assert np.mean(ratio > 0.5 + 1e-4) < 0.05
    # the extreme of each group is represented exactly (up to f32 rounding)
    assert np.any(np.abs(deq - w) < 1e-6)


def test_dequant_bytes_and_layout():
    lay = R.expert_layout(128, 64, 4, 64, "bf16")
    assert lay["gate"] == (0, 4096, 4096 + 256)
    assert lay["up"][0] == 4096 + 512
    assert lay["block_bytes"] == 3 * (4096 + 512)
    rng = np.random.default_rng(1)
    m = rng.standard_normal((3, 64)).astype(np.float32)
    words, s, b = R.quantize_mlx(m, 32, 8)
    blob = np.concatenate(
        [
            np.zeros(8, np.uint8),
            words.view(np.uint8).ravel(),
            s.astype("<f4").view(np.uint8).ravel(),
            b.astype("<f4").view(np.uint8).ravel(),
        ]
    )
    nw = words.nbytes
    got = R.dequant_bytes(blob, 8, 8 + nw, 8 + nw + s.nbytes, 8, 32, "f32", 3, 64)
    assert np.array_equal(got, R.dequant(words, s, b, 3, 64, 32, 8))


def test_norms_by_hand():
    assert np.allclose(
        R.rms_norm([[3.0, 4.0]], [1.0, 2.0], 0.0), [[3 / math.sqrt(12.5), 8 / math.sqrt(12.5)]]
    )
    x = np.array([[3.0, 4.0, 9.0, 0.0, 8.0, 7.0]])
    y = R.rms_norm_qk(x, 1, 2, 3, 6)
    n = math.sqrt(25 + 1e-6)
    assert np.allclose(
        y, [[3 / n / math.sqrt(2), 4 / n / math.sqrt(2), 9.0, 0.0 / n, 8.0 / math.sqrt(64 + 1e-6), 7.0]]
    )
    assert y[0, 2] == 9.0 and y[0, 5] == 7.0
    ph = R.rms_norm_per_head([[1.0, 1.0, 2.0, 2.0]], [1.0, 3.0], 2, 2, 0.0)
    assert np.allclose(ph, [[1.0, 3.0, 1.0, 3.0]])
    z = np.array([[0.0, 100.0]])
    g = R.gated_rms_norm([[3.0, 4.0]], z, [1.0, 2.0], 1, 2, 0.0)
    assert np.allclose(g, [[0.0, 8 / math.sqrt(12.5) * 100.0]])


def test_rope_by_hand():
    x = np.array([[1.0, 0.0, 5.0, 6.0, 2.0, 3.0, 7.0, 8.0]])  # 2 heads of 4, rotary 2
    y = R.rope(x, [math.pi / 2], 2, 4, 2, 1)
    assert np.allclose(y, [[0.0, 1.0, 5.0, 6.0, -3.0, 2.0, 7.0, 8.0]])
    # position 0 is the identity
    assert np.array_equal(R.rope(x, [0.3], 2, 4, 2, 0), x)
    # the float32-product angle differs from the exact one only by the product's rounding
    ang = float(np.float32(3.0) * np.float32(0.1))
    y = R.rope(np.array([[1.0, 0.0]]), np.array([0.1], dtype=np.float32), 1, 2, 2, 3, f32_angle=True)
    assert np.allclose(y, [[math.cos(ang), math.sin(ang)]], rtol=0, atol=1e-15)
    # rotary 4 pairs (0,2) and (1,3)
    y = R.rope(np.array([[1.0, 2.0, 0.0, 0.0]]), [math.pi, math.pi / 2], 1, 4, 4, 1)
    assert np.allclose(y, [[-1.0, 0.0, 0.0, 2.0]])


def test_split_and_elementwise():
    qp = np.arange(2 * 2 * 6, dtype=np.float64).reshape(2, 12)
    q, g = R.split_q_gate(qp, 2, 3)
    assert q.tolist() == [[0, 1, 2, 6, 7, 8], [12, 13, 14, 18, 19, 20]]
    assert g.tolist() == [[3, 4, 5, 9, 10, 11], [15, 16, 17, 21, 22, 23]]
    assert np.allclose(R.swiglu([0.0, 1.0], [5.0, 2.0]), [0.0, 2.0 / (1 + math.exp(-1))])
    assert np.allclose(R.sigmoid_gate([[2.0]], [[0.0]]), [[1.0]])
    assert np.allclose(R.sigmoid([-800.0, 800.0]), [0.0, 1.0])
    c = R.moe_combine([[1.0, 2.0]], [[10.0, 20.0]], [[4.0, 8.0]], [0.0])
    assert np.allclose(c, [[13.0, 26.0]])
    raw = np.arange(1, 9, dtype=np.uint8)
    assert R.zero_buffer(raw, 3).tolist() == [0, 0, 0, 4, 5, 6, 7, 8]


def test_sdpa_by_hand():
    hd = 2
    q = np.array([[1.0, 0.0, 0.0, 1.0]])  # 2 heads sharing kv head 0
    k = np.array([[1.0, 0.0], [1.0, 0.0], [9.0, 9.0]])
    v = np.array([[2.0, 4.0], [4.0, 8.0], [100.0, 100.0]])
    out = R.sdpa_causal(q, k, v, 2, 2, hd, 0, 1.0)
    assert np.allclose(out, [[2.0, 4.0, 2.0, 4.0]])  # only row 0 visible
    out = R.sdpa_causal(q, k, v, 2, 2, hd, 1, 1.0)
    assert np.allclose(out, [[3.0, 6.0, 3.0, 6.0]])  # equal scores: the mean of rows 0 and 1
    # GQA: head 1 of 2 with heads_per_kv 1 uses kv head 1
    k2 = np.array([[0.0, 0.0, 1.0, 1.0]])
    v2 = np.array([[1.0, 1.0, 5.0, 6.0]])
    assert np.allclose(R.sdpa_causal(q, k2, v2, 2, 1, hd, 0, 0.5), [[1.0, 1.0, 5.0, 6.0]])


def test_kv_append():
    kc = np.zeros((4, 2))
    vc = np.ones((4, 2))
    k, v = R.kv_append(kc, vc, [[1.0, 2.0]], [[3.0, 4.0]], 2)
    assert k.tolist() == [[0, 0], [0, 0], [1, 2], [0, 0]] and v.tolist() == [[1, 1], [1, 1], [3, 4], [1, 1]]


def test_topk_and_normalize():
    idx, w = R.softmax_topk(np.array([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), 2)
    assert idx.tolist() == [[1, 2], [0, 1]]
    e = np.exp([1.0, 3.0, 3.0, 0.0])
    assert np.allclose(w[0], [e[1] / e.sum()] * 2) and np.allclose(w[1], [0.25, 0.25])
    n = R.normalize_weights(np.array([[1.0, 3.0], [0.0, 0.0], [-1.0, 0.5]]))
    assert n.tolist() == [[0.25, 0.75], [0.0, 0.0], [-1.0, 0.5]]


def test_moe_forms_agree():
    rng = np.random.default_rng(3)
    h, i, e, t_n, k = 8, 4, 3, 4, 2
    experts = [tuple(rng.standard_normal(s) for s in ((i, h), (i, h), (h, i))) for _ in range(e)]
    x = rng.standard_normal((t_n, h))
    idx = np.array([[0, 2], [1, 0], [2, 1], [0, 1]])
    w = rng.random((t_n, k))
    ref, counts = R.moe_gather(x, experts, idx, w)
    assert counts.tolist() == [3, 3, 2]
    slots = {10 + j: experts[j] for j in range(e)}
    buckets, tok, ww = [0], [], []
    for ex in range(e):
        for t in range(t_n):
            for j in range(k):
                if idx[t, j] == ex:
                    tok.append(t)
                    ww.append(w[t, j])
        buckets.append(len(tok))
    out, rows = R.moe_batched(x, slots, [10, 11, 12], buckets, tok, ww)
    assert np.allclose(out, ref)
    g, u, d = experts[0]
    gg = x[0] @ g.T
    assert np.allclose(rows["gate"][0], gg)
    assert np.allclose(rows["act"][0], gg / (1 + np.exp(-gg)) * (x[0] @ u.T))


def test_conv1d_by_hand():
    state = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    x = np.array([[7.0, 8.0], [9.0, 10.0]])
    w_cur = np.array([[0.0, 0.0, 0.0, 1.0]] * 2)
    out, st = R.conv1d_step(x, state, w_cur)
    assert np.allclose(out, R.silu(x))
    assert st.tolist() == [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]
    w_old = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    out, _ = R.conv1d_step(x, state, w_old)
    assert np.allclose(out, R.silu(np.array([[1.0, 8.0], [3.0, 12.0]])))


def test_decay_beta_by_hand():
    g, b = R.decay_beta(np.array([[0.0, 1.0]]), np.array([[0.0, 2.0]]), [0.0, math.log(2.0)], [0.0, -1.0])
    assert np.allclose(g, [[0.5, 0.25]])
    assert np.allclose(b, [[0.5, 1 / (1 + math.exp(-2))]])


def test_gated_delta_net_matrix_form():
    """The sequential recurrence equals S_t = g (I - beta k k^T) S_{t-1} + beta k v^T, o = S^T q."""
    rng = np.random.default_rng(7)
    nv, dv, kpv, dk, t_n = 4, 3, 2, 5, 6
    nk = nv // kpv
    conv = rng.standard_normal((t_n, 2 * nk * dk + nv * dv))
    g = rng.uniform(0.3, 1.0, (t_n, nv))
    beta = rng.uniform(0.0, 1.0, (t_n, nv))
    s0 = rng.standard_normal((nv, dk, dv))
    out, s = R.gated_delta_net(s0, conv, g, beta, nv, dv, kpv, dk)
    ss = s0.copy()
    for t in range(t_n):
        q = conv[t, : nk * dk].reshape(nk, dk)
        k = conv[t, nk * dk : 2 * nk * dk].reshape(nk, dk)
        v = conv[t, 2 * nk * dk :].reshape(nv, dv)
        for h in range(nv):
            kk = k[h // kpv]
            ss[h] = g[t, h] * (np.eye(dk) - beta[t, h] * np.outer(kk, kk)) @ ss[h] + beta[t, h] * np.outer(
                kk, v[h]
            )
            assert np.allclose(out[t, h * dv : (h + 1) * dv], ss[h].T @ q[h // kpv])
    assert np.allclose(s, ss)
    # from a zero state one token gives o = (q . k) beta v
    o1, _ = R.gated_delta_net(np.zeros((nv, dk, dv)), conv[:1], g[:1], beta[:1], nv, dv, kpv, dk)
    q = conv[0, : nk * dk].reshape(nk, dk)
    k = conv[0, nk * dk : 2 * nk * dk].reshape(nk, dk)
    v = conv[0, 2 * nk * dk :].reshape(nv, dv)
    for h in range(nv):
        assert np.allclose(o1[0, h * dv : (h + 1) * dv], (q[h // kpv] @ k[h // kpv]) * beta[0, h] * v[h])


def test_embed_and_rel_err():
    t = np.arange(12.0).reshape(4, 3)
    assert R.embed_gather(t, [3, 0, 3]).tolist() == [[9, 10, 11], [0, 1, 2], [9, 10, 11]]
    assert R.rel_err([3.0, 4.0], [3.0, 4.0]) == 0.0
    assert abs(R.rel_err([3.0, 4.5], [3.0, 4.0]) - 0.1) < 1e-12
