//! Property tests of the device-free planner on random graphs: the colouring never lets two
//! buffers live at the same op share memory, it is deterministic, and the report's bounds hold.

use moeflux::backend::cpu::CpuBufferPool;
use moeflux::backend::{BufferPool, PoolInfo};
use moeflux::graph::{ActBuf, BufId, Graph, Op, ResidualBuf};
use moeflux::plan::lifetime::{analyze_lifetimes, check_layout, greedy_color};
use proptest::prelude::*;

/// A random op over buffer indices: (kind, a, b, out).
fn arb_graph(n_bufs: usize) -> impl Strategy<Value = Vec<(u8, usize, usize, usize)>> {
    prop::collection::vec((0u8..3, 0..n_bufs, 0..n_bufs, 0..n_bufs), 1..24)
}

/// Build a graph over `roles` (true = residual, false = act) using element-wise ops whose field
/// roles fit the buffers; ops whose roles do not fit are skipped.
fn build(spec: &[(u8, usize, usize, usize)], residual: &[bool]) -> Graph {
    let mut g = Graph::new();
    for (i, &(kind, a, b, out)) in spec.iter().enumerate() {
        let label = format!("op{i}");
        match kind {
            0 if residual[a] && !residual[b] && residual[out] => g.push(Op::ResidualAddNTokens {
                label,
                a: BufId::<ResidualBuf>::from_raw(a as u32),
                b: BufId::<ActBuf>::from_raw(b as u32),
                out: BufId::<ResidualBuf>::from_raw(out as u32),
                n_tokens: 1,
                dim: 4,
            }),
            1 if !residual[a] && !residual[b] => g.push(Op::SigmoidGateNTokens {
                label,
                x: BufId::<ActBuf>::from_raw(a as u32),
                gate: BufId::<ActBuf>::from_raw(b as u32),
                dim: 4,
                n_tokens: 1,
            }),
            2 if !residual[a] && !residual[b] && !residual[out] && out != a && out != b => {
                g.push(Op::SwigluFusedBatched {
                    label,
                    gate: BufId::from(BufId::<ActBuf>::from_raw(a as u32)),
                    up: BufId::from(BufId::<ActBuf>::from_raw(b as u32)),
                    out: BufId::from(BufId::<ActBuf>::from_raw(out as u32)),
                    total: 4,
                })
            }
            _ => &mut g,
        };
    }
    g
}

fn pool_for(residual: &[bool], persistent: &[bool], sizes: &[usize]) -> CpuBufferPool {
    let mut pool = CpuBufferPool::new();
    for i in 0..residual.len() {
        let role = if residual[i] {
            moeflux::graph::Role::Residual
        } else {
            moeflux::graph::Role::Act
        };
        pool.alloc_role(sizes[i], role, &format!("b{i}"), persistent[i])
            .unwrap();
    }
    pool
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn colouring_is_safe_deterministic_and_bounded(
        spec in arb_graph(10),
        residual in prop::collection::vec(any::<bool>(), 10),
        persistent in prop::collection::vec(prop::bool::weighted(0.2), 10),
        extra in prop::collection::vec(0usize..64, 10),
    ) {
        let sizes: Vec<usize> = extra.iter().map(|e| 16 + 4 * e).collect();
        let g = build(&spec, &residual);
        let lt = analyze_lifetimes(&g);
        let c1 = greedy_color(&lt, |r| sizes[r as usize], |r| !persistent[r as usize]);
        let c2 = greedy_color(&lt, |r| sizes[r as usize], |r| !persistent[r as usize]);
        prop_assert_eq!(&c1, &c2);
        // Pairwise: same colour implies disjoint intervals.
        for (a, ca) in &c1.bufid_to_color {
            for (b, cb) in &c1.bufid_to_color {
                if a < b && ca == cb {
                    prop_assert!(!lt.intervals[a].overlaps(&lt.intervals[b]), "{a} and {b} overlap");
                }
            }
        }
        let mut pool = pool_for(&residual, &persistent, &sizes);
        let report = pool.commit_plan(&g, true).unwrap();
        prop_assert!(report.lower_bound_bytes <= report.physical_bytes);
        prop_assert!(report.physical_bytes <= report.logical_bytes);
        prop_assert!(check_layout(&g, &pool).is_ok());
        // Persistent buffers keep their own memory.
        for (i, &p) in persistent.iter().enumerate() {
            if p {
                let phys = pool.physical_of(i as u32);
                let shared = (0..persistent.len()).filter(|&j| pool.physical_of(j as u32) == phys).count();
                prop_assert_eq!(shared, 1);
            }
        }
        // Re-callable on the same graph: still safe, and the bounds still hold.
        let again = pool.commit_plan(&g, true).unwrap();
        prop_assert!(again.lower_bound_bytes <= again.physical_bytes, "{again:?}");
        prop_assert!(again.physical_bytes <= again.logical_bytes, "{again:?}");
        prop_assert!(check_layout(&g, &pool).is_ok());
    }
}

#[test]
fn a_second_graph_that_breaks_the_layout_is_detected() {
    // b1 and b2 never overlap in g1, so they share memory; g2 keeps both live at once.
    let mut pool = CpuBufferPool::new();
    let x: BufId<ActBuf> = pool.alloc(16, "x", true).unwrap();
    let b1: BufId<ActBuf> = pool.alloc(16, "b1", false).unwrap();
    let b2: BufId<ActBuf> = pool.alloc(16, "b2", false).unwrap();
    let out: BufId<ActBuf> = pool.alloc(16, "out", true).unwrap();
    let sw = |label: &str, g, u, o| Op::SwigluFusedBatched {
        label: label.into(),
        gate: BufId::from(g),
        up: BufId::from(u),
        out: BufId::from(o),
        total: 4,
    };
    let g1 = Graph::from(vec![
        sw("a", x, x, b1),
        sw("b", b1, x, out),
        sw("c", x, x, b2),
        sw("d", b2, x, out),
    ]);
    let report = pool.commit_plan(&g1, true).unwrap();
    assert_eq!(report.colors, 1);
    assert_eq!(pool.physical_of(b1.raw()), pool.physical_of(b2.raw()));
    let g2 = Graph::from(vec![
        sw("a", x, x, b1),
        sw("c", x, x, b2),
        sw("d", b1, b2, out),
    ]);
    let err = check_layout(&g2, &pool).unwrap_err();
    assert!(err.contains("b1") && err.contains("b2"), "{err}");
}
