//! The CPU backend: the default, runs everywhere, and is the executable specification every other
//! backend is checked against. Kernels are multi-threaded with rayon and written to vectorise;
//! "encoding" an op runs it at once, and `submit_and_wait` records the submission's time.

pub mod attn;
pub mod linear_attn;
pub mod matvec;
pub mod moe;
pub mod norm;
pub mod pool;
pub mod view;

use super::{Backend, PoolInfo, Stats};
use crate::error::{Error, Result};
use crate::graph::validate::{op_ident, validate_op};
use crate::graph::{Op, WDtype, WeightRef};
use crate::weights::file::WeightFile;
pub use pool::CpuBufferPool;
use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Instant;
use view::{FloatSlice, QuantMatrix};

/// How to open a CPU backend.
#[derive(Clone, Debug, Default)]
pub struct CpuConfig {
    /// Weight file (blob path; the manifest is `<path>.json`), if ops read weights.
    pub weights: Option<PathBuf>,
}

/// The CPU backend.
pub struct CpuBackend {
    pool: CpuBufferPool,
    weights: Option<WeightFile>,
    stats: Stats,
    profile_per_op: bool,
}

/// Encoding context: the CPU runs ops as they are encoded; this times the submission.
pub struct CpuEncodeCtx {
    started: Instant,
}

impl CpuBackend {
    /// Open with an already opened weight file (or none).
    pub fn with_weights(weights: Option<WeightFile>) -> Self {
        CpuBackend {
            pool: CpuBufferPool::new(),
            weights,
            stats: Stats::default(),
            profile_per_op: std::env::var_os("MOEFLUX_PROFILE_PER_OP").is_some_and(|v| v != "0"),
        }
    }
    /// The open weight file, if any.
    pub fn weight_file(&self) -> Option<&WeightFile> {
        self.weights.as_ref()
    }
    /// Force the one-op-per-submission profile mode on or off (overrides the env switch).
    pub fn set_profile_per_op(&mut self, on: bool) {
        self.profile_per_op = on;
    }
}

impl Backend for CpuBackend {
    type Pool = CpuBufferPool;
    type EncodeCtx = CpuEncodeCtx;
    type Config = CpuConfig;

    fn open(config: CpuConfig) -> Result<Self> {
        let weights = match &config.weights {
            Some(p) => Some(WeightFile::open(p)?),
            None => None,
        };
        Ok(Self::with_weights(weights))
    }
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn pool(&self) -> &CpuBufferPool {
        &self.pool
    }
    fn pool_mut(&mut self) -> &mut CpuBufferPool {
        &mut self.pool
    }
    fn weight_bytes(&self) -> Option<&[u8]> {
        self.weights.as_ref().map(|w| w.bytes())
    }
    fn begin_encoding(&self) -> CpuEncodeCtx {
        CpuEncodeCtx {
            started: Instant::now(),
        }
    }
    fn encode_op(&self, op: &Op, _ctx: &mut CpuEncodeCtx) -> Result<()> {
        validate_op(op, &self.pool, self.weight_bytes().map(|w| w.len() as u64))?;
        run_op(self, op)
    }
    fn submit_and_wait(&self, ctx: CpuEncodeCtx, label: &str) -> Result<()> {
        self.stats.record(label, ctx.started.elapsed());
        Ok(())
    }
    fn stats(&self) -> &Stats {
        &self.stats
    }
    fn profile_per_op(&self) -> bool {
        self.profile_per_op
    }
}

/// Typed access to one op's buffers. Inputs that share memory with a buffer the op writes are
/// copied first, so a kernel never sees a shared and a mutable slice of the same bytes.
struct Io<'a> {
    pool: &'a CpuBufferPool,
    ident: &'a str,
    written: Vec<u32>,
}

impl<'a> Io<'a> {
    fn new(pool: &'a CpuBufferPool, op: &Op, ident: &'a str) -> Self {
        let written = op
            .writes()
            .iter()
            .filter_map(|&raw| pool.physical_of(raw))
            .collect();
        Io {
            pool,
            ident,
            written,
        }
    }

    fn range(
        &self,
        field: &'static str,
        bytes: &'a [u8],
        off: u64,
        len: usize,
    ) -> Result<&'a [u8]> {
        let start = usize::try_from(off).unwrap_or(usize::MAX);
        bytes.get(start..start.saturating_add(len)).ok_or_else(|| {
            Error::bad_data(
                self.ident,
                field,
                format!("{len} bytes at {off} exceed the buffer"),
            )
        })
    }

    fn misaligned(&self, field: &'static str) -> Error {
        Error::bad_data(self.ident, field, "buffer memory is not 4-byte aligned")
    }

    /// An input slice of `n` elements at byte `off`, copied when this op also writes the same
    /// physical buffer (so no shared and mutable view of the same bytes coexist).
    fn input<T: Clone>(
        &self,
        field: &'static str,
        raw: u32,
        off: u64,
        n: usize,
        cast: fn(&[u8]) -> Option<&[T]>,
    ) -> Result<Cow<'a, [T]>> {
        // SAFETY: shared view; if this op writes the same physical buffer we copy before any
        // mutable view of it is created (mutable views are taken after all inputs).
        let bytes = self.range(field, unsafe { self.pool.bytes(raw)? }, off, n * 4)?;
        let s = cast(bytes).ok_or_else(|| self.misaligned(field))?;
        if self
            .pool
            .physical_of(raw)
            .is_some_and(|p| self.written.contains(&p))
        {
            Ok(Cow::Owned(s.to_vec()))
        } else {
            Ok(Cow::Borrowed(s))
        }
    }

    fn f32_in(&self, field: &'static str, raw: u32, off: u64, n: usize) -> Result<Cow<'a, [f32]>> {
        self.input(field, raw, off, n, view::f32s)
    }

    fn u32_in(&self, field: &'static str, raw: u32, n: usize) -> Result<Cow<'a, [u32]>> {
        self.input(field, raw, 0, n, view::u32s)
    }

    fn bytes_in(&self, raw: u32) -> Result<&'a [u8]> {
        // SAFETY: expert buffers are read-only for every op (validation: role and access).
        unsafe { self.pool.bytes(raw) }
    }

    /// A mutable slice of `n` elements at byte `off` of a buffer this op writes.
    #[allow(clippy::mut_from_ref)]
    fn output<T>(
        &self,
        field: &'static str,
        raw: u32,
        off: u64,
        n: usize,
        cast: fn(&mut [u8]) -> Option<&mut [T]>,
    ) -> Result<&'a mut [T]> {
        // SAFETY: validation guarantees no two written fields share a physical buffer, and every
        // read of a written buffer was copied (`input`), so this is the only live view.
        let bytes = unsafe { self.pool.bytes_mut(raw)? };
        let start = usize::try_from(off).unwrap_or(usize::MAX);
        let end = start.saturating_add(n * 4);
        let len = bytes.len();
        let bytes = bytes.get_mut(start..end).ok_or_else(|| {
            Error::bad_data(
                self.ident,
                field,
                format!("{} bytes at {off} exceed {len}", n * 4),
            )
        })?;
        cast(bytes).ok_or_else(|| self.misaligned(field))
    }

    #[allow(clippy::mut_from_ref)]
    fn f32_out(&self, field: &'static str, raw: u32, off: u64, n: usize) -> Result<&'a mut [f32]> {
        self.output(field, raw, off, n, view::f32s_mut)
    }

    #[allow(clippy::mut_from_ref)]
    fn u32_out(&self, field: &'static str, raw: u32, n: usize) -> Result<&'a mut [u32]> {
        self.output(field, raw, 0, n, view::u32s_mut)
    }
}

/// A float vector of the weight file.
fn weight_vec<'w>(
    wb: Option<&'w [u8]>,
    ident: &str,
    field: &'static str,
    off: u64,
    n: u32,
    dtype: WDtype,
) -> Result<FloatSlice<'w>> {
    let wb = wb.ok_or_else(|| Error::NoWeights {
        op: ident.to_string(),
        field,
    })?;
    let start = off as usize;
    let bytes = wb
        .get(start..start + n as usize * dtype.size() as usize)
        .ok_or_else(|| Error::bad_data(ident, field, "weight range outside the weight file"))?;
    FloatSlice::from_bytes(bytes, dtype)
        .ok_or_else(|| Error::bad_data(ident, field, "misaligned weight vector"))
}

/// A quantized matrix of the weight file.
fn weight_matrix<'w>(
    wb: Option<&'w [u8]>,
    ident: &str,
    field: &'static str,
    w: &WeightRef,
    rows: u32,
    cols: u32,
) -> Result<QuantMatrix<'w>> {
    let wb = wb.ok_or_else(|| Error::NoWeights {
        op: ident.to_string(),
        field,
    })?;
    QuantMatrix::from_ref(wb, w, rows as usize, cols as usize).ok_or_else(|| {
        Error::bad_data(
            ident,
            field,
            "quantized matrix outside the weight file or misaligned",
        )
    })
}

fn run_op(be: &CpuBackend, op: &Op) -> Result<()> {
    let ident = op_ident(op);
    let io = Io::new(&be.pool, op, &ident);
    let wb = be.weight_bytes();
    let u = |v: u32| v as usize;
    match op {
        Op::RmsNormBf16NTokens {
            x,
            weight_off,
            out,
            dim,
            n_tokens,
            eps,
            weight_dtype,
            ..
        } => {
            let n = u(*dim) * u(*n_tokens);
            let w = weight_vec(wb, &ident, "weight_off", *weight_off, *dim, *weight_dtype)?;
            let x = io.f32_in("x", x.raw(), 0, n)?;
            let out = io.f32_out("out", out.raw(), 0, n)?;
            norm::rms_norm(&x, w, out, u(*dim), u(*n_tokens), *eps);
        }
        Op::RmsNormQkNTokens {
            x,
            num_k_heads,
            key_dim,
            key_offset_per_token,
            per_token_total,
            n_tokens,
            ..
        } => {
            let x = io.f32_out("x", x.raw(), 0, u(*per_token_total) * u(*n_tokens))?;
            norm::rms_norm_qk(
                x,
                u(*num_k_heads),
                u(*key_dim),
                u(*key_offset_per_token),
                u(*per_token_total),
                u(*n_tokens),
            );
        }
        Op::RmsNormPerHeadNTokens {
            x,
            weight_off,
            num_heads,
            head_dim,
            n_tokens,
            eps,
            weight_dtype,
            ..
        } => {
            let w = weight_vec(
                wb,
                &ident,
                "weight_off",
                *weight_off,
                *head_dim,
                *weight_dtype,
            )?;
            let x = io.f32_out("x", x.raw(), 0, u(*num_heads) * u(*head_dim) * u(*n_tokens))?;
            norm::rms_norm_per_head(x, w, u(*num_heads), u(*head_dim), u(*n_tokens), *eps);
        }
        Op::RopeNTokens {
            x,
            inv_freq,
            n_tokens,
            num_heads,
            head_dim,
            rotary_dim,
            start_pos,
            ..
        } => {
            let f = io.f32_in("inv_freq", inv_freq.raw(), 0, u(*rotary_dim) / 2)?;
            let x = io.f32_out("x", x.raw(), 0, u(*n_tokens) * u(*num_heads) * u(*head_dim))?;
            attn::rope(
                x,
                &f,
                u(*n_tokens),
                u(*num_heads),
                u(*head_dim),
                u(*rotary_dim),
                u(*start_pos),
            );
        }
        Op::SplitQGate {
            q_proj,
            q_out,
            gate_out,
            num_heads,
            head_dim,
            n_tokens,
            ..
        } => {
            let n = u(*n_tokens) * u(*num_heads) * u(*head_dim);
            let qp = io.f32_in("q_proj", q_proj.raw(), 0, 2 * n)?;
            let q = io.f32_out("q_out", q_out.raw(), 0, n)?;
            let g = io.f32_out("gate_out", gate_out.raw(), 0, n)?;
            attn::split_q_gate(&qp, q, g, u(*num_heads), u(*head_dim), u(*n_tokens));
        }
        Op::ResidualAddNTokens {
            a,
            b,
            out,
            n_tokens,
            dim,
            ..
        } => {
            let n = u(*n_tokens) * u(*dim);
            let a = io.f32_in("a", a.raw(), 0, n)?;
            let b = io.f32_in("b", b.raw(), 0, n)?;
            let out = io.f32_out("out", out.raw(), 0, n)?;
            attn::residual_add(&a, &b, out);
        }
        Op::ZeroBuffer { buf, n_bytes, .. } => {
            // SAFETY: the op's only buffer; validation checked writability and size.
            let bytes = unsafe { be.pool.bytes_mut(buf.raw())? };
            bytes[..*n_bytes as usize].fill(0);
        }
        Op::MatvecNTokens {
            weight,
            input,
            input_off,
            output,
            output_off,
            in_dim,
            out_dim,
            n_tokens,
            ..
        } => {
            let w = weight_matrix(wb, &ident, "weight", weight, *out_dim, *in_dim)?;
            let x = io.f32_in("input", input.raw(), *input_off, u(*in_dim) * u(*n_tokens))?;
            let y = io.f32_out(
                "output",
                output.raw(),
                *output_off,
                u(*out_dim) * u(*n_tokens),
            )?;
            matvec::matvec_n_tokens(&w, &x, y, u(*n_tokens));
        }
        Op::SwigluFusedBatched {
            gate,
            up,
            out,
            total,
            ..
        } => {
            let g = io.f32_in("gate", gate.raw(), 0, u(*total))?;
            let up = io.f32_in("up", up.raw(), 0, u(*total))?;
            let out = io.f32_out("out", out.raw(), 0, u(*total))?;
            moe::swiglu(&g, &up, out);
        }
        Op::SdpaCausalTiled {
            q,
            k,
            v,
            attn_out,
            n_tokens,
            num_heads,
            heads_per_kv,
            head_dim,
            kv_dim,
            kv_start,
            kv_len_total,
            softmax_scale,
            ..
        } => {
            let n = u(*n_tokens) * u(*num_heads) * u(*head_dim);
            let q = io.f32_in("q", q.raw(), 0, n)?;
            let kc = io.f32_in("k", k.raw(), 0, u(*kv_len_total) * u(*kv_dim))?;
            let vc = io.f32_in("v", v.raw(), 0, u(*kv_len_total) * u(*kv_dim))?;
            let out = io.f32_out("attn_out", attn_out.raw(), 0, n)?;
            attn::sdpa_causal(
                &q,
                &kc,
                &vc,
                out,
                u(*n_tokens),
                u(*num_heads),
                u(*heads_per_kv),
                u(*head_dim),
                u(*kv_dim),
                u(*kv_start),
                *softmax_scale,
            );
        }
        Op::SigmoidGateNTokens {
            x,
            gate,
            dim,
            n_tokens,
            ..
        } => {
            let n = u(*dim) * u(*n_tokens);
            let g = io.f32_in("gate", gate.raw(), 0, n)?;
            let x = io.f32_out("x", x.raw(), 0, n)?;
            attn::sigmoid_gate(x, &g);
        }
        Op::KvCacheAppendNTokens {
            k_src,
            v_src,
            k_cache,
            v_cache,
            kv_dim,
            n_tokens,
            kv_start,
            ..
        } => {
            let n = u(*n_tokens) * u(*kv_dim);
            let rows = (u(*kv_start) + u(*n_tokens)) * u(*kv_dim);
            let ks = io.f32_in("k_src", k_src.raw(), 0, n)?;
            let vs = io.f32_in("v_src", v_src.raw(), 0, n)?;
            let kc = io.f32_out("k_cache", k_cache.raw(), 0, rows)?;
            let vc = io.f32_out("v_cache", v_cache.raw(), 0, rows)?;
            attn::kv_append(&ks, &vs, kc, vc, u(*kv_dim), u(*n_tokens), u(*kv_start));
        }
        Op::MoeSoftmaxTopK {
            logits,
            indices_out,
            weights_out,
            n_tokens,
            n_experts,
            k,
            ..
        } => {
            let l = io.f32_in("logits", logits.raw(), 0, u(*n_tokens) * u(*n_experts))?;
            let idx = io.u32_out("indices_out", indices_out.raw(), u(*n_tokens) * u(*k))?;
            let w = io.f32_out("weights_out", weights_out.raw(), 0, u(*n_tokens) * u(*k))?;
            moe::softmax_topk(&l, u(*n_tokens), u(*n_experts), u(*k), idx, w);
        }
        Op::MoeNormalizeWeights {
            weights,
            n_tokens,
            k,
            ..
        } => {
            let w = io.f32_out("weights", weights.raw(), 0, u(*n_tokens) * u(*k))?;
            moe::normalize_weights(w, u(*n_tokens), u(*k));
        }
        Op::MoeBatchedPermuteFuse {
            expert_base,
            expert_stride,
            layout,
            expert_indices,
            expert_slots,
            bucket_input,
            bucket_gate,
            bucket_up,
            bucket_act,
            bucket_out,
            bucket_token_idx,
            bucket_weights,
            out_sum,
            n_tokens,
            buckets,
            ..
        } => {
            let nb = expert_slots.len();
            let total = u(*buckets.last().unwrap_or(&0));
            let (h, i) = (u(layout.hidden_dim), u(layout.inter_dim));
            let dev_slots = io.u32_in("expert_indices", expert_indices.raw(), nb)?;
            if dev_slots.as_ref() != expert_slots.as_slice() {
                return Err(Error::bad_data(
                    &ident,
                    "expert_indices",
                    "device copy differs from expert_slots (upload the slots before running)",
                ));
            }
            let experts = io.bytes_in(expert_base.raw())?;
            let input = io.f32_in("bucket_input", bucket_input.raw(), 0, u(*n_tokens) * h)?;
            let tok = io.u32_in("bucket_token_idx", bucket_token_idx.raw(), total)?;
            let wts = io.f32_in("bucket_weights", bucket_weights.raw(), 0, total)?;
            let scratch = moe::MoeScratch {
                gate: io.f32_out("bucket_gate", bucket_gate.raw(), 0, total * i)?,
                up: io.f32_out("bucket_up", bucket_up.raw(), 0, total * i)?,
                act: io.f32_out("bucket_act", bucket_act.raw(), 0, total * i)?,
                out: io.f32_out("bucket_out", bucket_out.raw(), 0, total * h)?,
            };
            let sum = io.f32_out("out_sum", out_sum.raw(), 0, u(*n_tokens) * h)?;
            moe::moe_buckets(
                experts,
                *expert_stride as usize,
                layout,
                expert_slots,
                buckets,
                &input,
                &tok,
                &wts,
                scratch,
                sum,
                u(*n_tokens),
            )
            .map_err(|(field, msg)| Error::bad_data(&ident, field, msg))?;
        }
        Op::MoeGatherIdFuse {
            expert_base,
            expert_stride,
            layout,
            indices,
            weights,
            mlp_in,
            out_sum,
            htpe,
            hids,
            gate_mid,
            up_mid,
            down_mid,
            n_tokens,
            n_experts,
            k,
            ..
        } => {
            let (h, i) = (u(layout.hidden_dim), u(layout.inter_dim));
            let nk = u(*n_tokens) * u(*k);
            let experts = io.bytes_in(expert_base.raw())?;
            let idx = io.u32_in("indices", indices.raw(), nk)?;
            let w = io.f32_in("weights", weights.raw(), 0, nk)?;
            let x = io.f32_in("mlp_in", mlp_in.raw(), 0, u(*n_tokens) * h)?;
            moe::moe_gather_id(
                experts,
                *expert_stride as usize,
                layout,
                &idx,
                &w,
                &x,
                io.f32_out("out_sum", out_sum.raw(), 0, u(*n_tokens) * h)?,
                io.u32_out("htpe", htpe.raw(), u(*n_experts))?,
                io.u32_out("hids", hids.raw(), nk)?,
                io.f32_out("gate_mid", gate_mid.raw(), 0, nk * i)?,
                io.f32_out("up_mid", up_mid.raw(), 0, nk * i)?,
                io.f32_out("down_mid", down_mid.raw(), 0, nk * h)?,
                u(*n_tokens),
                u(*n_experts),
                u(*k),
            )
            .map_err(|(field, msg)| Error::bad_data(&ident, field, msg))?;
        }
        Op::MoeCombineResidualNTokens {
            h_mid,
            moe_sum,
            shared_out,
            shared_gate,
            hidden_out,
            n_tokens,
            dim,
            ..
        } => {
            let n = u(*n_tokens) * u(*dim);
            let hm = io.f32_in("h_mid", h_mid.raw(), 0, n)?;
            let ms = io.f32_in("moe_sum", moe_sum.raw(), 0, n)?;
            let so = io.f32_in("shared_out", shared_out.raw(), 0, n)?;
            let sg = io.f32_in("shared_gate", shared_gate.raw(), 0, u(*n_tokens))?;
            let out = io.f32_out("hidden_out", hidden_out.raw(), 0, n)?;
            moe::combine_residual(&hm, &ms, &so, &sg, out, u(*n_tokens), u(*dim));
        }
        Op::Conv1dStepNTokens {
            qkv_in,
            conv_state,
            weight_off,
            conv_out,
            conv_dim,
            n_tokens,
            weight_dtype,
            ..
        } => {
            let n = u(*n_tokens) * u(*conv_dim);
            let w = weight_vec(
                wb,
                &ident,
                "weight_off",
                *weight_off,
                conv_dim * 4,
                *weight_dtype,
            )?;
            let xin = io.f32_in("qkv_in", qkv_in.raw(), 0, n)?;
            let st = io.f32_out("conv_state", conv_state.raw(), 0, 3 * u(*conv_dim))?;
            let out = io.f32_out("conv_out", conv_out.raw(), 0, n)?;
            linear_attn::conv1d_step(&xin, st, w, out, u(*conv_dim), u(*n_tokens));
        }
        Op::ComputeDecayBetaNTokens {
            alpha_in,
            beta_in,
            a_log_off,
            dt_bias_off,
            g_decay_out,
            beta_gate_out,
            num_v_heads,
            n_tokens,
            weight_dtype,
            ..
        } => {
            let n = u(*n_tokens) * u(*num_v_heads);
            let a_log = weight_vec(
                wb,
                &ident,
                "a_log_off",
                *a_log_off,
                *num_v_heads,
                *weight_dtype,
            )?;
            let dt = weight_vec(
                wb,
                &ident,
                "dt_bias_off",
                *dt_bias_off,
                *num_v_heads,
                *weight_dtype,
            )?;
            let a = io.f32_in("alpha_in", alpha_in.raw(), 0, n)?;
            let b = io.f32_in("beta_in", beta_in.raw(), 0, n)?;
            let g = io.f32_out("g_decay_out", g_decay_out.raw(), 0, n)?;
            let bo = io.f32_out("beta_gate_out", beta_gate_out.raw(), 0, n)?;
            linear_attn::decay_beta(&a, &b, a_log, dt, g, bo, u(*num_v_heads), u(*n_tokens));
        }
        Op::GatedDeltaNetStepNTokens {
            state,
            conv_out,
            g_decay,
            beta_gate,
            output,
            num_v_heads,
            value_dim,
            k_heads_per_v,
            key_dim,
            n_tokens,
            ..
        }
        | Op::GatedDeltaNetChunkwise {
            state,
            conv_out,
            g_decay,
            beta_gate,
            output,
            num_v_heads,
            value_dim,
            k_heads_per_v,
            key_dim,
            n_tokens,
            ..
        } => {
            let (nv, dv, dk, t) = (u(*num_v_heads), u(*value_dim), u(*key_dim), u(*n_tokens));
            let nk = nv / u(*k_heads_per_v);
            let cv = io.f32_in("conv_out", conv_out.raw(), 0, t * (2 * nk * dk + nv * dv))?;
            let g = io.f32_in("g_decay", g_decay.raw(), 0, t * nv)?;
            let b = io.f32_in("beta_gate", beta_gate.raw(), 0, t * nv)?;
            let st = io.f32_out("state", state.raw(), 0, nv * dk * dv)?;
            let out = io.f32_out("output", output.raw(), 0, t * nv * dv)?;
            match op {
                Op::GatedDeltaNetChunkwise { chunk_size, .. } => linear_attn::delta_net_chunkwise(
                    st,
                    &cv,
                    &g,
                    &b,
                    out,
                    nv,
                    dv,
                    u(*k_heads_per_v),
                    dk,
                    t,
                    u(*chunk_size),
                ),
                _ => linear_attn::delta_net_step(
                    st,
                    &cv,
                    &g,
                    &b,
                    out,
                    nv,
                    dv,
                    u(*k_heads_per_v),
                    dk,
                    t,
                ),
            }
        }
        Op::GatedRmsNormNTokens {
            values,
            z,
            weight_off,
            output,
            num_v_heads,
            value_dim,
            n_tokens,
            eps,
            weight_dtype,
            ..
        } => {
            let n = u(*n_tokens) * u(*num_v_heads) * u(*value_dim);
            let w = weight_vec(
                wb,
                &ident,
                "weight_off",
                *weight_off,
                *value_dim,
                *weight_dtype,
            )?;
            let v = io.f32_in("values", values.raw(), 0, n)?;
            let zz = io.f32_in("z", z.raw(), 0, n)?;
            let out = io.f32_out("output", output.raw(), 0, n)?;
            norm::gated_rms_norm(
                &v,
                &zz,
                w,
                out,
                u(*num_v_heads),
                u(*value_dim),
                u(*n_tokens),
                *eps,
            );
        }
        Op::EmbedGatherNTokens {
            token_ids,
            weight,
            hidden_out,
            hidden_dim,
            n_tokens,
            vocab,
            ..
        } => {
            let w = weight_matrix(wb, &ident, "weight", weight, *vocab, *hidden_dim)?;
            let ids = io.u32_in("token_ids", token_ids.raw(), u(*n_tokens))?;
            let out = io.f32_out(
                "hidden_out",
                hidden_out.raw(),
                0,
                u(*n_tokens) * u(*hidden_dim),
            )?;
            matvec::embed_gather(&w, &ids, out).map_err(|(t, id)| {
                Error::bad_data(
                    &ident,
                    "token_ids",
                    format!("token {t}: id {id} >= vocab {vocab}"),
                )
            })?;
        }
    }
    Ok(())
}
