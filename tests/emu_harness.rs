//! Tests of the MSL-on-CPU emulator with its own kernels (`emu/tests/kernels/emu_tests.metal`):
//! results against scalar/f64 references, and every diagnostic it promises.
#![cfg(feature = "metal-emu")]

use half::{bf16, f16};
use moeflux::backend::encoder::ComputeEncoder;
use moeflux::backend::metal_emu::{EmuBuffer, EmuEncoder, EmuError, EmuLibrary, Sched};

const SRC: &str = include_str!("../emu/tests/kernels/emu_tests.metal");
const FILE: &str = "emu/tests/kernels/emu_tests.metal";

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1), never exactly zero.
    fn f32(&mut self) -> f32 {
        let v = (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        if v == 0.0 {
            0.5
        } else {
            v
        }
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// The line of the `nth` occurrence of `needle` after the definition of `kernel`.
fn line_of(kernel: &str, needle: &str, nth: usize) -> u32 {
    let lines: Vec<&str> = SRC.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.contains(&format!("void {kernel}(")))
        .unwrap_or_else(|| panic!("no kernel {kernel}"));
    let hit = lines[start..]
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .nth(nth)
        .expect("needle");
    (start + hit.0 + 1) as u32
}

fn expect_err(r: Result<(), EmuError>, kernel: &str, fragment: &str) -> EmuError {
    let e = r.expect_err("the dispatch should fail");
    assert_eq!(e.kernel, kernel);
    assert!(
        e.message.contains(fragment),
        "message `{}` lacks `{fragment}`",
        e.message
    );
    e
}

fn close(a: f32, b: f64, rel: f64) -> bool {
    ((a as f64) - b).abs() <= rel * b.abs().max(1.0)
}

#[test]
fn add_and_recorded_geometry() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let n = 1000u32;
    let (mut a, mut b) = (rng.vec(n as usize), rng.vec(n as usize));
    let mut c = vec![0f32; n as usize];
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_test_add").unwrap();
    let (ba, bb, bc) = (
        EmuBuffer::new(&mut a),
        EmuBuffer::new(&mut b),
        EmuBuffer::new(&mut c),
    );
    enc.set_buffer(0, &ba, 0);
    enc.set_buffer(1, &bb, 0);
    enc.set_buffer(2, &bc, 0);
    enc.set_value(3, &n);
    enc.dispatch_threads([n, 1, 1], [64, 1, 1]).unwrap();
    let rec = &enc.dispatches()[0];
    assert_eq!(rec.kernel, "emu_test_add");
    assert_eq!(rec.groups, [16, 1, 1]);
    assert_eq!(rec.threads, [1000, 1, 1]);
    assert_eq!(rec.bindings.len(), 4);
    assert_eq!(enc.last_stats().threads, 1000);
    drop(enc);
    for i in 0..n as usize {
        assert!(close(c[i], a[i] as f64 + b[i] as f64, 1e-6), "{i}");
    }
}

#[test]
fn builtins_in_a_2d_grid_with_partial_groups() {
    let (w, h, tg) = (37u32, 5u32, [8u32, 4, 1]);
    let mut out = vec![0u32; (w * h * 12) as usize];
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_test_ids").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut out), 0);
    enc.dispatch_threads([w, h, 1], tg).unwrap();
    drop(enc);
    for y in 0..h {
        for x in 0..w {
            let o = &out[((y * w + x) * 12) as usize..][..12];
            let (gx, gy) = (x / tg[0], y / tg[1]);
            let (sx, sy) = (tg[0].min(w - gx * tg[0]), tg[1].min(h - gy * tg[1]));
            let (lx, ly) = (x % tg[0], y % tg[1]);
            let tid = ly * sx + lx;
            assert_eq!(
                o,
                [x, y, gx, gy, lx, ly, sx, sy, tid, tid % 32, tid / 32, 1],
                "thread ({x},{y})"
            );
        }
    }
}

fn group_sum(with_barrier: u32, sched: Sched) -> (Vec<f32>, Vec<f64>) {
    let mut rng = Rng(7);
    let (groups, tg) = (3u32, 128u32);
    let mut x = rng.vec((groups * tg) as usize);
    let want: Vec<f64> = x
        .chunks(tg as usize)
        .map(|c| c.iter().map(|&v| v as f64).sum())
        .collect();
    let mut out = vec![0f32; groups as usize];
    let mut enc = EmuEncoder::new();
    enc.set_sched(sched);
    enc.set_pipeline("emu_test_group_sum").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut x), 0);
    enc.set_buffer(1, &EmuBuffer::new(&mut out), 0);
    enc.set_value(2, &with_barrier);
    enc.dispatch_threadgroups([groups, 1, 1], [tg, 1, 1])
        .unwrap();
    drop(enc);
    (out, want)
}

#[test]
fn reverse_schedule_exposes_a_missing_barrier() {
    for sched in [Sched::Forward, Sched::Reverse] {
        let (got, want) = group_sum(1, sched);
        assert!(
            got.iter().zip(&want).all(|(g, w)| close(*g, *w, 1e-5)),
            "{sched:?}: {got:?} vs {want:?}"
        );
    }
    // Without the barrier the forward order happens to work; the reverse order reads poison.
    let (got, want) = group_sum(0, Sched::Forward);
    assert!(got.iter().zip(&want).all(|(g, w)| close(*g, *w, 1e-5)));
    let (got, _) = group_sum(0, Sched::Reverse);
    assert!(got.iter().all(|g| g.is_nan()), "{got:?}");
}

#[test]
fn tree_reduction_over_many_groups() {
    let mut rng = Rng(11);
    let (groups, tg) = (64u32, 256u32);
    let mut x = rng.vec((groups * tg) as usize);
    for sched in [Sched::Forward, Sched::Reverse] {
        let mut out = vec![0f32; groups as usize];
        let mut enc = EmuEncoder::new();
        enc.set_sched(sched);
        enc.set_pipeline("emu_test_tree_sum").unwrap();
        enc.set_buffer(0, &EmuBuffer::new(&mut x), 0);
        enc.set_buffer(1, &EmuBuffer::new(&mut out), 0);
        enc.dispatch_threadgroups([groups, 1, 1], [tg, 1, 1])
            .unwrap();
        assert_eq!(enc.last_stats().barriers, (groups * 9) as u64);
        drop(enc);
        for (g, c) in x.chunks(tg as usize).enumerate() {
            let want: f64 = c.iter().map(|&v| v as f64).sum();
            assert!(close(out[g], want, 1e-5), "group {g}: {} vs {want}", out[g]);
        }
    }
}

#[test]
fn simd_collectives_match_scalar_loops() {
    let mut rng = Rng(0xabcdef);
    // 40 threads per group: the second simdgroup is partial (8 lanes).
    let (groups, tg) = (2u32, 40u32);
    let n = (groups * tg) as usize;
    let mut x = rng.vec(n);
    for live in [32u32, 20, 7, 1] {
        let mut out = vec![-7f32; n * 10];
        let mut enc = EmuEncoder::new();
        enc.set_pipeline("emu_test_simd").unwrap();
        enc.set_buffer(0, &EmuBuffer::new(&mut x), 0);
        enc.set_buffer(1, &EmuBuffer::new(&mut out), 0);
        enc.set_value(2, &live);
        enc.dispatch_threadgroups([groups, 1, 1], [tg, 1, 1])
            .unwrap();
        drop(enc);
        for g in 0..groups as usize {
            for simd_base in [0usize, 32] {
                let size = (tg as usize - simd_base).min(32);
                let active: Vec<usize> = (0..size).filter(|&l| (l as u32) < live).collect();
                let val = |l: usize| x[g * tg as usize + simd_base + l];
                let sum: f64 = active.iter().map(|&l| val(l) as f64).sum();
                for l in 0..size {
                    let o = &out[(g * tg as usize + simd_base + l) * 10..][..10];
                    if !active.contains(&l) {
                        assert!(o.iter().all(|&v| v == -7.0), "inactive lane wrote");
                        continue;
                    }
                    let prefix: f64 = active
                        .iter()
                        .filter(|&&k| k < l)
                        .map(|&k| val(k) as f64)
                        .sum();
                    let mx = active.iter().map(|&k| val(k)).fold(f32::MIN, f32::max);
                    let mn = active.iter().map(|&k| val(k)).fold(f32::MAX, f32::min);
                    let from = |src: usize| {
                        if active.contains(&src) {
                            Some(val(src))
                        } else {
                            None
                        }
                    };
                    let down = if l + 3 < 32 { l + 3 } else { l };
                    let ballot: u32 = active
                        .iter()
                        .filter(|&&k| val(k) > 0.0)
                        .map(|&k| 1u32 << k)
                        .sum();
                    let quad: f64 = active
                        .iter()
                        .filter(|&&k| k / 4 == l / 4)
                        .map(|&k| val(k) as f64)
                        .sum();
                    let ctx = format!("live {live} group {g} lane {}", simd_base + l);
                    assert!(close(o[0], sum, 1e-5), "sum {ctx}");
                    assert!(close(o[1], prefix + val(l) as f64, 1e-5), "incl {ctx}");
                    assert!(close(o[2], prefix, 1e-5), "excl {ctx}");
                    assert_eq!((o[3], o[4]), (mx, mn), "max/min {ctx}");
                    for (got, want) in [(o[5], from(l ^ 1)), (o[6], from(down))] {
                        match want {
                            Some(w) => assert_eq!(got, w, "shuffle {ctx}"),
                            None => assert!(
                                got.is_nan(),
                                "shuffle from an inactive lane is poison {ctx}"
                            ),
                        }
                    }
                    assert_eq!(o[7], val(0), "broadcast {ctx}");
                    assert_eq!(o[8], ballot as f32, "ballot {ctx}");
                    assert!(close(o[9], quad, 1e-5), "quad {ctx}");
                }
            }
        }
    }
}

#[test]
fn integer_and_vector_collectives() {
    let mut rng = Rng(5);
    let mut x: Vec<i32> = (0..64).map(|_| (rng.next() % 2001) as i32 - 1000).collect();
    let mut out = vec![0i32; 64 * 4];
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_test_simd_int").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut x), 0);
    enc.set_buffer(1, &EmuBuffer::new(&mut out), 0);
    enc.dispatch_threads([64, 1, 1], [64, 1, 1]).unwrap();
    drop(enc);
    for i in 0..64 {
        let base = i / 32 * 32;
        let sum: i32 = x[base..base + 32].iter().sum();
        let excl: i32 = x[base..i].iter().sum();
        let up = if i % 32 >= 2 { x[i - 2] } else { x[i] };
        assert_eq!(
            &out[i * 4..i * 4 + 4],
            [sum, -2 * sum, excl, up],
            "thread {i}"
        );
    }
}

fn run_diag(kernel: &str, tg: u32, bind_len: usize) -> Result<(), EmuError> {
    let mut out = vec![0f32; bind_len];
    let mut enc = EmuEncoder::new();
    enc.set_pipeline(kernel).unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut out), 0);
    enc.try_dispatch_threadgroups([2, 1, 1], [tg, 1, 1])
}

#[test]
fn divergent_barriers_are_errors_with_lines() {
    let e = expect_err(
        run_diag("emu_test_divergent_barrier", 32, 64),
        "emu_test_divergent_barrier",
        "divergent threadgroup barriers",
    );
    assert_eq!(e.file, FILE);
    let lines = [
        line_of("emu_test_divergent_barrier", "threadgroup_barrier", 0),
        line_of("emu_test_divergent_barrier", "threadgroup_barrier", 1),
    ];
    assert!(lines.contains(&e.line), "line {} not in {lines:?}", e.line);
    assert!(
        e.message.contains(&format!("{FILE}:{}", lines[0]))
            && e.message.contains(&format!("{FILE}:{}", lines[1])),
        "{}",
        e.message
    );

    let e = expect_err(
        run_diag("emu_test_barrier_after_return", 32, 64),
        "emu_test_barrier_after_return",
        "already returned",
    );
    assert_eq!(
        e.line,
        line_of("emu_test_barrier_after_return", "threadgroup_barrier", 0)
    );

    let e = expect_err(
        run_diag("emu_test_divergent_simd", 32, 64),
        "emu_test_divergent_simd",
        "divergent simdgroup collectives",
    );
    assert!(
        e.line == line_of("emu_test_divergent_simd", "simd_sum", 0)
            || e.line == line_of("emu_test_divergent_simd", "simd_max", 0)
    );
}

#[test]
fn threadgroup_memory_is_poisoned_per_group() {
    let mut out = vec![0f32; 64];
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_test_poison").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut out), 0);
    // Two groups on one OS thread: the second must not see the first's writes either.
    enc.set_workers(1);
    enc.dispatch_threadgroups([2, 1, 1], [64, 1, 1]).unwrap();
    drop(enc);
    for (i, v) in out.iter().enumerate() {
        if i < 32 {
            assert_eq!(*v, i as f32);
        } else {
            assert!(
                v.is_nan(),
                "out[{i}] = {v}: unwritten threadgroup memory must read as NaN"
            );
        }
    }
}

#[test]
fn threadgroup_memory_limit() {
    let e = expect_err(
        run_diag("emu_test_tg_too_big", 64, 64),
        "emu_test_tg_too_big",
        "32 KB",
    );
    assert_eq!(
        (e.file.as_str(), e.line),
        (
            FILE,
            line_of("emu_test_tg_too_big", "threadgroup float b", 0)
        )
    );

    // Dynamic threadgroup memory: works when set, an error when missing or too large.
    let mut x: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let mut out = vec![0f32; 64];
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_test_dyn_tg").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut x), 0);
    enc.set_buffer(1, &EmuBuffer::new(&mut out), 0);
    expect_err(
        enc.try_dispatch_threadgroups([1, 1, 1], [64, 1, 1]),
        "emu_test_dyn_tg",
        "no length set",
    );
    enc.set_threadgroup_memory_length(0, 64 * 4);
    enc.try_dispatch_threadgroups([1, 1, 1], [64, 1, 1])
        .unwrap();
    enc.set_threadgroup_memory_length(1, 20000);
    enc.set_threadgroup_memory_length(2, 20000);
    expect_err(
        enc.try_dispatch_threadgroups([1, 1, 1], [64, 1, 1]),
        "emu_test_dyn_tg",
        "exceeds the 32 KB limit",
    );
    enc.set_threadgroup_memory_length(0, 40000);
    expect_err(
        enc.try_dispatch_threadgroups([1, 1, 1], [64, 1, 1]),
        "emu_test_dyn_tg",
        "32768",
    );
    drop(enc);
    for (i, v) in out.iter().enumerate() {
        assert_eq!(*v, (63 - i) as f32 * 2.0);
    }
}

#[test]
fn unbound_buffer_and_faults_are_reported_and_recoverable() {
    let mut x = vec![1f32; 32];
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_test_unbound").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut x), 0);
    expect_err(
        enc.try_dispatch_threads([32, 1, 1], [32, 1, 1]),
        "emu_test_unbound",
        "[[buffer(1)]], which is not bound",
    );
    drop(enc);

    let mut d: Vec<i32> = (0..32).map(|i| if i == 17 { 0 } else { i + 1 }).collect();
    let mut y = vec![0i32; 32];
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_test_div_zero").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut d), 0);
    enc.set_buffer(1, &EmuBuffer::new(&mut y), 0);
    expect_err(
        enc.try_dispatch_threads([32, 1, 1], [32, 1, 1]),
        "emu_test_div_zero",
        "division by zero",
    );
    drop(enc);

    // The same OS thread runs kernels normally afterwards.
    let (got, want) = group_sum(1, Sched::Forward);
    assert!(got.iter().zip(&want).all(|(g, w)| close(*g, *w, 1e-5)));
}

#[test]
fn set_bytes_smaller_than_the_constant_struct() {
    let mut x: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let mut y = vec![0f32; 16];
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_test_params").unwrap();
    enc.set_buffer(1, &EmuBuffer::new(&mut x), 0);
    enc.set_buffer(2, &EmuBuffer::new(&mut y), 0);
    enc.set_bytes(0, &[16, 0, 0, 0, 0, 0, 0, 64]);
    let e = expect_err(
        enc.try_dispatch_threads([16, 1, 1], [16, 1, 1]),
        "emu_test_params",
        "EmuTestParams",
    );
    assert!(
        e.message.contains("16 bytes") && e.message.contains("only 8 bytes"),
        "{}",
        e.message
    );
    assert_eq!(
        e.line,
        line_of("emu_test_params", "constant EmuTestParams", 0)
    );
    let params: [u32; 4] = [16, 3.0f32.to_bits(), 0.5f32.to_bits(), 0];
    enc.set_value(0, &params);
    enc.dispatch_threads([16, 1, 1], [16, 1, 1]).unwrap();
    drop(enc);
    assert!(y
        .iter()
        .enumerate()
        .all(|(i, v)| *v == i as f32 * 3.0 + 0.5));
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn half_and_bfloat_every_bit_pattern() {
    let n = 65536usize;
    let mut bits: Vec<u16> = (0..n as u32).map(|b| b as u16).collect();
    // Floats around every half/bfloat value and its rounding midpoints, plus specials.
    let mut rng = Rng(99);
    let mut f: Vec<f32> = (0..n)
        .map(|i| match i % 4 {
            0 => f32::from_bits(rng.next() as u32),
            1 => f16::from_bits(i as u16).to_f32() * (1.0 + f32::EPSILON * (rng.next() % 3) as f32),
            2 => f32::from_bits(((i as u32) << 16) | 0x8000 | (rng.next() as u32 & 1)),
            _ => f32::from_bits((((i as u32) << 13) | 0x1000) ^ (rng.next() as u32 & 0x80000000)),
        })
        .collect();
    f[0] = f32::INFINITY;
    f[4] = 65520.0;
    f[8] = 65519.99;
    f[12] = f32::from_bits(0x33000000); // 2^-25: ties to +0
    let (mut h2f, mut b2f) = (vec![0f32; n], vec![0f32; n]);
    let (mut f2h, mut f2b) = (vec![0u16; n], vec![0u16; n]);
    let (mut hops, mut bops) = (vec![0u16; n * 4], vec![0u16; n * 4]);
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_test_f16").unwrap();
    let bufs = [
        EmuBuffer::new(&mut bits),
        EmuBuffer::new(&mut f),
        EmuBuffer::new(&mut h2f),
        EmuBuffer::new(&mut b2f),
        EmuBuffer::new(&mut f2h),
        EmuBuffer::new(&mut f2b),
        EmuBuffer::new(&mut hops),
        EmuBuffer::new(&mut bops),
    ];
    for (i, b) in bufs.iter().enumerate() {
        enc.set_buffer(i as u32, b, 0);
    }
    enc.dispatch_threads([n as u32, 1, 1], [256, 1, 1]).unwrap();
    drop(enc);
    let mut bad = Vec::new();
    for i in 0..n {
        let (h, b) = (f16::from_bits(i as u16), bf16::from_bits(i as u16));
        if !same(h2f[i], h.to_f32()) || !same(b2f[i], b.to_f32()) {
            bad.push(format!("to f32 {i:#06x}"));
        }
        let (wh, wb) = (f16::from_f32(f[i]), bf16::from_f32(f[i]));
        if f2h[i] != wh.to_bits() && !(wh.is_nan() && f16::from_bits(f2h[i]).is_nan()) {
            bad.push(format!(
                "f32 {:#010x} -> half {:#06x}, want {:#06x}",
                f[i].to_bits(),
                f2h[i],
                wh.to_bits()
            ));
        }
        if f2b[i] != wb.to_bits() && !(wb.is_nan() && bf16::from_bits(f2b[i]).is_nan()) {
            bad.push(format!(
                "f32 {:#010x} -> bfloat {:#06x}, want {:#06x}",
                f[i].to_bits(),
                f2b[i],
                wb.to_bits()
            ));
        }
        // One correctly rounded op from f64 (exact or innocuously double-rounded for +-*/).
        let j = (i * 7919 + 13) & 0xffff;
        let (ha, hb) = (h.to_f64(), f16::from_bits(j as u16).to_f64());
        let (ba, bb) = (b.to_f64(), bf16::from_bits(j as u16).to_f64());
        let hw = [ha + hb, ha - hb, ha * hb, ha / hb].map(f16::from_f64);
        let bw = [ba + bb, ba - bb, ba * bb, ba / bb].map(bf16::from_f64);
        for k in 0..4 {
            let (gh, gb) = (
                f16::from_bits(hops[i * 4 + k]),
                bf16::from_bits(bops[i * 4 + k]),
            );
            if gh.to_bits() != hw[k].to_bits() && !(gh.is_nan() && hw[k].is_nan()) {
                bad.push(format!(
                    "half op {k} on {i:#06x},{j:#06x}: {:#06x} want {:#06x}",
                    gh.to_bits(),
                    hw[k].to_bits()
                ));
            }
            if gb.to_bits() != bw[k].to_bits() && !(gb.is_nan() && bw[k].is_nan()) {
                bad.push(format!(
                    "bfloat op {k} on {i:#06x},{j:#06x}: {:#06x} want {:#06x}",
                    gb.to_bits(),
                    bw[k].to_bits()
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches, first: {:?}",
        bad.len(),
        &bad[..bad.len().min(8)]
    );
}

#[test]
fn simdgroup_matrix_multiply_accumulate() {
    let mut rng = Rng(1234);
    let tiles = 3usize;
    let (mut a, mut b, mut c) = (
        rng.vec(64 * tiles),
        rng.vec(64 * tiles),
        rng.vec(64 * tiles),
    );
    let c0 = c.clone();
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_test_matmul8").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut a), 0);
    enc.set_buffer(1, &EmuBuffer::new(&mut b), 0);
    enc.set_buffer(2, &EmuBuffer::new(&mut c), 0);
    enc.dispatch_threadgroups([tiles as u32, 1, 1], [32, 1, 1])
        .unwrap();
    drop(enc);
    for t in 0..tiles {
        for r in 0..8 {
            for col in 0..8 {
                let mut want = c0[t * 64 + r * 8 + col] as f64;
                for k in 0..8 {
                    want += a[t * 64 + r * 8 + k] as f64 * b[t * 64 + k * 8 + col] as f64;
                }
                assert!(
                    close(c[t * 64 + r * 8 + col], want, 1e-5),
                    "tile {t} ({r},{col})"
                );
            }
        }
    }
}

#[test]
fn template_kernels_by_host_name() {
    let mut rng = Rng(3);
    let mut x = rng.vec(100);
    let mut y = vec![0f32; 100];
    let mut xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let mut yh = vec![f16::ZERO; 100];
    let mut enc = EmuEncoder::new();
    enc.set_value(2, &1.5f32);
    enc.set_pipeline("emu_test_scale_f32").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut x), 0);
    enc.set_buffer(1, &EmuBuffer::new(&mut y), 0);
    enc.dispatch_threads([100, 1, 1], [32, 1, 1]).unwrap();
    enc.set_pipeline("emu_test_scale_f16").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut xh), 0);
    enc.set_buffer(1, &EmuBuffer::new(&mut yh), 0);
    enc.dispatch_threads([100, 1, 1], [32, 1, 1]).unwrap();
    drop(enc);
    for i in 0..100 {
        assert!(close(y[i], x[i] as f64 * 1.5, 1e-6));
        assert_eq!(yh[i], f16::from_f32(xh[i].to_f32() * 1.5));
    }
    let lib = EmuLibrary::get();
    let k = lib.kernel("emu_test_scale_f16").unwrap();
    assert_eq!(k.info().file, FILE);
    assert!(lib.kernel("no_such_kernel").is_err());
}

#[test]
fn library_is_built_once_across_threads() {
    let ptrs: Vec<usize> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| EmuLibrary::get() as *const _ as usize))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ptrs.windows(2).all(|w| w[0] == w[1]));
    assert!(EmuLibrary::get()
        .kernels()
        .iter()
        .any(|k| k.name == "emu_test_add"));
}

#[test]
fn atomics_across_groups() {
    let mut counter = [0u32; 2];
    let mut fsum = [0f32; 1];
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_test_atomic").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut counter), 0);
    enc.set_buffer(1, &EmuBuffer::new(&mut fsum), 0);
    enc.dispatch_threads([4096, 1, 1], [64, 1, 1]).unwrap();
    drop(enc);
    assert_eq!(counter, [4096, 4095]);
    assert_eq!(fsum[0], 2048.0);
}

#[test]
fn vectors_swizzles_and_math() {
    let mut rng = Rng(42);
    let n = 64usize;
    let mut x: Vec<f32> = rng.vec(n * 4).iter().map(|v| v * 3.0).collect();
    let mut y = vec![0f32; n * 4];
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_test_vec").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut x), 0);
    enc.set_buffer(1, &EmuBuffer::new(&mut y), 0);
    enc.dispatch_threads([n as u32, 1, 1], [32, 1, 1]).unwrap();
    drop(enc);
    for i in 0..n {
        let v: Vec<f64> = x[i * 4..i * 4 + 4].iter().map(|&a| a as f64).collect();
        let mut r = [v[2], v[3], v[0], 1.0];
        r[0] += v[1] * 2.0;
        r[1] += v[0] * 2.0;
        let hx = f16::from_f32(x[i * 4]).to_f64();
        r[3] = r[0] + 2.0 * r[1] + 3.0 * r[2] + hx + v[0].max(v[1]) + v[2].clamp(0.0, 1.0);
        for k in 0..4 {
            let sel = if v[k] < 0.0 {
                (-r[k].abs()).exp()
            } else {
                r[k]
            };
            let want = sel + 0.5 + 3.0;
            assert!(
                close(y[i * 4 + k], want, 1e-5),
                "elem {i}.{k}: {} vs {want}",
                y[i * 4 + k]
            );
        }
    }
}

/// Costs of the emulator (run with `--ignored --nocapture`): ns per GPU thread, per barrier.
#[test]
#[ignore]
fn measure_costs() {
    let n = 1 << 20;
    let mut x = vec![1f32; n];
    let mut y = vec![0f32; n];
    let mut z = vec![0f32; 1 << 16];
    for workers in [1u32, 0] {
        let mut enc = EmuEncoder::new();
        enc.set_workers(workers);
        enc.set_pipeline("emu_test_bench_copy").unwrap();
        enc.set_buffer(0, &EmuBuffer::new(&mut x), 0);
        enc.set_buffer(1, &EmuBuffer::new(&mut y), 0);
        enc.dispatch_threads([n as u32, 1, 1], [256, 1, 1]).unwrap();
        let t = std::time::Instant::now();
        enc.dispatch_threads([n as u32, 1, 1], [256, 1, 1]).unwrap();
        let dt = t.elapsed().as_nanos() as f64;
        println!(
            "copy, workers={workers}: {:.1} ns per GPU thread",
            dt / n as f64
        );

        let rounds = 64u32;
        let groups = 64u32;
        enc.set_pipeline("emu_test_bench_barrier").unwrap();
        enc.set_buffer(0, &EmuBuffer::new(&mut z), 0);
        enc.set_value(1, &rounds);
        for tg in [32u32, 256, 1024] {
            let t = std::time::Instant::now();
            enc.dispatch_threadgroups([groups, 1, 1], [tg, 1, 1])
                .unwrap();
            let dt = t.elapsed().as_nanos() as f64;
            let st = enc.last_stats();
            println!(
                "barrier, workers={workers}, {tg} threads/group: {:.2} us per group barrier, {:.1} ns per thread-barrier",
                dt / st.barriers as f64 / 1e3,
                dt / (st.barriers as f64 * tg as f64)
            );
        }
    }
}

#[test]
fn mlx_style_rms_norm_and_quantized_matvec() {
    let mut rng = Rng(2024);
    // RMSNorm, f32 and bf16, 3 rows of 1000 with 256-thread groups.
    let (rows, dim) = (3usize, 1000usize);
    let x = rng.vec(rows * dim);
    let w = rng.vec(dim);
    let eps = 1e-5f32;
    let params: [u32; 2] = [dim as u32, eps.to_bits()];
    let want = |xs: &[f64], ws: &[f64]| -> Vec<f64> {
        xs.chunks(dim)
            .flat_map(|r| {
                let inv =
                    1.0 / (r.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps as f64).sqrt();
                r.iter()
                    .zip(ws)
                    .map(move |(v, g)| v * inv * g)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (mut xf, mut wf, mut yf) = (x.clone(), w.clone(), vec![0f32; rows * dim]);
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_rms_norm_f32").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut xf), 0);
    enc.set_buffer(1, &EmuBuffer::new(&mut wf), 0);
    enc.set_buffer(2, &EmuBuffer::new(&mut yf), 0);
    enc.set_value(3, &params);
    enc.dispatch_threadgroups([rows as u32, 1, 1], [256, 1, 1])
        .unwrap();
    drop(enc);
    let wf64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let ref32 = want(&x.iter().map(|&v| v as f64).collect::<Vec<_>>(), &wf64);
    assert!(yf.iter().zip(&ref32).all(|(g, r)| close(*g, *r, 1e-5)));

    let mut xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut yb = vec![bf16::ZERO; rows * dim];
    let refb = want(
        &xb.iter().map(|v| v.to_f64()).collect::<Vec<_>>(),
        &wb.iter().map(|v| v.to_f64()).collect::<Vec<_>>(),
    );
    let mut enc = EmuEncoder::new();
    enc.set_pipeline("emu_rms_norm_bf16").unwrap();
    enc.set_buffer(0, &EmuBuffer::new(&mut xb), 0);
    enc.set_buffer(1, &EmuBuffer::new(&mut wb), 0);
    enc.set_buffer(2, &EmuBuffer::new(&mut yb), 0);
    enc.set_value(3, &params);
    enc.dispatch_threadgroups([rows as u32, 1, 1], [256, 1, 1])
        .unwrap();
    drop(enc);
    assert!(yb
        .iter()
        .zip(&refb)
        .all(|(g, r)| close(g.to_f32(), *r, 1e-2)));

    // 4-bit matvec, 5 rows (the last group has one row: its second simdgroup returns early).
    let (in_dim, out_dim, gs) = (256usize, 5usize, 64usize);
    let mut wq: Vec<u32> = (0..out_dim * in_dim / 8)
        .map(|_| rng.next() as u32)
        .collect();
    let mut xv = rng.vec(in_dim);
    for name in ["emu_qmv4_f16_g64", "emu_qmv4_bf16_g64"] {
        let sc: Vec<f32> = (0..out_dim * in_dim / gs)
            .map(|_| rng.f32() * 0.1)
            .collect();
        let bi: Vec<f32> = (0..out_dim * in_dim / gs).map(|_| rng.f32()).collect();
        let (mut s16, mut b16): (Vec<u16>, Vec<u16>) = if name.contains("_f16") {
            (
                sc.iter().map(|&v| f16::from_f32(v).to_bits()).collect(),
                bi.iter().map(|&v| f16::from_f32(v).to_bits()).collect(),
            )
        } else {
            (
                sc.iter().map(|&v| bf16::from_f32(v).to_bits()).collect(),
                bi.iter().map(|&v| bf16::from_f32(v).to_bits()).collect(),
            )
        };
        let to64 = |b: u16| {
            if name.contains("_f16") {
                f16::from_bits(b).to_f64()
            } else {
                bf16::from_bits(b).to_f64()
            }
        };
        let mut out = vec![0f32; out_dim];
        let mut enc = EmuEncoder::new();
        enc.set_pipeline(name).unwrap();
        enc.set_buffer(0, &EmuBuffer::new(&mut wq), 0);
        enc.set_buffer(1, &EmuBuffer::new(&mut s16), 0);
        enc.set_buffer(2, &EmuBuffer::new(&mut b16), 0);
        enc.set_buffer(3, &EmuBuffer::new(&mut xv), 0);
        enc.set_buffer(4, &EmuBuffer::new(&mut out), 0);
        enc.set_value(5, &(in_dim as u32));
        enc.set_value(6, &(out_dim as u32));
        enc.dispatch_threadgroups([out_dim.div_ceil(2) as u32, 1, 1], [64, 1, 1])
            .unwrap();
        drop(enc);
        for r in 0..out_dim {
            let mut want = 0f64;
            for c in 0..in_dim {
                let q = (wq[r * in_dim / 8 + c / 8] >> (4 * (c % 8))) & 15;
                let g = r * in_dim / gs + c / gs;
                want += (to64(s16[g]) * q as f64 + to64(b16[g])) * xv[c] as f64;
            }
            assert!(
                close(out[r], want, 1e-5),
                "{name} row {r}: {} vs {want}",
                out[r]
            );
        }
    }
}

#[test]
fn collectives_do_not_depend_on_the_schedule() {
    let mut rng = Rng(77);
    let mut x: Vec<f32> = rng.vec(96).iter().map(|v| v * 1e4).collect();
    let run = |sched: Sched, x: &mut Vec<f32>| {
        let mut out = vec![0f32; 96 * 10];
        let mut enc = EmuEncoder::new();
        enc.set_sched(sched);
        enc.set_pipeline("emu_test_simd").unwrap();
        enc.set_buffer(0, &EmuBuffer::new(x), 0);
        enc.set_buffer(1, &EmuBuffer::new(&mut out), 0);
        enc.set_value(2, &29u32);
        enc.dispatch_threadgroups([1, 1, 1], [96, 1, 1]).unwrap();
        drop(enc);
        out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    };
    assert_eq!(run(Sched::Forward, &mut x), run(Sched::Reverse, &mut x));
}
