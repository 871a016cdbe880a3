//! Every op on a Metal backend (the emulator; on a Mac also the GPU) against the CPU backend, for
//! every kernel switch, plus checks that the cases dispatch every kernel of `shaders/metal/` and
//! that each switch selects the kernels it documents.
//!
//! Both backends get the same allocations (so the same ids), the same weight file and inputs;
//! outputs start as NaN so unwritten elements fail. Floats are compared by norm-wise relative
//! error, integers exactly.

use super::encode::Switches;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, BufferPool};
use crate::error::Result;
use crate::graph::{BufId, ExpertLayout, Graph, Op, Role, WDtype, WeightRef};
use crate::weights::file::{WeightFile, WeightWriter};
use half::{bf16, f16};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn u32(&mut self) -> u32 {
        (self.u64() >> 32) as u32
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.u64() % n as u64) as u32
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn normal(&mut self) -> f32 {
        (0..12).map(|_| self.uniform(0.0, 1.0)).sum::<f32>() - 6.0
    }
    fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `v` stored as `d` (little-endian bytes).
fn stored(v: &[f32], d: WDtype) -> Vec<u8> {
    match d {
        WDtype::F32 => f32_bytes(v),
        WDtype::Bf16 => v
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        WDtype::F16 => v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

/// Random packed words, scales and biases of a `[rows, cols]` matrix, each part's bytes.
fn random_quant(
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    bits: u32,
    gs: u32,
    sdt: WDtype,
) -> [Vec<u8>; 3] {
    let words: Vec<u32> = (0..rows * cols * bits as usize / 32)
        .map(|_| rng.u32())
        .collect();
    let groups = rows * cols / gs as usize;
    let qmax = ((1u32 << bits) - 1) as f32;
    let scales: Vec<f32> = (0..groups).map(|_| rng.normal() * 0.1 / qmax).collect();
    let biases: Vec<f32> = (0..groups).map(|_| rng.normal() * 0.05).collect();
    [
        u32_bytes(&words),
        stored(&scales, sdt),
        stored(&biases, sdt),
    ]
}

/// A weight file under construction: raw tensors by name.
#[derive(Default)]
struct Weights {
    tensors: Vec<(String, &'static str, Vec<u8>)>,
}

impl Weights {
    fn floats(&mut self, name: &str, v: &[f32], d: WDtype) {
        self.tensors.push((name.into(), d.name(), stored(v, d)));
    }
    #[allow(clippy::too_many_arguments)]
    fn quant(
        &mut self,
        rng: &mut Rng,
        name: &str,
        rows: usize,
        cols: usize,
        bits: u32,
        gs: u32,
        sdt: WDtype,
    ) {
        let [w, s, b] = random_quant(rng, rows, cols, bits, gs, sdt);
        self.tensors.push((format!("{name}.w"), "u32", w));
        self.tensors.push((format!("{name}.s"), sdt.name(), s));
        self.tensors.push((format!("{name}.b"), sdt.name(), b));
    }
}

/// A Metal backend under test beside the CPU oracle.
trait UnderTest: Backend + Sized {
    /// `None` when this machine cannot run it (no Metal device).
    fn make(weights: Option<WeightFile>, sw: Switches) -> Option<Self>;
    /// Run one op; the kernels it dispatched, where the backend records them.
    fn run_op(&self, op: &Op) -> Result<Vec<String>>;
}

#[cfg(feature = "metal-emu")]
impl UnderTest for super::MetalEmuBackend {
    fn make(weights: Option<WeightFile>, sw: Switches) -> Option<Self> {
        Some(Self::with_weights(weights, sw))
    }
    fn run_op(&self, op: &Op) -> Result<Vec<String>> {
        let mut ctx = self.begin_encoding();
        self.encode_op(op, &mut ctx)?;
        let used = ctx.dispatches().iter().map(|d| d.kernel.clone()).collect();
        self.submit_and_wait(ctx, "test")?;
        Ok(used)
    }
}

#[cfg(any(target_os = "macos", feature = "metal"))]
impl UnderTest for super::MetalBackend {
    fn make(weights: Option<WeightFile>, sw: Switches) -> Option<Self> {
        ::metal::Device::system_default()?;
        Some(Self::with_weights(weights, sw).unwrap_or_else(|e| panic!("opening Metal: {e}")))
    }
    fn run_op(&self, op: &Op) -> Result<Vec<String>> {
        self.execute(
            &Graph {
                ops: vec![op.clone()],
            },
            "test",
        )?;
        Ok(Vec::new())
    }
}

/// A CPU and a Metal backend on one weight file, allocated in lockstep.
struct Rig<B: UnderTest> {
    cpu: CpuBackend,
    dev: B,
    dir: Option<PathBuf>,
    used: BTreeSet<String>,
}

impl<B: UnderTest> Drop for Rig<B> {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl<B: UnderTest> Rig<B> {
    fn open(w: Weights, sw: Switches) -> Rig<B> {
        static N: AtomicU32 = AtomicU32::new(0);
        let (wf_cpu, wf_dev, dir) = if w.tensors.is_empty() {
            (None, None, None)
        } else {
            let dir = std::env::temp_dir().join(format!(
                "moeflux-metal-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("w.bin");
            let mut ww = WeightWriter::create(&path).unwrap();
            for (name, dtype, bytes) in &w.tensors {
                let elem = crate::weights::file::dtype_size(dtype).unwrap() as usize;
                ww.add_raw(name, dtype, &[(bytes.len() / elem) as u64], bytes)
                    .unwrap();
            }
            ww.finish().unwrap();
            (
                Some(WeightFile::open(&path).unwrap()),
                Some(WeightFile::open(&path).unwrap()),
                Some(dir),
            )
        };
        Rig {
            cpu: CpuBackend::with_weights(wf_cpu),
            dev: B::make(wf_dev, sw).expect("the backend under test is unavailable here"),
            dir,
            used: BTreeSet::new(),
        }
    }

    fn off(&self, name: &str) -> u64 {
        self.cpu.weight_file().unwrap().tensor(name).unwrap().offset
    }

    fn qref(&self, name: &str, bits: u32, gs: u32, sdt: WDtype) -> WeightRef {
        WeightRef {
            w_off: self.off(&format!("{name}.w")),
            s_off: self.off(&format!("{name}.s")),
            b_off: self.off(&format!("{name}.b")),
            bits,
            group_size: gs,
            scale_dtype: sdt,
        }
    }

    fn bytes(&mut self, role: Role, data: &[u8]) -> u32 {
        let a = self
            .cpu
            .pool_mut()
            .alloc_role(data.len(), role, "t", false)
            .unwrap();
        let b = self
            .dev
            .pool_mut()
            .alloc_role(data.len(), role, "t", false)
            .unwrap();
        assert_eq!(a, b);
        let id: BufId<crate::graph::AnyBuf> = BufId::from_raw(a);
        self.cpu.pool_mut().upload(id, data).unwrap();
        self.dev.pool_mut().upload(id, data).unwrap();
        a
    }
    fn f32s(&mut self, role: Role, v: &[f32]) -> u32 {
        self.bytes(role, &f32_bytes(v))
    }
    fn u32s(&mut self, role: Role, v: &[u32]) -> u32 {
        self.bytes(role, &u32_bytes(v))
    }
    /// `n` floats of NaN (plus a guard element).
    fn out(&mut self, role: Role, n: usize) -> u32 {
        self.f32s(role, &vec![f32::NAN; n + 1])
    }
    fn out_u32(&mut self, role: Role, n: usize) -> u32 {
        self.u32s(role, &vec![0xDEAD_BEEF; n + 1])
    }

    /// Run `op` on both backends (recording the kernels the Metal one dispatched).
    fn run(&mut self, op: Op) {
        let g = Graph {
            ops: vec![op.clone()],
        };
        self.cpu
            .execute(&g, "cpu")
            .unwrap_or_else(|e| panic!("cpu {}: {e}", op.name()));
        let used = self
            .dev
            .run_op(&op)
            .unwrap_or_else(|e| panic!("{} {}: {e}", self.dev.name(), op.name()));
        self.used.extend(used);
        self.used.insert(format!("op:{}", op.name()));
    }

    fn fetch(&self, raw: u32, n: usize) -> (Vec<u8>, Vec<u8>) {
        let id: BufId<crate::graph::AnyBuf> = BufId::from_raw(raw);
        let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
        self.cpu.pool().download(id, &mut a).unwrap();
        self.dev.pool().download(id, &mut b).unwrap();
        (a, b)
    }

    /// Norm-wise relative error of the emulated `n` floats of `raw` against the CPU's.
    fn check(&self, raw: u32, n: usize, tol: f64, what: &str) {
        self.check_from(raw, 0, n, tol, what)
    }

    /// As `check` for floats `start..start + n`; the `start` floats before must be unchanged.
    fn check_from(&self, raw: u32, start: usize, n: usize, tol: f64, what: &str) {
        let (a, b) = self.fetch(raw, 4 * (start + n) + 4);
        assert!(
            a[..4 * start] == b[..4 * start],
            "{what}: elements before the output changed"
        );
        let f = |v: &[u8]| -> Vec<f32> {
            v[4 * start..]
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let (c, e) = (f(&a), f(&b));
        let (mut num, mut den) = (0f64, 0f64);
        for i in 0..n {
            num += (c[i] as f64 - e[i] as f64).powi(2);
            den += (c[i] as f64).powi(2);
        }
        let err = num.sqrt() / den.sqrt().max(1e-30);
        assert!(
            err <= tol,
            "{what}: relative error {err:.3e} > {tol:.0e}\ncpu {:?}\nemu {:?}",
            &c[..n.min(8)],
            &e[..n.min(8)]
        );
        assert_eq!(
            c[n].to_bits(),
            e[n].to_bits(),
            "{what}: element past the end changed"
        );
    }

    fn check_exact(&self, raw: u32, bytes: usize, what: &str) {
        let (a, b) = self.fetch(raw, bytes);
        assert!(
            a == b,
            "{what}: bytes differ\ncpu {:?}\nemu {:?}",
            &a[..bytes.min(32)],
            &b[..bytes.min(32)]
        );
    }
}

fn id<B: crate::graph::Buf>(raw: u32) -> BufId<B> {
    BufId::from_raw(raw)
}

/// The switch settings a case is run under: defaults, then each switch flipped.
fn alternatives() -> Vec<Switches> {
    let d = Switches::default();
    vec![
        d,
        Switches {
            matvec_m1: false,
            ..d
        },
        Switches {
            sdpa_gqa: false,
            ..d
        },
        Switches {
            moe_gather: false,
            ..d
        },
        Switches {
            delta_net_vb: false,
            ..d
        },
    ]
}

const DTYPES: [WDtype; 3] = [WDtype::F32, WDtype::Bf16, WDtype::F16];
const TOL: f64 = 2e-5;

// ---- cases: each builds rigs, runs ops on both backends, compares, and returns the kernels ----

fn case_norms<B: UnderTest>(sw: Switches) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut rng = Rng::new(1);
    for (i, &(t, d, eps)) in [
        (1u32, 7u32, 1e-6f32),
        (3, 64, 1e-5),
        (5, 33, 0.0),
        (17, 300, 1e-6),
    ]
    .iter()
    .enumerate()
    {
        let dt = DTYPES[i % 3];
        let mut w = Weights::default();
        w.floats(
            "norm",
            &(0..d).map(|_| rng.uniform(0.5, 1.5)).collect::<Vec<_>>(),
            dt,
        );
        let mut r = Rig::<B>::open(w, sw);
        let x = r.f32s(Role::Residual, &rng.normals((t * d) as usize, 2.0));
        let out = r.out(Role::Normed, (t * d) as usize);
        let weight_off = r.off("norm");
        r.run(Op::RmsNormBf16NTokens {
            label: "n".into(),
            x: id(x),
            weight_off,
            out: id(out),
            dim: d,
            n_tokens: t,
            eps,
            weight_dtype: dt,
        });
        r.check(out, (t * d) as usize, TOL, "RmsNormBf16NTokens");
        used.extend(r.used.clone());
    }
    for (i, &(t, h, hd)) in [(1u32, 1u32, 8u32), (3, 4, 16), (5, 2, 24), (2, 3, 256)]
        .iter()
        .enumerate()
    {
        let dt = DTYPES[i % 3];
        let mut w = Weights::default();
        w.floats(
            "qn",
            &(0..hd).map(|_| rng.uniform(0.5, 1.5)).collect::<Vec<_>>(),
            dt,
        );
        let mut r = Rig::<B>::open(w, sw);
        let n = (t * h * hd) as usize;
        let x = r.f32s(Role::Act, &[rng.normals(n, 3.0), vec![f32::NAN]].concat());
        let weight_off = r.off("qn");
        r.run(Op::RmsNormPerHeadNTokens {
            label: "h".into(),
            x: id(x),
            weight_off,
            num_heads: h,
            head_dim: hd,
            n_tokens: t,
            eps: 1e-6,
            weight_dtype: dt,
        });
        r.check(x, n, TOL, "RmsNormPerHeadNTokens");
        used.extend(r.used.clone());
    }
    for &(t, nk, dk, koff, total) in &[
        (1u32, 1u32, 8u32, 8u32, 24u32),
        (2, 3, 5, 15, 30),
        (3, 2, 128, 256, 768),
        (4, 4, 32, 128, 320),
    ] {
        let mut r = Rig::<B>::open(Weights::default(), sw);
        let n = (t * total) as usize;
        let x = r.f32s(Role::Act, &[rng.normals(n, 1.5), vec![f32::NAN]].concat());
        r.run(Op::RmsNormQkNTokens {
            label: "qk".into(),
            x: id(x),
            num_k_heads: nk,
            key_dim: dk,
            key_offset_per_token: koff,
            per_token_total: total,
            n_tokens: t,
        });
        r.check(x, n, TOL, "RmsNormQkNTokens");
        used.extend(r.used.clone());
    }
    for (i, &(v, dv, t)) in [(1u32, 8u32, 1u32), (4, 32, 3), (3, 17, 4), (2, 128, 2)]
        .iter()
        .enumerate()
    {
        let dt = DTYPES[i % 3];
        let mut w = Weights::default();
        w.floats(
            "gn",
            &(0..dv).map(|_| rng.uniform(0.5, 1.5)).collect::<Vec<_>>(),
            dt,
        );
        let mut r = Rig::<B>::open(w, sw);
        let n = (v * dv * t) as usize;
        let vals = r.f32s(Role::Act, &rng.normals(n, 2.0));
        let z = r.f32s(Role::Act, &rng.normals(n, 2.0));
        let out = r.out(Role::Act, n);
        let weight_off = r.off("gn");
        r.run(Op::GatedRmsNormNTokens {
            label: "g".into(),
            values: id(vals),
            z: id(z),
            weight_off,
            output: id(out),
            num_v_heads: v,
            value_dim: dv,
            n_tokens: t,
            eps: 1e-6,
            weight_dtype: dt,
        });
        r.check(out, n, TOL, "GatedRmsNormNTokens");
        used.extend(r.used.clone());
    }
    used
}

fn case_attention_pieces<B: UnderTest>(sw: Switches) -> BTreeSet<String> {
    let mut rng = Rng::new(2);
    let mut r = Rig::<B>::open(Weights::default(), sw);
    for &(t, h, hd, rd, start, theta) in &[
        (1u32, 2u32, 8u32, 8u32, 0u32, 1e4f64),
        (3, 4, 16, 8, 5, 1e4),
        (2, 3, 64, 16, 1000, 1e7),
        (4, 1, 6, 2, 3, 1e4),
        (1, 2, 256, 64, 4095, 1e7),
        (17, 2, 128, 32, 0, 1e7),
    ] {
        let inv: Vec<f32> = (0..rd / 2)
            .map(|i| theta.powf(-(2.0 * i as f64) / rd as f64) as f32)
            .collect();
        let f = r.f32s(Role::InvFreq, &inv);
        let n = (t * h * hd) as usize;
        let x = r.f32s(Role::Act, &[rng.normals(n, 1.0), vec![f32::NAN]].concat());
        r.run(Op::RopeNTokens {
            label: "r".into(),
            x: id(x),
            inv_freq: id(f),
            n_tokens: t,
            num_heads: h,
            head_dim: hd,
            rotary_dim: rd,
            start_pos: start,
        });
        r.check(x, n, TOL, "RopeNTokens");
    }
    for &(t, h, hd) in &[(1u32, 1u32, 4u32), (2, 3, 7), (5, 2, 64)] {
        let n = (t * h * hd) as usize;
        let qp = r.f32s(Role::Act, &rng.normals(2 * n, 1.0));
        let (q, g) = (r.out(Role::Act, n), r.out(Role::Act, n));
        r.run(Op::SplitQGate {
            label: "s".into(),
            q_proj: id(qp),
            q_out: id(q),
            gate_out: id(g),
            num_heads: h,
            head_dim: hd,
            n_tokens: t,
        });
        r.check_exact(q, 4 * n + 4, "SplitQGate q");
        r.check_exact(g, 4 * n + 4, "SplitQGate gate");
    }
    for &(t, d) in &[(1u32, 5u32), (7, 33), (3, 1000)] {
        let n = (t * d) as usize;
        let a = r.f32s(Role::Residual, &rng.normals(n, 1.0));
        let b = r.f32s(Role::Act, &rng.normals(n, 0.3));
        let o = r.out(Role::Residual, n);
        r.run(Op::ResidualAddNTokens {
            label: "a".into(),
            a: id(a),
            b: id(b),
            out: id(o),
            n_tokens: t,
            dim: d,
        });
        r.check_exact(o, 4 * n + 4, "ResidualAddNTokens");
        let x = r.f32s(Role::Act, &[rng.normals(n, 1.0), vec![f32::NAN]].concat());
        let g = r.f32s(Role::Act, &rng.normals(n, 3.0));
        r.run(Op::SigmoidGateNTokens {
            label: "g".into(),
            x: id(x),
            gate: id(g),
            dim: d,
            n_tokens: t,
        });
        r.check(x, n, TOL, "SigmoidGateNTokens");
    }
    for &(kv, t, start, cap) in &[(8u32, 1u32, 0u32, 4u32), (24, 7, 2, 9), (256, 1, 100, 101)] {
        let kc = r.f32s(Role::KvCacheK, &rng.normals((cap * kv) as usize, 1.0));
        let vc = r.f32s(Role::KvCacheV, &rng.normals((cap * kv) as usize, 1.0));
        let ks = r.f32s(Role::Act, &rng.normals((t * kv) as usize, 1.0));
        let vs = r.f32s(Role::Act, &rng.normals((t * kv) as usize, 1.0));
        r.run(Op::KvCacheAppendNTokens {
            label: "kv".into(),
            k_src: id(ks),
            v_src: id(vs),
            k_cache: id(kc),
            v_cache: id(vc),
            kv_dim: kv,
            n_tokens: t,
            kv_start: start,
        });
        r.check_exact(kc, (4 * cap * kv) as usize, "KvCacheAppendNTokens k");
        r.check_exact(vc, (4 * cap * kv) as usize, "KvCacheAppendNTokens v");
    }
    for &(size, n) in &[(64usize, 64u64), (40, 13), (128, 0), (4096, 4000), (100, 1)] {
        let raw: Vec<u8> = (0..size).map(|_| 1 + rng.below(255) as u8).collect();
        let b = r.bytes(Role::MoeIndex, &raw);
        r.run(Op::ZeroBuffer {
            label: "z".into(),
            buf: id(b),
            n_bytes: n,
        });
        r.check_exact(b, size, "ZeroBuffer");
    }
    for &n in &[1u32, 7, 4099] {
        let g = r.f32s(Role::MoeScratch, &rng.normals(n as usize, 3.0));
        let u = r.f32s(Role::MoeScratch, &rng.normals(n as usize, 1.0));
        let o = r.out(Role::MoeScratch, n as usize);
        r.run(Op::SwigluFusedBatched {
            label: "sw".into(),
            gate: id(g),
            up: id(u),
            out: id(o),
            total: n,
        });
        r.check(o, n as usize, TOL, "SwigluFusedBatched");
    }
    for &(t, d) in &[(1u32, 8u32), (4, 64), (3, 33)] {
        let n = (t * d) as usize;
        let h = r.f32s(Role::Residual, &rng.normals(n, 1.0));
        let m = r.f32s(Role::MoeSum, &rng.normals(n, 0.5));
        let s = r.f32s(Role::Act, &rng.normals(n, 0.5));
        let g = r.f32s(Role::Act, &rng.normals(t as usize, 2.0));
        let o = r.out(Role::Residual, n);
        r.run(Op::MoeCombineResidualNTokens {
            label: "c".into(),
            h_mid: id(h),
            moe_sum: id(m),
            shared_out: id(s),
            shared_gate: id(g),
            hidden_out: id(o),
            n_tokens: t,
            dim: d,
        });
        r.check(o, n, TOL, "MoeCombineResidualNTokens");
    }
    r.used.clone()
}

fn case_sdpa<B: UnderTest>(sw: Switches) -> BTreeSet<String> {
    let mut rng = Rng::new(3);
    let mut r = Rig::<B>::open(Weights::default(), sw);
    for &(t, h, hpk, hd, start, cap) in &[
        (1u32, 2u32, 1u32, 8u32, 0u32, 1u32),
        (1, 4, 2, 16, 9, 16),
        (5, 4, 4, 32, 0, 5),
        (7, 6, 2, 64, 3, 12),
        (3, 2, 2, 128, 20, 30),
        (33, 2, 1, 16, 1, 40),
        (2, 8, 4, 256, 5, 8),
        (3, 3, 3, 40, 70, 80),
        (8, 4, 2, 64, 0, 8),
        (19, 4, 2, 128, 13, 40),
        (16, 8, 4, 256, 3, 20),
        (9, 2, 1, 40, 0, 9),
        (24, 6, 3, 8, 100, 130),
        (12, 4, 1, 96, 5, 17),
    ] {
        let kv = h / hpk * hd;
        let used = (start + t) as usize;
        let q = r.f32s(Role::Act, &rng.normals((t * h * hd) as usize, 1.0));
        let mut k = rng.normals((cap * kv) as usize, 1.0);
        let mut v = rng.normals((cap * kv) as usize, 1.0);
        k[used * kv as usize..].iter_mut().for_each(|x| *x = 50.0);
        v[used * kv as usize..].iter_mut().for_each(|x| *x = -50.0);
        let (kb, vb) = (r.f32s(Role::KvCacheK, &k), r.f32s(Role::KvCacheV, &v));
        let o = r.out(Role::Act, (t * h * hd) as usize);
        r.run(Op::SdpaCausalTiled {
            label: "a".into(),
            q: id(q),
            k: id(kb),
            v: id(vb),
            attn_out: id(o),
            n_tokens: t,
            num_heads: h,
            heads_per_kv: hpk,
            head_dim: hd,
            kv_dim: kv,
            kv_start: start,
            kv_len_total: cap,
            softmax_scale: 1.0 / (hd as f32).sqrt(),
        });
        r.check(
            o,
            (t * h * hd) as usize,
            TOL,
            &format!("SdpaCausalTiled t{t} h{h} hpk{hpk} hd{hd}"),
        );
    }
    r.used.clone()
}

fn case_router<B: UnderTest>(sw: Switches) -> BTreeSet<String> {
    let mut rng = Rng::new(4);
    let mut r = Rig::<B>::open(Weights::default(), sw);
    for &(t, e, k, ties) in &[
        (1u32, 8u32, 1u32, false),
        (3, 16, 4, false),
        (2, 10, 10, false),
        (4, 12, 3, true),
        (2, 6, 6, true),
        (3, 512, 10, false),
    ] {
        let logits: Vec<f32> = (0..t * e)
            .map(|_| {
                if ties {
                    rng.below(3) as f32 * 0.5 - 0.25
                } else {
                    rng.normal() * 2.0
                }
            })
            .collect();
        let l = r.f32s(Role::RouterLogits, &logits);
        let idx = r.out_u32(Role::RouterIdx, (t * k) as usize);
        let w = r.out(Role::RouterWeight, (t * k) as usize);
        r.run(Op::MoeSoftmaxTopK {
            label: "t".into(),
            logits: id(l),
            indices_out: id(idx),
            weights_out: id(w),
            n_tokens: t,
            n_experts: e,
            k,
        });
        r.check_exact(idx, (4 * t * k + 4) as usize, "MoeSoftmaxTopK indices");
        r.check(w, (t * k) as usize, TOL, "MoeSoftmaxTopK weights");
    }
    for &(t, k) in &[(1u32, 1u32), (4, 8), (3, 10)] {
        let mut w: Vec<f32> = (0..t * k).map(|_| rng.uniform(0.01, 1.0)).collect();
        if t == 3 {
            w[k as usize..2 * k as usize]
                .iter_mut()
                .for_each(|v| *v = 0.0);
            w[2 * k as usize..].iter_mut().for_each(|v| *v = -0.2);
        }
        let b = r.f32s(Role::RouterWeight, &[w, vec![f32::NAN]].concat());
        r.run(Op::MoeNormalizeWeights {
            label: "n".into(),
            weights: id(b),
            n_tokens: t,
            k,
        });
        r.check(b, (t * k) as usize, TOL, "MoeNormalizeWeights");
    }
    r.used.clone()
}

fn case_matvec<B: UnderTest>(sw: Switches) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut rng = Rng::new(5);
    let mut i = 0usize;
    let mut shapes = Vec::new();
    for bits in [4u32, 8] {
        for gs in [32u32, 64, 128] {
            for t in [1u32, 4] {
                let sdt = DTYPES[i % 3];
                shapes.push((
                    bits,
                    gs,
                    t,
                    sdt,
                    gs * (1 + i as u32 % 3),
                    [13u32, 37, 5][i % 3],
                    4 * (i as u64 % 2),
                    4 * ((i as u64 / 2) % 2),
                ));
                i += 1;
            }
        }
    }
    shapes.push((4, 64, 33, WDtype::Bf16, 256, 65, 0, 0));
    shapes.push((4, 64, 1, WDtype::Bf16, 2560, 40, 0, 0));
    shapes.push((8, 128, 2, WDtype::F16, 2304, 9, 16, 8));
    for (bits, gs, t, sdt, n_in, n_out, ioff, ooff) in shapes {
        let mut w = Weights::default();
        w.quant(&mut rng, "p", n_out as usize, n_in as usize, bits, gs, sdt);
        let mut r = Rig::<B>::open(w, sw);
        let weight = r.qref("p", bits, gs, sdt);
        let lead_in = (ioff / 4) as usize;
        let x = r.f32s(
            Role::Normed,
            &[
                rng.normals(lead_in, 100.0),
                rng.normals((t * n_in) as usize, 1.0),
            ]
            .concat(),
        );
        let lead_out = (ooff / 4) as usize;
        let y = r.out(Role::Act, lead_out + (t * n_out) as usize);
        r.run(Op::MatvecNTokens {
            label: "m".into(),
            weight,
            input: id(x),
            input_off: ioff,
            output: id(y),
            output_off: ooff,
            in_dim: n_in,
            out_dim: n_out,
            n_tokens: t,
        });
        r.check_from(
            y,
            lead_out,
            (t * n_out) as usize,
            TOL,
            &format!("MatvecNTokens b{bits} g{gs} t{t} {sdt:?} {n_in}x{n_out}"),
        );
        used.extend(r.used.clone());
    }
    let mut i = 0usize;
    for bits in [4u32, 8] {
        for gs in [32u32, 64, 128] {
            for sdt in DTYPES {
                let (vocab, hidden, t) = (
                    [37u32, 5, 64][i % 3],
                    gs * (1 + i as u32 % 2),
                    [1u32, 6][i % 2],
                );
                i += 1;
                let mut w = Weights::default();
                w.quant(
                    &mut rng,
                    "e",
                    vocab as usize,
                    hidden as usize,
                    bits,
                    gs,
                    sdt,
                );
                let mut r = Rig::<B>::open(w, sw);
                let weight = r.qref("e", bits, gs, sdt);
                let ids: Vec<u32> = (0..t)
                    .map(|j| if j == 0 { vocab - 1 } else { rng.below(vocab) })
                    .collect();
                let ib = r.u32s(Role::TokenIds, &ids);
                let o = r.out(Role::Residual, (t * hidden) as usize);
                r.run(Op::EmbedGatherNTokens {
                    label: "e".into(),
                    token_ids: id(ib),
                    weight,
                    hidden_out: id(o),
                    hidden_dim: hidden,
                    n_tokens: t,
                    vocab,
                });
                r.check(o, (t * hidden) as usize, TOL, "EmbedGatherNTokens");
                used.extend(r.used.clone());
            }
        }
    }
    used
}

/// A blob of `n_slots` random expert blocks `stride` bytes apart.
fn expert_blob(rng: &mut Rng, n_slots: usize, stride: usize, l: &ExpertLayout) -> Vec<u8> {
    let o = l.offsets();
    let (h, i) = (l.hidden_dim as usize, l.inter_dim as usize);
    let mut blob = vec![0u8; (n_slots - 1) * stride + o.block_bytes as usize];
    for s in 0..n_slots {
        for (part, rows, cols) in [(o.gate, i, h), (o.up, i, h), (o.down, h, i)] {
            let [w, sc, b] = random_quant(rng, rows, cols, l.bits, l.group_size, l.scale_dtype);
            for (off, bytes) in [(part.w_off, w), (part.s_off, sc), (part.b_off, b)] {
                let at = s * stride + off as usize;
                blob[at..at + bytes.len()].copy_from_slice(&bytes);
            }
        }
    }
    blob
}

fn case_moe_gather_id<B: UnderTest>(sw: Switches) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut rng = Rng::new(6);
    type GatherCase = (u32, u32, u32, u32, u32, u32, u32, WDtype, usize);
    let mut cases: Vec<GatherCase> = vec![
        (
            1u32,
            4u32,
            1u32,
            64u32,
            32u32,
            4u32,
            32u32,
            WDtype::Bf16,
            0usize,
        ),
        (4, 8, 8, 64, 64, 4, 64, WDtype::Bf16, 0),
        (6, 16, 4, 128, 64, 8, 64, WDtype::F16, 64),
        (3, 5, 2, 128, 128, 4, 128, WDtype::F32, 1000),
        (13, 8, 2, 64, 32, 8, 32, WDtype::Bf16, 0),
        (20, 6, 3, 64, 96, 4, 32, WDtype::F16, 0),
    ];
    // One token: the per-row matvec path, for every bit width and scale type.
    for bits in [4, 8] {
        for sdt in DTYPES {
            cases.push((1, 6, 4, 128, 64, bits, 64, sdt, 0));
        }
    }
    for &(t, e, k, h, i, bits, gs, sdt, pad) in &cases {
        let layout = ExpertLayout {
            hidden_dim: h,
            inter_dim: i,
            bits,
            group_size: gs,
            scale_dtype: sdt,
        };
        let stride = layout.offsets().block_bytes as usize + pad;
        let blob = expert_blob(&mut rng, e as usize, stride, &layout);
        let mut r = Rig::<B>::open(Weights::default(), sw);
        let eb = r.bytes(Role::ExpertBase, &blob);
        let mut idx = Vec::new();
        let mut wts = Vec::new();
        for _ in 0..t {
            let mut chosen: Vec<u32> = Vec::new();
            while chosen.len() < k as usize {
                let c = rng.below(e);
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
            let w: Vec<f32> = (0..k).map(|_| rng.uniform(0.1, 1.0)).collect();
            let s: f32 = w.iter().sum();
            idx.extend(chosen);
            wts.extend(w.iter().map(|v| v / s));
        }
        let nk = (t * k) as usize;
        let ib = r.u32s(Role::RouterIdx, &idx);
        let wb = r.f32s(Role::RouterWeight, &wts);
        let xb = r.f32s(Role::Normed, &rng.normals((t * h) as usize, 1.0));
        let sum = r.out(Role::MoeSum, (t * h) as usize);
        let htpe = r.out_u32(Role::MoeIndex, e as usize);
        let hids = r.out_u32(Role::MoeIndex, nk);
        let gm = r.out(Role::MoeScratch, nk * i as usize);
        let um = r.out(Role::MoeScratch, nk * i as usize);
        let dm = r.out(Role::MoeScratch, nk * h as usize);
        r.run(Op::MoeGatherIdFuse {
            label: "g".into(),
            expert_base: id(eb),
            expert_stride: stride as u64,
            layout,
            indices: id(ib),
            weights: id(wb),
            mlp_in: id(xb),
            out_sum: id(sum),
            htpe: id(htpe),
            hids: id(hids),
            gate_mid: id(gm),
            up_mid: id(um),
            down_mid: id(dm),
            n_tokens: t,
            n_experts: e,
            k,
        });
        let what = format!("MoeGatherIdFuse t{t} e{e} k{k} b{bits} {sdt:?}");
        r.check(sum, (t * h) as usize, TOL, &what);
        r.check_exact(htpe, 4 * e as usize + 4, &format!("{what} htpe"));
        // The stable sort by expert is unique, so hids match exactly; gate/up rows follow it.
        r.check_exact(hids, 4 * nk + 4, &format!("{what} hids"));
        r.check(gm, nk * i as usize, TOL, &format!("{what} gate_mid (act)"));
        r.check(um, nk * i as usize, TOL, &format!("{what} up_mid"));
        used.extend(r.used.clone());
    }
    used
}

fn case_moe_buckets<B: UnderTest>(sw: Switches) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut rng = Rng::new(7);
    for &(t, h, i, bits, gs, sdt, e, k, pool, unrouted) in &[
        (
            1u32,
            64u32,
            32u32,
            4u32,
            32u32,
            WDtype::Bf16,
            4u32,
            2u32,
            false,
            0u32,
        ),
        (5, 128, 64, 8, 64, WDtype::Bf16, 8, 3, true, 0),
        (3, 128, 128, 4, 128, WDtype::F32, 6, 4, true, 0),
        (4, 64, 64, 4, 64, WDtype::F16, 5, 2, false, 1),
        (9, 256, 128, 4, 64, WDtype::Bf16, 16, 4, true, 0),
        (2, 64, 32, 8, 32, WDtype::F32, 3, 1, true, 1),
        (2, 64, 32, 8, 32, WDtype::F32, 3, 1, true, 2),
        (40, 64, 64, 4, 64, WDtype::F16, 4, 2, false, 0),
    ] {
        let layout = ExpertLayout {
            hidden_dim: h,
            inter_dim: i,
            bits,
            group_size: gs,
            scale_dtype: sdt,
        };
        let block = layout.offsets().block_bytes as usize;
        let mut idx = Vec::new();
        let mut wts = Vec::new();
        for _ in 0..t {
            let mut chosen: Vec<u32> = Vec::new();
            while chosen.len() < k as usize {
                let c = rng.below(e);
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
            idx.push(chosen);
            wts.push((0..k).map(|_| rng.uniform(0.1, 1.0)).collect::<Vec<f32>>());
        }
        let routed = (t - unrouted) as usize;
        let experts: BTreeSet<u32> = idx[..routed].iter().flatten().copied().collect();
        let (n_slots, stride) = if pool {
            (experts.len() + 2, block.next_multiple_of(256) + 256)
        } else {
            (e as usize, block)
        };
        let slot_of = |ex: u32| {
            if pool {
                n_slots as u32 - 1 - experts.iter().position(|&x| x == ex).unwrap() as u32
            } else {
                ex
            }
        };
        let mut buckets = vec![0u32];
        let (mut tok, mut bw, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        for &ex in &experts {
            for tt in 0..routed {
                for j in 0..k as usize {
                    if idx[tt][j] == ex {
                        tok.push(tt as u32);
                        bw.push(wts[tt][j]);
                    }
                }
            }
            buckets.push(tok.len() as u32);
            slots.push(slot_of(ex));
        }
        let total = tok.len();
        let blob = expert_blob(&mut rng, n_slots, stride, &layout);
        let mut r = Rig::<B>::open(Weights::default(), sw);
        let eb = r.bytes(Role::ExpertBase, &blob);
        let sb = r.u32s(Role::MoeIndex, &slots);
        let xb = r.f32s(Role::Normed, &rng.normals((t * h) as usize, 1.0));
        let tb = r.u32s(Role::MoeIndex, &tok);
        let wb = r.f32s(Role::RouterWeight, &bw);
        let gb = r.out(Role::MoeScratch, total * i as usize);
        let ub = r.out(Role::MoeScratch, total * i as usize);
        let ab = r.out(Role::MoeScratch, total * i as usize);
        let ob = r.out(Role::MoeScratch, total * h as usize);
        let sum = r.out(Role::MoeSum, (t * h) as usize);
        r.run(Op::MoeBatchedPermuteFuse {
            label: "b".into(),
            expert_base: id(eb),
            expert_stride: stride as u64,
            layout,
            expert_indices: id(sb),
            expert_slots: slots.clone(),
            bucket_input: id(xb),
            bucket_gate: id(gb),
            bucket_up: id(ub),
            bucket_act: id(ab),
            bucket_out: id(ob),
            bucket_token_idx: id(tb),
            bucket_weights: id(wb),
            out_sum: id(sum),
            n_tokens: t,
            buckets,
        });
        let what = format!("MoeBatchedPermuteFuse t{t} b{bits} {sdt:?} pool{pool}");
        r.check(sum, (t * h) as usize, TOL, &what);
        r.check(gb, total * i as usize, TOL, &format!("{what} gate"));
        r.check(ub, total * i as usize, TOL, &format!("{what} up"));
        r.check(ab, total * i as usize, TOL, &format!("{what} act"));
        r.check(ob, total * h as usize, TOL, &format!("{what} out"));
        used.extend(r.used.clone());
    }
    used
}

fn case_linear_attn<B: UnderTest>(sw: Switches) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut rng = Rng::new(8);
    for (n, &(c, t)) in [(8u32, 1u32), (33, 5), (64, 2), (24, 7)].iter().enumerate() {
        let dt = DTYPES[n % 3];
        let mut w = Weights::default();
        w.floats("conv", &rng.normals((c * 4) as usize, 0.5), dt);
        w.floats(
            "a_log",
            &(0..c)
                .map(|_| rng.uniform(1.0, 16.0).ln())
                .collect::<Vec<_>>(),
            dt,
        );
        w.floats("dt", &rng.normals(c as usize, 0.5), dt);
        let mut r = Rig::<B>::open(w, sw);
        let x = r.f32s(Role::Act, &rng.normals((t * c) as usize, 1.0));
        let st = r.f32s(
            Role::ConvState,
            &[rng.normals(3 * c as usize, 1.0), vec![f32::NAN]].concat(),
        );
        let o = r.out(Role::Act, (t * c) as usize);
        let weight_off = r.off("conv");
        r.run(Op::Conv1dStepNTokens {
            label: "c".into(),
            qkv_in: id(x),
            conv_state: id(st),
            weight_off,
            conv_out: id(o),
            conv_dim: c,
            n_tokens: t,
            weight_dtype: dt,
        });
        r.check(o, (t * c) as usize, TOL, "Conv1dStepNTokens out");
        r.check_exact(st, (4 * 3 * c + 4) as usize, "Conv1dStepNTokens state");
        // Decay/beta over c value heads.
        let mut av = rng.normals((t * c) as usize, 1.0);
        av[0] = 30.0; // softplus is the identity above 20
        av[1] = -30.0;
        let alpha = r.f32s(Role::Act, &av);
        let beta = r.f32s(Role::Act, &rng.normals((t * c) as usize, 2.0));
        let g = r.out(Role::Act, (t * c) as usize);
        let b = r.out(Role::Act, (t * c) as usize);
        let (a_log_off, dt_bias_off) = (r.off("a_log"), r.off("dt"));
        r.run(Op::ComputeDecayBetaNTokens {
            label: "d".into(),
            alpha_in: id(alpha),
            beta_in: id(beta),
            a_log_off,
            dt_bias_off,
            g_decay_out: id(g),
            beta_gate_out: id(b),
            num_v_heads: c,
            n_tokens: t,
            weight_dtype: dt,
        });
        r.check(g, (t * c) as usize, TOL, "ComputeDecayBetaNTokens g");
        r.check(b, (t * c) as usize, TOL, "ComputeDecayBetaNTokens beta");
        used.extend(r.used.clone());
    }
    // The delta rule, token by token and chunked.
    let shapes: &[(u32, u32, u32, u32, u32, u32, f32)] = &[
        (1, 8, 1, 8, 1, 0, 0.3),
        (2, 16, 2, 16, 3, 0, 0.3),
        (4, 32, 2, 16, 5, 0, 0.3),
        (4, 8, 4, 24, 9, 0, 0.3),
        (2, 128, 1, 128, 4, 0, 0.3),
        (2, 16, 1, 16, 40, 0, 0.01),
        (2, 12, 1, 5, 6, 0, 0.3),
        (2, 16, 1, 16, 1, 1, 0.3),
        (2, 16, 2, 16, 7, 4, 0.3),
        (4, 8, 2, 24, 9, 1, 0.3),
        (2, 32, 1, 32, 21, 16, 0.3),
        (2, 16, 2, 16, 70, 64, 0.3),
        (1, 8, 1, 8, 5, 64, 0.3),
        (4, 32, 4, 16, 33, 16, 0.3),
        (2, 16, 1, 16, 67, 64, 0.01),
        (2, 128, 2, 128, 18, 4, 0.3),
        (2, 12, 1, 5, 10, 4, 0.3),
    ];
    for &(v, dv, kpv, dk, t, chunk, g_lo) in shapes {
        let nk = v / kpv;
        let mut conv = Vec::new();
        for _ in 0..t {
            let mut q = rng.normals((nk * dk) as usize, 1.0);
            let mut k = rng.normals((nk * dk) as usize, 1.0);
            for hd in 0..nk as usize {
                let r = hd * dk as usize..(hd + 1) * dk as usize;
                let nq =
                    q[r.clone()].iter().map(|x| x * x).sum::<f32>().sqrt() * (dk as f32).sqrt();
                let nkk = k[r.clone()].iter().map(|x| x * x).sum::<f32>().sqrt();
                q[r.clone()].iter_mut().for_each(|x| *x /= nq);
                k[r].iter_mut().for_each(|x| *x /= nkk);
            }
            conv.extend(q);
            conv.extend(k);
            conv.extend(rng.normals((v * dv) as usize, 1.0));
        }
        let mut r = Rig::<B>::open(Weights::default(), sw);
        let st = r.f32s(
            Role::DeltaState,
            &[rng.normals((v * dk * dv) as usize, 0.5), vec![f32::NAN]].concat(),
        );
        let cb = r.f32s(Role::Act, &conv);
        let gb = r.f32s(
            Role::Act,
            &(0..t * v)
                .map(|_| rng.uniform(g_lo, 1.0))
                .collect::<Vec<_>>(),
        );
        let bb = r.f32s(
            Role::Act,
            &(0..t * v)
                .map(|_| rng.uniform(0.05, 1.0))
                .collect::<Vec<_>>(),
        );
        let o = r.out(Role::Act, (t * v * dv) as usize);
        let op = if chunk == 0 {
            Op::GatedDeltaNetStepNTokens {
                label: "s".into(),
                state: id(st),
                conv_out: id(cb),
                g_decay: id(gb),
                beta_gate: id(bb),
                output: id(o),
                num_v_heads: v,
                value_dim: dv,
                k_heads_per_v: kpv,
                key_dim: dk,
                n_tokens: t,
            }
        } else {
            Op::GatedDeltaNetChunkwise {
                label: "c".into(),
                state: id(st),
                conv_out: id(cb),
                g_decay: id(gb),
                beta_gate: id(bb),
                output: id(o),
                num_v_heads: v,
                value_dim: dv,
                k_heads_per_v: kpv,
                key_dim: dk,
                n_tokens: t,
                chunk_size: chunk,
            }
        };
        let what = format!(
            "{} v{v} dv{dv} kpv{kpv} dk{dk} t{t} chunk{chunk}",
            op.name()
        );
        r.run(op);
        r.check(o, (t * v * dv) as usize, 5e-5, &format!("{what} output"));
        r.check(st, (v * dk * dv) as usize, 5e-5, &format!("{what} state"));
        used.extend(r.used.clone());
    }
    used
}

type Case = fn(Switches) -> BTreeSet<String>;

/// Run `case` under every switch alternative; skipped (with a note) where `B` cannot run.
fn run_all<B: UnderTest>(case: Case) -> BTreeSet<String> {
    if B::make(None, Switches::default()).is_none() {
        eprintln!("skipped: no Metal device on this machine");
        return BTreeSet::new();
    }
    alternatives().into_iter().flat_map(case).collect()
}

/// The op matrix as one test per case family, for backend `$b`.
macro_rules! op_matrix {
    ($b:ty) => {
        #[test]
        fn norms_match_cpu() {
            run_all::<$b>(case_norms::<$b>);
        }
        #[test]
        fn attention_pieces_match_cpu() {
            run_all::<$b>(case_attention_pieces::<$b>);
        }
        #[test]
        fn sdpa_matches_cpu() {
            run_all::<$b>(case_sdpa::<$b>);
        }
        #[test]
        fn router_matches_cpu() {
            run_all::<$b>(case_router::<$b>);
        }
        #[test]
        fn matvec_and_embed_match_cpu() {
            run_all::<$b>(case_matvec::<$b>);
        }
        #[test]
        fn moe_gather_id_matches_cpu() {
            run_all::<$b>(case_moe_gather_id::<$b>);
        }
        #[test]
        fn moe_buckets_match_cpu() {
            run_all::<$b>(case_moe_buckets::<$b>);
        }
        #[test]
        fn linear_attention_matches_cpu() {
            run_all::<$b>(case_linear_attn::<$b>);
        }
    };
}

/// On the real GPU (macOS; elsewhere `--features metal` only type-checks it): the same cases
/// against the CPU.
#[cfg(any(target_os = "macos", feature = "metal"))]
mod device {
    use super::*;
    op_matrix!(crate::backend::metal::MetalBackend);
}

/// On the emulator, plus the checks only its dispatch records allow.
#[cfg(feature = "metal-emu")]
mod emu {
    use super::*;
    use crate::backend::metal::kernels::KERNELS;
    use crate::backend::metal::MetalEmuBackend;
    type Emu = MetalEmuBackend;

    op_matrix!(MetalEmuBackend);

    fn cases<B: UnderTest>() -> [(&'static str, Case); 8] {
        [
            ("norms", case_norms::<B>),
            ("attention pieces", case_attention_pieces::<B>),
            ("sdpa", case_sdpa::<B>),
            ("router", case_router::<B>),
            ("matvec", case_matvec::<B>),
            ("moe gather-id", case_moe_gather_id::<B>),
            ("moe buckets", case_moe_buckets::<B>),
            ("linear attention", case_linear_attn::<B>),
        ]
    }

    /// Every kernel of `shaders/metal/` runs in the cases above (under some switch setting), and
    /// every op has an encode arm that dispatches something.
    #[test]
    fn every_kernel_is_exercised() {
        let mut used = BTreeSet::new();
        for (_, case) in cases::<Emu>() {
            used.extend(run_all::<Emu>(case));
        }
        let mut all: BTreeSet<String> = KERNELS.iter().map(|s| s.to_string()).collect();
        all.extend(Op::schema().iter().map(|o| format!("op:{}", o.name)));
        let missing: Vec<_> = all.difference(&used).collect();
        assert!(
            missing.is_empty(),
            "kernels or ops no case runs: {missing:?}"
        );
        let unknown: Vec<_> = used.difference(&all).collect();
        assert!(
            unknown.is_empty(),
            "dispatched kernels missing from KERNELS: {unknown:?}"
        );
        // Every kernel compiled from shaders/metal/ is in the table, so none escapes the check above.
        let compiled: Vec<&str> = crate::backend::metal_emu::EmuLibrary::get()
            .kernels()
            .iter()
            .filter(|k| k.file.starts_with("shaders/metal/"))
            .map(|k| k.name.as_str())
            .collect();
        assert!(
            compiled.len() >= KERNELS.len(),
            "{} compiled, {} in KERNELS",
            compiled.len(),
            KERNELS.len()
        );
        let untabled: Vec<_> = compiled.iter().filter(|k| !KERNELS.contains(k)).collect();
        assert!(
            untabled.is_empty(),
            "kernels in shaders/metal/ missing from KERNELS: {untabled:?}"
        );
    }

    /// The kernels each switch setting dispatches, for one op.
    fn kernels_for(op: &Op, sw: Switches, setup: impl FnOnce(&mut Rig<Emu>)) -> Vec<String> {
        let mut r = Rig::<Emu>::open(Weights::default(), sw);
        setup(&mut r);
        let mut ctx = r.dev.begin_encoding();
        r.dev.encode_op(op, &mut ctx).unwrap();
        ctx.dispatches().iter().map(|d| d.kernel.clone()).collect()
    }

    #[test]
    fn switches_select_the_documented_kernels() {
        let d = Switches::default();
        let delta = |chunk_size: u32, key_dim: u32| Op::GatedDeltaNetChunkwise {
            label: "c".into(),
            state: id(0),
            conv_out: id(1),
            g_decay: id(2),
            beta_gate: id(3),
            output: id(4),
            num_v_heads: 2,
            value_dim: 8,
            k_heads_per_v: 1,
            key_dim,
            n_tokens: 5,
            chunk_size,
        };
        let setup = |key_dim: u32| {
            move |r: &mut Rig<Emu>| {
                r.out(Role::DeltaState, (2 * key_dim * 8) as usize);
                r.out(Role::Act, (5 * (4 * key_dim + 16)) as usize);
                r.out(Role::Act, 10);
                r.out(Role::Act, 10);
                r.out(Role::Act, 80);
            }
        };
        let vb_off = Switches {
            delta_net_vb: false,
            ..d
        };
        assert_eq!(
            kernels_for(&delta(16, 16), d, setup(16)),
            ["linear_attn_delta_seq"]
        );
        assert_eq!(
            kernels_for(&delta(16, 16), vb_off, setup(16)),
            ["linear_attn_delta_chunk"]
        );
        // A key dim the chunked tiles cannot take falls back to the sequential kernel.
        assert_eq!(
            kernels_for(&delta(16, 12), vb_off, setup(12)),
            ["linear_attn_delta_seq"]
        );

        let sdpa = |n_tokens: u32, heads_per_kv: u32| Op::SdpaCausalTiled {
            label: "a".into(),
            q: id(0),
            k: id(1),
            v: id(2),
            attn_out: id(3),
            n_tokens,
            num_heads: 4,
            heads_per_kv,
            head_dim: 64,
            kv_dim: 4 / heads_per_kv * 64,
            kv_start: 0,
            kv_len_total: n_tokens,
            softmax_scale: 0.125,
        };
        let sdpa_setup = |t: u32, hpk: u32| {
            move |r: &mut Rig<Emu>| {
                r.out(Role::Act, (t * 256) as usize);
                r.out(Role::KvCacheK, (t * 256 / hpk) as usize);
                r.out(Role::KvCacheV, (t * 256 / hpk) as usize);
                r.out(Role::Act, (t * 256) as usize);
            }
        };
        let gqa_off = Switches {
            sdpa_gqa: false,
            ..d
        };
        assert_eq!(
            kernels_for(&sdpa(1, 2), d, sdpa_setup(1, 2)),
            ["attn_sdpa_f2"]
        );
        assert_eq!(
            kernels_for(&sdpa(1, 2), gqa_off, sdpa_setup(1, 2)),
            ["attn_sdpa_f1"]
        );
        assert_eq!(
            kernels_for(&sdpa(1, 1), d, sdpa_setup(1, 1)),
            ["attn_sdpa_f1"]
        );
        assert_eq!(
            kernels_for(&sdpa(9, 2), d, sdpa_setup(9, 2)),
            ["attn_sdpa_tile_f2_d64"]
        );
        assert_eq!(
            kernels_for(&sdpa(9, 2), gqa_off, sdpa_setup(9, 2)),
            ["attn_sdpa_tile_f1_d64"]
        );
    }

    #[test]
    fn matvec_switch_and_bucket_paths_dispatch_as_documented() {
        let mut rng = Rng::new(9);
        let mut w = Weights::default();
        w.quant(&mut rng, "p", 20, 64, 4, 64, WDtype::Bf16);
        let mut r = Rig::<Emu>::open(w, Switches::default());
        let weight = r.qref("p", 4, 64, WDtype::Bf16);
        let x = r.f32s(Role::Act, &rng.normals(64 * 3, 1.0));
        let y = r.out(Role::Act, 20 * 3);
        let op = |t: u32| Op::MatvecNTokens {
            label: "m".into(),
            weight,
            input: id(x),
            input_off: 0,
            output: id(y),
            output_off: 0,
            in_dim: 64,
            out_dim: 20,
            n_tokens: t,
        };
        for (t, m1, kernel, groups) in [
            (1, true, "matvec_qmv_b4_bf16", [2, 1, 1]),
            (1, false, "matvec_qmm_b4_bf16", [1, 1, 1]),
            (3, true, "matvec_qmm_b4_bf16", [1, 1, 1]),
        ] {
            r.dev.set_switches(Switches {
                matvec_m1: m1,
                ..Switches::default()
            });
            let mut ctx = r.dev.begin_encoding();
            r.dev.encode_op(&op(t), &mut ctx).unwrap();
            let d = &ctx.dispatches()[0];
            assert_eq!(
                (d.kernel.as_str(), d.groups),
                (kernel, groups),
                "t{t} m1 {m1}"
            );
        }

        // MoeBatchedPermuteFuse: two buckets (rows 0..2 and 2..3).
        let layout = ExpertLayout {
            hidden_dim: 64,
            inter_dim: 32,
            bits: 4,
            group_size: 32,
            scale_dtype: WDtype::Bf16,
        };
        let blob = expert_blob(&mut rng, 2, layout.offsets().block_bytes as usize, &layout);
        let mut r = Rig::<Emu>::open(Weights::default(), Switches::default());
        let eb = r.bytes(Role::ExpertBase, &blob);
        let sb = r.u32s(Role::MoeIndex, &[1, 0]);
        let xb = r.f32s(Role::Normed, &rng.normals(2 * 64, 1.0));
        let tb = r.u32s(Role::MoeIndex, &[0, 1, 1]);
        let wb = r.f32s(Role::RouterWeight, &[0.5, 0.25, 0.75]);
        let scratch: Vec<u32> = [32, 32, 32, 64]
            .iter()
            .map(|&w| r.out(Role::MoeScratch, 3 * w))
            .collect();
        let sum = r.out(Role::MoeSum, 2 * 64);
        let op = Op::MoeBatchedPermuteFuse {
            label: "b".into(),
            expert_base: id(eb),
            expert_stride: layout.offsets().block_bytes,
            layout,
            expert_indices: id(sb),
            expert_slots: vec![1, 0],
            bucket_input: id(xb),
            bucket_gate: id(scratch[0]),
            bucket_up: id(scratch[1]),
            bucket_act: id(scratch[2]),
            bucket_out: id(scratch[3]),
            bucket_token_idx: id(tb),
            bucket_weights: id(wb),
            out_sum: id(sum),
            n_tokens: 2,
            buckets: vec![0, 2, 3],
        };
        for (moe_gather, want) in [
            (
                true,
                vec![
                    "moe_ggemm_gu_b4_bf16",
                    "moe_ggemm_down_b4_bf16",
                    "moe_bucket_accumulate",
                ],
            ),
            (
                false,
                vec![
                    "moe_gather_rows",
                    "matvec_qmm_b4_bf16",
                    "matvec_qmm_b4_bf16",
                    "matvec_qmv_b4_bf16",
                    "matvec_qmv_b4_bf16",
                    "moe_swiglu",
                    "matvec_qmm_b4_bf16",
                    "matvec_qmv_b4_bf16",
                    "moe_bucket_accumulate",
                ],
            ),
        ] {
            r.dev.set_switches(Switches {
                moe_gather,
                ..Switches::default()
            });
            let mut ctx = r.dev.begin_encoding();
            r.dev.encode_op(&op, &mut ctx).unwrap();
            let got: Vec<&str> = ctx.dispatches().iter().map(|d| d.kernel.as_str()).collect();
            assert_eq!(got, want, "moe_gather {moe_gather}");
        }
    }
}
