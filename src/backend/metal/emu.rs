//! `MetalEmuBackend`: the Metal shaders and encode arms run by the MSL emulator over host memory
//! (the CPU pool, so pool semantics are the CPU's), so every op takes the Metal path on Linux.
//!
//! Dispatches run as they are encoded. Data the kernels would silently skip on a GPU (token ids
//! past the vocabulary, expert ids past `n_experts`, bucket token indices past `n_tokens`, a
//! stale `expert_indices`) is checked on the host first and reported as the CPU backend does.

use super::encode::{encode_op, Bindings, Switches};
use crate::backend::cpu::view;
use crate::backend::cpu::CpuBufferPool;
use crate::backend::encoder::ComputeEncoder;
use crate::backend::metal_emu::{DispatchRecord, EmuBuffer, EmuEncoder};
use crate::backend::{Backend, PoolInfo, Stats};
use crate::error::{Error, Result};
use crate::graph::validate::{op_ident, validate, validate_op};
use crate::graph::{Graph, Op};
use crate::weights::file::WeightFile;
use std::path::PathBuf;
use std::time::Instant;

/// How to open a [`MetalEmuBackend`].
#[derive(Clone, Debug, Default)]
pub struct MetalEmuConfig {
    /// Weight file (blob path; the manifest is `<path>.json`), if ops read weights.
    pub weights: Option<PathBuf>,
    /// Kernel choices; `None` reads the `MOEFLUX_*` switches from the environment.
    pub switches: Option<Switches>,
}

/// The Metal backend on the MSL emulator.
pub struct MetalEmuBackend {
    pool: CpuBufferPool,
    weights: Option<WeightFile>,
    stats: Stats,
    profile_per_op: bool,
    switches: Switches,
}

/// Encoding context: the emulator's encoder (dispatches run at once) and the submission start.
pub struct EmuEncodeCtx {
    enc: EmuEncoder<'static>,
    started: Instant,
}

impl EmuEncodeCtx {
    /// Every dispatch encoded so far (kernel, grid, bindings), for tests.
    pub fn dispatches(&self) -> &[DispatchRecord] {
        self.enc.dispatches()
    }
}

impl MetalEmuBackend {
    /// Open with an already opened weight file (or none) and the given kernel switches.
    pub fn with_weights(weights: Option<WeightFile>, switches: Switches) -> Self {
        MetalEmuBackend {
            pool: CpuBufferPool::new(),
            weights,
            stats: Stats::default(),
            profile_per_op: std::env::var_os("MOEFLUX_PROFILE_PER_OP").is_some_and(|v| v != "0"),
            switches,
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
    /// The kernel switches in effect.
    pub fn switches(&self) -> Switches {
        self.switches
    }
    /// Change the kernel switches (tests run every alternative on one backend).
    pub fn set_switches(&mut self, switches: Switches) {
        self.switches = switches;
    }
}

/// Binds pool buffers and the weight file as emulator buffers.
struct PoolBindings<'p> {
    pool: &'p CpuBufferPool,
    weights: Option<&'p [u8]>,
}

impl<'a> Bindings<EmuEncoder<'a>> for PoolBindings<'_> {
    fn buffer(&self, enc: &mut EmuEncoder<'a>, index: u32, raw: u32, offset: u64) -> Result<()> {
        let addr = self.pool.address(raw)?;
        let len = self.pool.byte_size(raw).unwrap_or(0);
        // SAFETY: the pool keeps the memory alive while the backend lives and cannot change
        // while `&self` encodes; a dispatch runs to completion inside `encode_op`, and
        // validation rejects ops whose written buffers share memory.
        let buf = unsafe { EmuBuffer::from_raw_parts(addr as *mut u8, len) };
        enc.set_buffer(index, &buf, offset);
        Ok(())
    }
    fn weights(&self, enc: &mut EmuEncoder<'a>, index: u32, offset: u64) -> Result<()> {
        let w = self.weights.ok_or_else(|| Error::Backend {
            backend: "metal-emu".into(),
            msg: "an op reads weights but no weight file is open".into(),
        })?;
        // SAFETY: the weight file outlives the dispatch; kernels only read it.
        let buf = unsafe { EmuBuffer::from_raw_parts(w.as_ptr() as *mut u8, w.len()) };
        enc.set_buffer(index, &buf, offset);
        Ok(())
    }
    fn size(&self, raw: u32) -> Option<usize> {
        self.pool.byte_size(raw)
    }
}

/// `n` u32s at the start of pool buffer `raw` (validated to fit).
fn host_u32s<'p>(
    pool: &'p CpuBufferPool,
    ident: &str,
    field: &'static str,
    raw: u32,
    n: usize,
) -> Result<&'p [u32]> {
    // SAFETY: read while no op runs (dispatches complete inside `encode_op`).
    let bytes = unsafe { pool.bytes(raw)? };
    bytes
        .get(..n * 4)
        .and_then(view::u32s)
        .ok_or_else(|| Error::bad_data(ident, field, "buffer too short or misaligned"))
}

/// The data-dependent checks the CPU backend makes, on the inputs as they are now.
fn host_checks(pool: &CpuBufferPool, op: &Op, ident: &str) -> Result<()> {
    match op {
        Op::EmbedGatherNTokens {
            token_ids,
            n_tokens,
            vocab,
            ..
        } => {
            let ids = host_u32s(
                pool,
                ident,
                "token_ids",
                token_ids.raw(),
                *n_tokens as usize,
            )?;
            if let Some((t, id)) = ids.iter().enumerate().find(|(_, &id)| id >= *vocab) {
                return Err(Error::bad_data(
                    ident,
                    "token_ids",
                    format!("token {t}: id {id} >= vocab {vocab}"),
                ));
            }
        }
        Op::MoeGatherIdFuse {
            indices,
            n_tokens,
            n_experts,
            k,
            ..
        } => {
            let n = *n_tokens as usize * *k as usize;
            let idx = host_u32s(pool, ident, "indices", indices.raw(), n)?;
            if let Some((a, e)) = idx.iter().enumerate().find(|(_, &e)| e >= *n_experts) {
                return Err(Error::bad_data(
                    ident,
                    "indices",
                    format!("indices[{a}] = {e} >= n_experts {n_experts}"),
                ));
            }
        }
        Op::MoeBatchedPermuteFuse {
            expert_indices,
            expert_slots,
            bucket_token_idx,
            n_tokens,
            buckets,
            ..
        } => {
            let dev = host_u32s(
                pool,
                ident,
                "expert_indices",
                expert_indices.raw(),
                expert_slots.len(),
            )?;
            if dev != expert_slots.as_slice() {
                return Err(Error::bad_data(
                    ident,
                    "expert_indices",
                    "device copy differs from expert_slots (upload the slots before running)",
                ));
            }
            let total = buckets.last().copied().unwrap_or(0) as usize;
            let tok = host_u32s(
                pool,
                ident,
                "bucket_token_idx",
                bucket_token_idx.raw(),
                total,
            )?;
            if let Some((j, t)) = tok.iter().enumerate().find(|(_, &t)| t >= *n_tokens) {
                return Err(Error::bad_data(
                    ident,
                    "bucket_token_idx",
                    format!("bucket_token_idx[{j}] = {t} >= n_tokens {n_tokens}"),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Prefix a dispatch failure with what was running.
fn context(e: Error, what: &str) -> Error {
    match e {
        Error::Backend { backend, msg } => Error::Backend {
            backend,
            msg: format!("{what}: {msg}"),
        },
        other => other,
    }
}

impl Backend for MetalEmuBackend {
    type Pool = CpuBufferPool;
    type EncodeCtx = EmuEncodeCtx;
    type Config = MetalEmuConfig;

    fn open(config: MetalEmuConfig) -> Result<Self> {
        let weights = match &config.weights {
            Some(p) => Some(WeightFile::open(p)?),
            None => None,
        };
        Ok(Self::with_weights(
            weights,
            config.switches.unwrap_or_else(Switches::from_env),
        ))
    }
    fn name(&self) -> &'static str {
        "metal-emu"
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
    fn begin_encoding(&self) -> EmuEncodeCtx {
        EmuEncodeCtx {
            enc: EmuEncoder::new(),
            started: Instant::now(),
        }
    }
    fn encode_op(&self, op: &Op, ctx: &mut EmuEncodeCtx) -> Result<()> {
        validate_op(op, &self.pool, self.weight_bytes().map(|w| w.len() as u64))?;
        let ident = op_ident(op);
        host_checks(&self.pool, op, &ident)?;
        let b = PoolBindings {
            pool: &self.pool,
            weights: self.weight_bytes(),
        };
        encode_op(&mut ctx.enc, &b, op, &self.switches).map_err(|e| context(e, &ident))
    }
    fn submit_and_wait(&self, ctx: EmuEncodeCtx, label: &str) -> Result<()> {
        self.stats.record(label, ctx.started.elapsed());
        Ok(())
    }
    fn stats(&self) -> &Stats {
        &self.stats
    }
    fn profile_per_op(&self) -> bool {
        self.profile_per_op
    }

    /// As the trait's, with the graph label in dispatch failures.
    fn execute(&self, graph: &Graph, label: &str) -> Result<()> {
        validate(
            graph,
            &self.pool,
            self.weight_bytes().map(|w| w.len() as u64),
        )?;
        let run = |ops: &[Op], label: &str| -> Result<()> {
            let mut ctx = self.begin_encoding();
            for op in ops {
                self.encode_op(op, &mut ctx)?;
            }
            self.submit_and_wait(ctx, label)
        };
        let res = if self.profile_per_op {
            graph
                .ops
                .iter()
                .try_for_each(|op| run(std::slice::from_ref(op), op.label()))
        } else {
            run(&graph.ops, label)
        };
        res.map_err(|e| context(e, &format!("graph `{label}`")))
    }
}
