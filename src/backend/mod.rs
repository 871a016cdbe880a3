//! Backends behind one `Backend`/`BufferPool` trait pair, one folder per backend.
//!
//! The traits fix the pool semantics every backend shares (zero-filled `alloc`, prefix
//! `upload`/`download`, `reset_transient`, `commit_plan` from the device-free planner) and the
//! encode/submit split (`begin_encoding`, `encode_op`, `submit_and_wait`, `execute`).

pub mod cpu;
pub mod encoder;
pub mod metal;
#[cfg(feature = "metal-emu")]
pub mod metal_emu;
mod slots;
pub mod stats;

use crate::error::{Error, Result};
use crate::graph::{validate, Buf, BufId, ConcreteBuf, Graph, Op, Role};
use crate::plan::lifetime::PlanReport;
pub use stats::{LabelStats, Stats};

/// What validation and the planner need to know about pool buffers, by raw id.
pub trait PoolInfo {
    /// Number of buffer ids handed out (ids are `0..count`).
    fn count(&self) -> usize;
    /// Byte size of a logical buffer.
    fn byte_size(&self, raw: u32) -> Option<usize>;
    /// Role the buffer was allocated with.
    fn role(&self, raw: u32) -> Option<Role>;
    /// Label given at allocation.
    fn label_of(&self, raw: u32) -> Option<&str>;
    /// Whether ops and uploads may write it (borrowed read-only memory may not).
    fn writable(&self, raw: u32) -> Option<bool>;
    /// Whether the buffer survives `reset_transient` and never aliases (user-persistent).
    fn persistent(&self, raw: u32) -> Option<bool>;
    /// Index of the physical buffer behind the id (ids sharing memory share it).
    fn physical_of(&self, raw: u32) -> Option<u32>;
}

/// A buffer pool: logical ids over physical buffers, possibly aliased after `commit_plan`.
pub trait BufferPool: PoolInfo {
    /// The device-side object behind an id (a host slice on CPU, an `MTLBuffer` on Metal).
    type Handle: ?Sized;

    /// Allocate a zero-filled buffer with the role of the runtime `role`.
    fn alloc_role(
        &mut self,
        bytes: usize,
        role: Role,
        label: &str,
        persistent: bool,
    ) -> Result<u32>;
    /// Allocate a zero-filled buffer aligned to `alignment` (a power of two).
    fn alloc_aligned_role(
        &mut self,
        bytes: usize,
        alignment: usize,
        role: Role,
        label: &str,
        persistent: bool,
    ) -> Result<u32>;

    /// Allocate a zero-filled buffer typed `B`.
    fn alloc<B: ConcreteBuf>(
        &mut self,
        bytes: usize,
        label: &str,
        persistent: bool,
    ) -> Result<BufId<B>> {
        Ok(BufId::from_raw(self.alloc_role(
            bytes,
            B::ROLE,
            label,
            persistent,
        )?))
    }
    /// Allocate a zero-filled, `alignment`-aligned buffer typed `B` (direct-I/O destinations).
    fn alloc_aligned<B: ConcreteBuf>(
        &mut self,
        bytes: usize,
        alignment: usize,
        label: &str,
        persistent: bool,
    ) -> Result<BufId<B>> {
        Ok(BufId::from_raw(self.alloc_aligned_role(
            bytes,
            alignment,
            B::ROLE,
            label,
            persistent,
        )?))
    }

    /// The handle behind `id`; an error for an unknown id or a role `B` does not accept.
    fn handle<B: Buf>(&self, id: BufId<B>) -> Result<&Self::Handle>;
    /// Copy `host` to the start of the buffer (`host` may be shorter; longer is an error).
    fn upload<B: Buf>(&mut self, id: BufId<B>, host: &[u8]) -> Result<()> {
        self.upload_at(id, 0, host)
    }
    /// Copy `host` into the buffer at byte `offset`; the range must fit.
    fn upload_at<B: Buf>(&mut self, id: BufId<B>, offset: usize, host: &[u8]) -> Result<()>;
    /// Copy the first `host.len()` bytes of the buffer out (`host` may be shorter; longer is an error).
    fn download<B: Buf>(&self, id: BufId<B>, host: &mut [u8]) -> Result<()>;
    /// Drop every buffer id after the last one that is persistent or pinned by a plan.
    fn reset_transient(&mut self);
    /// The allocation label of `id` (`"<bad-bufid>"` for an unknown id).
    fn label<B: Buf>(&self, id: BufId<B>) -> &str {
        self.label_of(id.raw()).unwrap_or("<bad-bufid>")
    }
    /// Number of physical buffers currently backing the ids.
    fn physical_buffer_count(&self) -> usize;
    /// Colour the graph's transient buffers by lifetime and share memory between ids of one
    /// colour (`alias = false` keeps one buffer per id and only reports). Coloured ids are pinned.
    fn commit_plan(&mut self, graph: &Graph, alias: bool) -> Result<PlanReport>;
}

/// Check that `id` exists in `pool` and has a role `B` accepts (for pool methods taking typed ids).
pub fn check_id<B: Buf>(
    pool: &(impl PoolInfo + ?Sized),
    id: BufId<B>,
    what: &'static str,
) -> Result<()> {
    let raw = id.raw();
    let role = pool.role(raw).ok_or(Error::PoolBadId {
        what,
        id: raw,
        count: pool.count(),
    })?;
    if !B::ACCEPTS.contains(&role) {
        return Err(Error::Role {
            op: what.to_string(),
            field: "id",
            expected: crate::graph::describe_accepts(B::ACCEPTS),
            actual: role.name().to_string(),
            id: raw,
        });
    }
    Ok(())
}

/// A compute backend: owns a pool and a weight file, encodes ops and runs graphs.
pub trait Backend: Send + Sync {
    type Pool: BufferPool;
    type EncodeCtx;
    type Config;

    fn open(config: Self::Config) -> Result<Self>
    where
        Self: Sized;
    /// Short name (`"cpu"`, `"metal"`), used in errors.
    fn name(&self) -> &'static str;
    fn pool(&self) -> &Self::Pool;
    fn pool_mut(&mut self) -> &mut Self::Pool;
    /// Bytes of the weight file ops address with `weight_off`/`WeightRef`, if one is open.
    fn weight_bytes(&self) -> Option<&[u8]>;

    fn begin_encoding(&self) -> Self::EncodeCtx;
    /// Encode one op. Validation has run; data-dependent failures surface here or at submit.
    fn encode_op(&self, op: &Op, ctx: &mut Self::EncodeCtx) -> Result<()>;
    fn encode_graph(&self, graph: &Graph, ctx: &mut Self::EncodeCtx) -> Result<()> {
        for op in &graph.ops {
            self.encode_op(op, ctx)?;
        }
        Ok(())
    }
    /// Run what was encoded, wait for it, and record its time under `label`.
    fn submit_and_wait(&self, ctx: Self::EncodeCtx, label: &str) -> Result<()>;
    /// Per-label timings recorded by `submit_and_wait`.
    fn stats(&self) -> &Stats;
    /// One op per submission, each timed under its own label (env `MOEFLUX_PROFILE_PER_OP`).
    fn profile_per_op(&self) -> bool;

    /// Validate then run a whole graph as one submission (or one per op in profile mode).
    fn execute(&self, graph: &Graph, label: &str) -> Result<()> {
        validate::validate(
            graph,
            self.pool(),
            self.weight_bytes().map(|w| w.len() as u64),
        )?;
        if self.profile_per_op() {
            for op in &graph.ops {
                let mut ctx = self.begin_encoding();
                self.encode_op(op, &mut ctx)?;
                self.submit_and_wait(ctx, op.label())?;
            }
            return Ok(());
        }
        let mut ctx = self.begin_encoding();
        self.encode_graph(graph, &mut ctx)?;
        self.submit_and_wait(ctx, label)
    }

    /// Marks the start of (prefill chunk, layer); backends with capture windows key them on it.
    fn begin_layer(&mut self, _chunk_idx: usize, _layer_idx: usize) {}
}
