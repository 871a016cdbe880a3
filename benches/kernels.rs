//! Criterion benchmarks of the CPU kernels, with the machine's memory bandwidth measured in the
//! same run so matvec throughput can be read as a ratio of it.
//!
//! `cargo bench --no-default-features --bench kernels`. Throughputs are bytes per second: for
//! `copy` the bytes copied (memcpy convention; STREAM would count read plus written, twice this),
//! for `read` the bytes summed, for the matvecs the weight bytes streamed (packed words + scales +
//! biases), for the MoE the distinct expert blocks touched.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moeflux::backend::cpu::view::{FloatSlice, QuantMatrix};
use moeflux::backend::cpu::{attn, linear_attn, matvec, moe};
use moeflux::graph::{ExpertLayout, WDtype};
use moeflux::weights::quant;
use rayon::prelude::*;

fn rng_fill(v: &mut [f32], seed: u64) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for x in v {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        *x = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
    }
}

fn rng_words(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u32
        })
        .collect()
}

/// Random 4- or 8-bit matrix (values need not come from a quantizer to time the kernel).
struct Owned {
    packed: Vec<u32>,
    scales: Vec<half::bf16>,
    biases: Vec<half::bf16>,
    rows: usize,
    cols: usize,
    bits: u32,
}

impl Owned {
    fn new(rows: usize, cols: usize, bits: u32, seed: u64) -> Self {
        let groups = rows * cols / 64;
        let mut s = vec![0f32; groups];
        rng_fill(&mut s, seed + 1);
        Owned {
            packed: rng_words(rows * cols * bits as usize / 32, seed),
            scales: s.iter().map(|&x| half::bf16::from_f32(x * 0.01)).collect(),
            biases: s.iter().map(|&x| half::bf16::from_f32(-x * 0.05)).collect(),
            rows,
            cols,
            bits,
        }
    }
    fn view(&self) -> QuantMatrix<'_> {
        QuantMatrix {
            packed: &self.packed,
            scales: FloatSlice::Bf16(&self.scales),
            biases: FloatSlice::Bf16(&self.biases),
            rows: self.rows,
            cols: self.cols,
            bits: self.bits,
            group_size: 64,
        }
    }
    fn bytes(&self) -> u64 {
        (self.packed.len() * 4 + self.scales.len() * 4) as u64
    }
}

fn bandwidth(c: &mut Criterion) {
    let n = 256 << 20; // 256 MiB, far beyond any cache here
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let chunk = n / rayon::current_num_threads().max(1);
    let mut g = c.benchmark_group("bandwidth");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(n as u64));
    g.bench_function("copy_256MiB", |b| {
        b.iter(|| {
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
            black_box(&dst);
        })
    });
    let words: Vec<u64> = vec![3u64; n / 8];
    g.throughput(Throughput::Bytes(n as u64));
    g.bench_function("read_256MiB", |b| {
        b.iter(|| {
            black_box(
                words
                    .par_chunks(chunk / 8)
                    .map(|c| c.iter().fold(0u64, |a, &x| a ^ x))
                    .reduce(|| 0, |a, b| a ^ b),
            )
        })
    });
    g.finish();
}

fn matvec_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec");
    g.sample_size(20);
    // M = 1 on a 4-bit weight of 72 MiB (beyond the caches): the decode path.
    for &(rows, cols, bits, m) in &[
        (16384usize, 8192usize, 4u32, 1usize),
        (16384, 8192, 8, 1),
        (4096, 4096, 4, 64),
    ] {
        let w = Owned::new(rows, cols, bits, 7);
        let mut x = vec![0f32; cols * m];
        rng_fill(&mut x, 3);
        let mut y = vec![0f32; rows * m];
        g.throughput(Throughput::Bytes(w.bytes()));
        let id = format!("q{bits}g64_{rows}x{cols}_m{m}");
        g.bench_function(BenchmarkId::from_parameter(id), |b| {
            let v = w.view();
            b.iter(|| matvec::matvec_n_tokens(&v, black_box(&x), &mut y, m))
        });
    }
    g.finish();
}

fn attention_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sdpa");
    g.sample_size(20);
    // Qwen3-Next full attention: 16 query heads, 2 KV heads of 256; decode over a 4k cache.
    let (heads, kv_heads, hd, kv_len) = (16usize, 2usize, 256usize, 4096usize);
    let kv_dim = kv_heads * hd;
    let mut q = vec![0f32; heads * hd];
    let mut k = vec![0f32; kv_len * kv_dim];
    let mut v = vec![0f32; kv_len * kv_dim];
    rng_fill(&mut q, 1);
    rng_fill(&mut k, 2);
    rng_fill(&mut v, 3);
    let mut out = vec![0f32; heads * hd];
    g.throughput(Throughput::Bytes((2 * kv_len * kv_dim * 4) as u64));
    g.bench_function("decode_kv4096", |b| {
        b.iter(|| {
            attn::sdpa_causal(
                &q,
                &k,
                &v,
                &mut out,
                1,
                heads,
                heads / kv_heads,
                hd,
                kv_dim,
                kv_len - 1,
                0.0625,
            )
        })
    });
    g.finish();
}

fn delta_net_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("gated_delta_net");
    g.sample_size(20);
    // Qwen3-Next linear attention: 16 key heads, 32 value heads, dk = dv = 128.
    let (nk, nv, dk, dv) = (16usize, 32usize, 128usize, 128usize);
    for &(t, chunk) in &[(1usize, 0usize), (64, 0), (64, 16), (64, 64)] {
        let mut conv = vec![0f32; t * (2 * nk * dk + nv * dv)];
        rng_fill(&mut conv, 5);
        for x in conv.iter_mut() {
            *x *= 0.1;
        }
        let gdec = vec![0.95f32; t * nv];
        let beta = vec![0.5f32; t * nv];
        let mut state = vec![0f32; nv * dk * dv];
        let mut out = vec![0f32; t * nv * dv];
        let name = if chunk == 0 {
            format!("step_t{t}")
        } else {
            format!("chunk{chunk}_t{t}")
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                if chunk == 0 {
                    linear_attn::delta_net_step(
                        &mut state,
                        &conv,
                        &gdec,
                        &beta,
                        &mut out,
                        nv,
                        dv,
                        nv / nk,
                        dk,
                        t,
                    )
                } else {
                    linear_attn::delta_net_chunkwise(
                        &mut state,
                        &conv,
                        &gdec,
                        &beta,
                        &mut out,
                        nv,
                        dv,
                        nv / nk,
                        dk,
                        t,
                        chunk,
                    )
                }
            })
        });
    }
    g.finish();
}

/// One expert buffer of `n` real quantized experts (bf16 weights quantized with the MLX scheme).
fn expert_buffer(layout: &ExpertLayout, n: usize) -> Vec<u8> {
    let o = layout.offsets();
    let (h, i) = (layout.hidden_dim as usize, layout.inter_dim as usize);
    let mut buf = vec![0u8; n * o.block_bytes as usize];
    for e in 0..n {
        let block = &mut buf[e * o.block_bytes as usize..(e + 1) * o.block_bytes as usize];
        for (part, rows, cols) in [(o.gate, i, h), (o.up, i, h), (o.down, h, i)] {
            let mut w = vec![0f32; rows * cols];
            rng_fill(&mut w, (e * 3) as u64 + part.w_off);
            let wb: Vec<half::bf16> = w.iter().map(|&x| half::bf16::from_f32(x * 0.05)).collect();
            let q =
                quant::quantize(quant::QuantInput::Bf16(&wb), rows, cols, 64, 4).expect("quantize");
            let put = |block: &mut [u8], off: u64, bytes: Vec<u8>| {
                block[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes)
            };
            put(
                block,
                part.w_off,
                q.packed.iter().flat_map(|w| w.to_le_bytes()).collect(),
            );
            for (off, v) in [(part.s_off, &q.scales), (part.b_off, &q.biases)] {
                let quant::ScaleVec::Bf16(v) = v else {
                    unreachable!("bf16 in, bf16 scales out")
                };
                put(
                    block,
                    off,
                    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
                );
            }
        }
    }
    buf
}

fn moe_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("moe");
    g.sample_size(20);
    // Qwen3-Next-80B-A3B routed experts: hidden 2048, inter 512, 4-bit g64, top-10 (64 experts resident).
    let layout = ExpertLayout {
        hidden_dim: 2048,
        inter_dim: 512,
        bits: 4,
        group_size: 64,
        scale_dtype: WDtype::Bf16,
    };
    let stride = layout.offsets().block_bytes as usize;
    let n_experts = 64usize;
    let experts = expert_buffer(&layout, n_experts);
    for &(t, k) in &[(1usize, 10usize), (16, 10)] {
        let (h, i) = (2048usize, 512usize);
        let mut x = vec![0f32; t * h];
        rng_fill(&mut x, 9);
        let idx: Vec<u32> = (0..t)
            .flat_map(|tt| (0..k).map(move |j| ((tt * 3 + j * 5) % n_experts) as u32))
            .collect();
        let w = vec![1.0f32 / k as f32; t * k];
        let mut out = vec![0f32; t * h];
        let mut htpe = vec![0u32; n_experts];
        let mut hids = vec![0u32; t * k];
        let mut gm = vec![0f32; t * k * i];
        let mut um = vec![0f32; t * k * i];
        let mut dm = vec![0f32; t * k * h];
        let distinct: std::collections::BTreeSet<u32> = idx.iter().copied().collect();
        g.throughput(Throughput::Bytes((distinct.len() * stride) as u64));
        g.bench_function(format!("gather_t{t}_k{k}"), |b| {
            b.iter(|| {
                moe::moe_gather_id(
                    &experts, stride, &layout, &idx, &w, &x, &mut out, &mut htpe, &mut hids,
                    &mut gm, &mut um, &mut dm, t, n_experts, k,
                )
                .expect("moe")
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bandwidth,
    matvec_bench,
    attention_bench,
    delta_net_bench,
    moe_bench
);
criterion_main!(benches);
