//! The CPU backend end to end from Rust: validation errors name op, field and numbers; in-place
//! and aliased operands are handled; stats and the per-op profile mode record what ran.

use moeflux::backend::cpu::{CpuBackend, CpuConfig};
use moeflux::backend::{Backend, BufferPool};
use moeflux::graph::{ActBuf, BufId, Graph, Op, ResidualBuf};
use moeflux::Error;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_f32(be: &CpuBackend, id: BufId<impl moeflux::graph::Buf>, n: usize) -> Vec<f32> {
    let mut b = vec![0u8; n * 4];
    be.pool().download(id, &mut b).unwrap();
    b.chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn residual_add_in_place_and_errors_name_label_and_field() {
    let mut be = CpuBackend::open(CpuConfig::default()).unwrap();
    let a: BufId<ResidualBuf> = be.pool_mut().alloc(16, "a", true).unwrap();
    let b: BufId<ActBuf> = be.pool_mut().alloc(16, "b", true).unwrap();
    be.pool_mut()
        .upload(a, &f32_bytes(&[1.0, 2.0, 3.0, 4.0]))
        .unwrap();
    be.pool_mut()
        .upload(b, &f32_bytes(&[0.5, 0.25, -1.0, 8.0]))
        .unwrap();
    let add = |n_tokens, dim| Op::ResidualAddNTokens {
        label: "L0.res".into(),
        a,
        b,
        out: a,
        n_tokens,
        dim,
    };
    be.execute(&Graph::from(vec![add(1, 4)]), "g").unwrap();
    assert_eq!(read_f32(&be, a, 4), vec![1.5, 2.25, 2.0, 12.0]);

    let err = be.execute(&Graph::from(vec![add(2, 4)]), "g").unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            Error::OutOfBounds {
                needed: 32,
                have: 16,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("L0.res (ResidualAddNTokens)") && msg.contains("`a`"),
        "{msg}"
    );

    let bad = Op::ResidualAddNTokens {
        label: "L0.res".into(),
        a,
        b: BufId::from_raw(99),
        out: a,
        n_tokens: 1,
        dim: 4,
    };
    let err = be.execute(&Graph::from(vec![bad]), "g").unwrap_err();
    assert!(
        matches!(
            err,
            Error::BadBufId {
                id: 99,
                field: "b",
                ..
            }
        ),
        "{err}"
    );

    // A residual buffer wired where an activation is expected: a role error at run time too.
    let wrong = Op::ResidualAddNTokens {
        label: "L0.res".into(),
        a,
        b: BufId::from_raw(a.raw()),
        out: a,
        n_tokens: 1,
        dim: 4,
    };
    let err = be.execute(&Graph::from(vec![wrong]), "g").unwrap_err();
    assert!(matches!(err, Error::Role { field: "b", .. }), "{err}");
    let stats = be.stats().snapshot();
    assert_eq!(stats.iter().find(|(l, _)| l == "g").unwrap().1.count, 1);
}

#[test]
fn an_input_aliasing_the_output_is_read_before_it_is_overwritten() {
    let mut be = CpuBackend::open(CpuConfig::default()).unwrap();
    let x: BufId<ActBuf> = be.pool_mut().alloc(16, "x", true).unwrap();
    be.pool_mut()
        .upload(x, &f32_bytes(&[0.0, 1.0, -2.0, 3.0]))
        .unwrap();
    // x *= sigmoid(x): gate and x are the same buffer.
    let op = Op::SigmoidGateNTokens {
        label: "gate".into(),
        x,
        gate: x,
        dim: 4,
        n_tokens: 1,
    };
    be.execute(&Graph::from(vec![op]), "g").unwrap();
    let got = read_f32(&be, x, 4);
    for (g, v) in got.iter().zip([0.0f32, 1.0, -2.0, 3.0]) {
        let want = v / (1.0 + (-v).exp());
        assert!((g - want).abs() < 1e-6, "{g} vs {want}");
    }
    // Two written fields on one buffer is rejected before anything runs.
    let split = Op::SplitQGate {
        label: "split".into(),
        q_proj: x,
        q_out: x,
        gate_out: x,
        num_heads: 1,
        head_dim: 2,
        n_tokens: 1,
    };
    let err = be.execute(&Graph::from(vec![split]), "g").unwrap_err();
    assert!(err.to_string().contains("same memory"), "{err}");
}

#[test]
fn profile_mode_times_each_op_under_its_label() {
    let mut be = CpuBackend::open(CpuConfig::default()).unwrap();
    be.set_profile_per_op(true);
    let x: BufId<ActBuf> = be.pool_mut().alloc(16, "x", true).unwrap();
    let y: BufId<ActBuf> = be.pool_mut().alloc(16, "y", true).unwrap();
    let g = Graph::from(vec![
        Op::ZeroBuffer {
            label: "zero".into(),
            buf: BufId::from(x),
            n_bytes: 16,
        },
        Op::SigmoidGateNTokens {
            label: "gate".into(),
            x: y,
            gate: x,
            dim: 4,
            n_tokens: 1,
        },
    ]);
    be.execute(&g, "whole").unwrap();
    let labels: Vec<String> = be.stats().snapshot().into_iter().map(|(l, _)| l).collect();
    assert_eq!(labels, vec!["gate".to_string(), "zero".to_string()]);
    assert!(g.dump().contains("SigmoidGateNTokens"));
}

#[test]
fn weight_ops_without_a_weight_file_are_clear_errors() {
    let mut be = CpuBackend::open(CpuConfig::default()).unwrap();
    let x: BufId<ResidualBuf> = be.pool_mut().alloc(16, "x", true).unwrap();
    let out = be.pool_mut().alloc(16, "out", true).unwrap();
    let op = Op::RmsNormBf16NTokens {
        label: "norm".into(),
        x: BufId::from(x),
        weight_off: 0,
        out,
        dim: 4,
        n_tokens: 1,
        eps: 1e-6,
        weight_dtype: moeflux::graph::WDtype::Bf16,
    };
    let err = be.execute(&Graph::from(vec![op]), "g").unwrap_err();
    assert!(
        matches!(
            err,
            Error::NoWeights {
                field: "weight_off",
                ..
            }
        ),
        "{err}"
    );
}
