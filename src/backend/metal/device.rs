//! Real Metal through metal-rs: `MetalBufferPool` (shared-storage buffers with the CPU pool's
//! semantics), `MetalKernels` (embedded shaders compiled per family at first use, pipelines
//! cached by name), `MetalEncoder` (the `ComputeEncoder` over an `MTLComputeCommandEncoder`) and
//! `MetalBackend` (one command buffer per graph, per-op profile mode, a GPU-capture window).
//!
//! Compiled on macOS, and anywhere with `--features metal` so that these calls are type-checked
//! on Linux (metal-rs without framework linking; such a build cannot link or run).

use super::encode::{encode_op, Bindings, Switches};
use super::kernels::{family_of, standalone_source, KERNELS};
use crate::backend::encoder::ComputeEncoder;
use crate::backend::slots::{delegate_pool_info, PhysicalMem, SlotTable};
use crate::backend::{check_id, Backend, BufferPool, PoolInfo, Stats};
use crate::error::{Error, Result};
use crate::graph::validate::{op_ident, validate, validate_op};
use crate::graph::{Buf, BufId, ConcreteBuf, Graph, Op, Role};
use crate::plan::lifetime::PlanReport;
use crate::weights::file::WeightFile;
use ::metal::{
    Buffer, BufferRef, CaptureDescriptor, CaptureManager, CommandBuffer, CommandQueue,
    CompileOptions, ComputeCommandEncoder, ComputePipelineState, Device, Library,
    MTLCaptureDestination, MTLCommandBufferStatus, MTLResourceOptions, MTLSize,
};
use std::alloc::Layout;
use std::any::Any;
use std::collections::HashMap;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

extern "C" {
    fn getpagesize() -> std::os::raw::c_int;
}

/// The VM page size (16 KB on Apple Silicon): `newBufferWithBytesNoCopy` needs page-aligned
/// memory and lengths.
fn page() -> usize {
    // SAFETY: a libc call without arguments or side effects.
    let p = unsafe { getpagesize() };
    usize::try_from(p)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(16 * 1024)
}

fn metal_err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "metal".into(),
        msg: msg.into(),
    }
}

// ---- buffer pool --------------------------------------------------------------------------

/// Page-aligned heap memory behind an `alloc_aligned` buffer (freed after its `Buffer`).
struct Aligned {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: plain owned memory; access is governed by the pool (see `MetalBufferPool`).
unsafe impl Send for Aligned {}
unsafe impl Sync for Aligned {}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `Physical::aligned`.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

enum Owner {
    Device,
    Aligned(#[allow(dead_code)] Aligned),
    Borrowed(#[allow(dead_code)] Box<dyn Any + Send + Sync>),
}

/// One `MTLBuffer`; the logical bytes start `offset` bytes into it (borrowed memory is wrapped
/// from its first page).
struct Physical {
    buf: Buffer,
    offset: u64,
    len: usize,
    writable: bool,
    // Declared after `buf`, so the memory outlives the buffer that points at it.
    owner: Owner,
}

impl Physical {
    fn device(device: &Device, bytes: usize) -> Physical {
        let buf = device.new_buffer(bytes.max(1) as u64, MTLResourceOptions::StorageModeShared);
        // SAFETY: a fresh shared buffer of at least `bytes` bytes.
        unsafe { std::ptr::write_bytes(buf.contents().cast::<u8>(), 0, bytes) };
        Physical {
            buf,
            offset: 0,
            len: bytes,
            writable: true,
            owner: Owner::Device,
        }
    }

    fn aligned(device: &Device, bytes: usize, alignment: usize, label: &str) -> Result<Physical> {
        let pg = page();
        let size = bytes.max(1).next_multiple_of(pg);
        let layout =
            Layout::from_size_align(size, alignment.max(pg)).map_err(|e| Error::Alloc {
                label: label.to_string(),
                msg: format!("{bytes} bytes aligned to {alignment}: {e}"),
            })?;
        // SAFETY: non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or_else(|| {
            Error::Alloc {
                label: label.to_string(),
                msg: format!("out of memory allocating {bytes} bytes"),
            }
        })?;
        let buf = device.new_buffer_with_bytes_no_copy(
            ptr.as_ptr().cast(),
            size as u64,
            MTLResourceOptions::StorageModeShared,
            None,
        );
        Ok(Physical {
            buf,
            offset: 0,
            len: bytes,
            writable: true,
            owner: Owner::Aligned(Aligned { ptr, layout }),
        })
    }

    /// Wrap `[ptr, ptr + len)` without copying: the buffer covers the enclosing pages (mapped,
    /// since they hold valid memory) and the data starts `ptr % page()` bytes in.
    ///
    /// # Safety
    /// As for [`MetalBufferPool::register_borrowed_role`].
    unsafe fn borrowed(
        device: &Device,
        ptr: NonNull<u8>,
        len: usize,
        writable: bool,
        owner: Box<dyn Any + Send + Sync>,
    ) -> Physical {
        let addr = ptr.as_ptr() as usize;
        let pg = page();
        let start = addr / pg * pg;
        let end = (addr + len.max(1)).next_multiple_of(pg);
        let buf = device.new_buffer_with_bytes_no_copy(
            start as *const std::ffi::c_void,
            (end - start) as u64,
            MTLResourceOptions::StorageModeShared,
            None,
        );
        Physical {
            buf,
            offset: (addr - start) as u64,
            len,
            writable,
            owner: Owner::Borrowed(owner),
        }
    }
}

// SAFETY: a shared-storage buffer of at least `offset + len` bytes whose memory (device-owned,
// `Aligned`, or borrowed and vouched for by `register_borrowed_role`) outlives it; borrowed memory
// is writable only if its registrant said so.
unsafe impl PhysicalMem for Physical {
    fn len(&self) -> usize {
        self.len
    }
    fn ptr(&self) -> *mut u8 {
        // SAFETY: `offset` lies inside the buffer.
        unsafe { self.buf.contents().cast::<u8>().add(self.offset as usize) }
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn is_borrowed(&self) -> bool {
        matches!(self.owner, Owner::Borrowed(_))
    }
}

/// Metal buffer pool: logical ids over shared-storage `MTLBuffer`s, indirect through
/// `bufid_to_physical` so that `commit_plan` can alias ids of one colour. The semantics are the
/// CPU pool's (the same `SlotTable`): zero-filled `alloc`, prefix `upload`/`download`,
/// `reset_transient`, the same deterministic plan.
pub struct MetalBufferPool {
    device: Device,
    table: SlotTable<Physical>,
}

impl MetalBufferPool {
    pub fn new(device: Device) -> Self {
        MetalBufferPool {
            device,
            table: SlotTable::default(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Adopt `len` bytes at `ptr` without copying (an mmap'd expert file, a NumPy array);
    /// `owner` is kept alive while any id uses the memory. `writable = false` makes uploads and
    /// op writes into it errors.
    ///
    /// # Safety
    /// `ptr` must be valid for reads (and writes if `writable`) of `len` bytes for as long as
    /// `owner` lives, and nothing else may write it while the pool uses it.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn register_borrowed_role(
        &mut self,
        ptr: *mut u8,
        len: usize,
        writable: bool,
        owner: Box<dyn Any + Send + Sync>,
        role: Role,
        label: &str,
        persistent: bool,
    ) -> Result<u32> {
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::Alloc {
            label: label.to_string(),
            msg: "register_borrowed: null pointer".to_string(),
        })?;
        let phys = Physical::borrowed(&self.device, ptr, len, writable, owner);
        Ok(self.table.push(phys, role, label, persistent))
    }

    /// Typed form of [`Self::register_borrowed_role`].
    ///
    /// # Safety
    /// As for [`Self::register_borrowed_role`].
    pub unsafe fn register_borrowed<B: ConcreteBuf>(
        &mut self,
        ptr: *mut u8,
        len: usize,
        writable: bool,
        owner: Box<dyn Any + Send + Sync>,
        label: &str,
        persistent: bool,
    ) -> Result<BufId<B>> {
        self.register_borrowed_role(ptr, len, writable, owner, B::ROLE, label, persistent)
            .map(BufId::from_raw)
    }

    /// The `MTLBuffer` behind `raw` and the byte offset where the id's data starts in it.
    pub fn handle_offset(&self, raw: u32) -> Result<(&BufferRef, u64)> {
        let p = self.table.physical(raw, "handle")?;
        Ok((&p.buf, p.offset))
    }

    /// Index of the physical buffer behind `raw` (ids of one plan colour share it).
    pub fn bufid_to_physical(&self, raw: u32) -> Option<u32> {
        self.physical_of(raw)
    }

    /// Base address of the memory behind an id.
    pub fn address(&self, raw: u32) -> Result<usize> {
        self.table.address(raw)
    }

    /// The bytes of `id` as a mutable slice (a pread destination).
    ///
    /// # Safety
    /// No GPU work may use the buffer while the slice lives, and no other slice of the same
    /// physical buffer may be alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice_u8<B: Buf>(&self, id: BufId<B>) -> Result<&mut [u8]> {
        check_id(self, id, "as_mut_slice_u8")?;
        self.table.bytes_mut(id.raw(), "as_mut_slice_u8")
    }

    /// Disjoint mutable slices of `N` buffers (parallel pread workers).
    ///
    /// # Safety
    /// As for [`Self::as_mut_slice_u8`] per id; the ids must also be distinct and not share a
    /// physical buffer (checked).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slices_u8<B: Buf, const N: usize>(
        &self,
        ids: [BufId<B>; N],
    ) -> Result<[&mut [u8]; N]> {
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                if self.physical_of(a.raw()).is_some()
                    && self.physical_of(a.raw()) == self.physical_of(b.raw())
                {
                    return Err(metal_err(format!(
                        "as_mut_slices_u8: buffers {} and {} share memory",
                        a.raw(),
                        b.raw()
                    )));
                }
            }
        }
        let mut out: [&mut [u8]; N] = std::array::from_fn(|_| <&mut [u8]>::default());
        for (o, id) in out.iter_mut().zip(ids) {
            *o = self.as_mut_slice_u8(id)?;
        }
        Ok(out)
    }
}

delegate_pool_info!(MetalBufferPool, table);

impl BufferPool for MetalBufferPool {
    type Handle = BufferRef;

    fn alloc_role(
        &mut self,
        bytes: usize,
        role: Role,
        label: &str,
        persistent: bool,
    ) -> Result<u32> {
        let phys = Physical::device(&self.device, bytes);
        Ok(self.table.push(phys, role, label, persistent))
    }

    fn alloc_aligned_role(
        &mut self,
        bytes: usize,
        alignment: usize,
        role: Role,
        label: &str,
        persistent: bool,
    ) -> Result<u32> {
        if !alignment.is_power_of_two() || alignment > 1 << 30 {
            return Err(Error::Alloc {
                label: label.to_string(),
                msg: format!(
                    "alignment {alignment} is not a power of two in 1..={}",
                    1u64 << 30
                ),
            });
        }
        let phys = Physical::aligned(&self.device, bytes, alignment, label)?;
        Ok(self.table.push(phys, role, label, persistent))
    }

    fn handle<B: Buf>(&self, id: BufId<B>) -> Result<&BufferRef> {
        check_id(self, id, "handle")?;
        Ok(self.handle_offset(id.raw())?.0)
    }

    fn upload_at<B: Buf>(&mut self, id: BufId<B>, offset: usize, host: &[u8]) -> Result<()> {
        self.table.upload_at(id, offset, host, "upload")
    }

    fn download<B: Buf>(&self, id: BufId<B>, host: &mut [u8]) -> Result<()> {
        self.table.download(id, host)
    }

    fn reset_transient(&mut self) {
        self.table.reset_transient()
    }

    fn physical_buffer_count(&self) -> usize {
        self.table.physical_count()
    }

    fn commit_plan(&mut self, graph: &Graph, alias: bool) -> Result<PlanReport> {
        let device = &self.device;
        self.table
            .commit_plan(graph, alias, |bytes, _| Ok(Physical::device(device, bytes)))
    }
}

// ---- kernels ------------------------------------------------------------------------------

/// The embedded shaders on one device: a family's library is compiled at the first use of any of
/// its kernels, and each pipeline is built once and cached by name.
pub struct MetalKernels {
    device: Device,
    libraries: Mutex<HashMap<&'static str, Library>>,
    pipelines: Mutex<HashMap<String, ComputePipelineState>>,
    compiles: AtomicUsize,
}

impl MetalKernels {
    pub fn new(device: Device) -> Self {
        MetalKernels {
            device,
            libraries: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            compiles: AtomicUsize::new(0),
        }
    }

    /// The pipeline of kernel `name`, compiling its family's library on first use.
    pub fn pipeline(&self, name: &str) -> Result<ComputePipelineState> {
        if let Some(p) = self
            .pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(p.clone());
        }
        let family =
            family_of(name).ok_or_else(|| metal_err(format!("no kernel family for `{name}`")))?;
        let function = {
            // Held while compiling, so concurrent first uses compile a family once.
            let mut libs = self.libraries.lock().unwrap_or_else(|e| e.into_inner());
            if !libs.contains_key(family) {
                let src = standalone_source(family)
                    .ok_or_else(|| metal_err(format!("no source for `{family}`")))?;
                let opts = CompileOptions::new();
                opts.set_fast_math_enabled(true);
                let lib = self
                    .device
                    .new_library_with_source(&src, &opts)
                    .map_err(|e| {
                        metal_err(format!("compiling shaders/metal/{family}.metal: {e}"))
                    })?;
                self.compiles.fetch_add(1, Ordering::Relaxed);
                libs.insert(family, lib);
            }
            libs[family]
                .get_function(name, None)
                .map_err(|e| metal_err(format!("kernel `{name}`: {e}")))?
        };
        let pso = self
            .device
            .new_compute_pipeline_state_with_function(&function)
            .map_err(|e| metal_err(format!("pipeline `{name}`: {e}")))?;
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        Ok(cache.entry(name.to_string()).or_insert(pso).clone())
    }

    /// Build every pipeline now (the backend does this at open, so errors surface early).
    pub fn prefetch_all(&self) -> Result<()> {
        KERNELS
            .iter()
            .try_for_each(|k| self.pipeline(k).map(|_| ()))
    }

    /// Libraries compiled so far (one per family used).
    pub fn compile_count(&self) -> usize {
        self.compiles.load(Ordering::Relaxed)
    }
}

// ---- encoder ------------------------------------------------------------------------------

/// The `ComputeEncoder` over one `MTLComputeCommandEncoder`.
pub struct MetalEncoder<'c> {
    enc: &'c ::metal::ComputeCommandEncoderRef,
    kernels: &'c MetalKernels,
    current: Option<(String, u64)>,
}

impl<'c> MetalEncoder<'c> {
    pub fn new(enc: &'c ::metal::ComputeCommandEncoderRef, kernels: &'c MetalKernels) -> Self {
        MetalEncoder {
            enc,
            kernels,
            current: None,
        }
    }

    fn check_group(&self, tpg: [u32; 3]) -> Result<()> {
        let (name, max) = self
            .current
            .as_ref()
            .ok_or_else(|| metal_err("dispatch without set_pipeline"))?;
        let n = tpg.iter().map(|&v| v as u64).product::<u64>();
        if n == 0 || n > *max {
            return Err(metal_err(format!(
                "kernel `{name}`: {n} threads per threadgroup (the pipeline allows 1..={max})"
            )));
        }
        Ok(())
    }
}

fn size3(v: [u32; 3]) -> MTLSize {
    MTLSize::new(v[0] as u64, v[1] as u64, v[2] as u64)
}

impl ComputeEncoder for MetalEncoder<'_> {
    type Buffer = BufferRef;

    fn set_pipeline(&mut self, name: &str) -> Result<()> {
        let pso = self.kernels.pipeline(name)?;
        self.enc.set_compute_pipeline_state(&pso);
        self.current = Some((name.to_string(), pso.max_total_threads_per_threadgroup()));
        Ok(())
    }
    fn set_buffer(&mut self, index: u32, buffer: &BufferRef, offset: u64) {
        self.enc.set_buffer(index as u64, Some(buffer), offset);
    }
    fn set_bytes(&mut self, index: u32, bytes: &[u8]) {
        self.enc
            .set_bytes(index as u64, bytes.len() as u64, bytes.as_ptr().cast());
    }
    fn set_threadgroup_memory_length(&mut self, index: u32, length: u64) {
        self.enc.set_threadgroup_memory_length(index as u64, length);
    }
    fn dispatch_threadgroups(
        &mut self,
        groups: [u32; 3],
        threads_per_group: [u32; 3],
    ) -> Result<()> {
        self.check_group(threads_per_group)?;
        if groups.contains(&0) {
            return Ok(());
        }
        self.enc
            .dispatch_thread_groups(size3(groups), size3(threads_per_group));
        Ok(())
    }
    fn dispatch_threads(&mut self, threads: [u32; 3], threads_per_group: [u32; 3]) -> Result<()> {
        self.check_group(threads_per_group)?;
        if threads.contains(&0) {
            return Ok(());
        }
        self.enc
            .dispatch_threads(size3(threads), size3(threads_per_group));
        Ok(())
    }
}

// ---- backend ------------------------------------------------------------------------------

/// How to open a [`MetalBackend`].
#[derive(Clone, Debug, Default)]
pub struct MetalConfig {
    /// Weight file (blob path; the manifest is `<path>.json`), if ops read weights.
    pub weights: Option<PathBuf>,
    /// Kernel choices; `None` reads the `MOEFLUX_*` switches from the environment.
    pub switches: Option<Switches>,
}

/// Encoding context: one command buffer per submission, with one compute encoder kept open
/// across its ops (commit fusion).
pub struct MetalEncodeCtx {
    cmdbuf: CommandBuffer,
    enc: Option<ComputeCommandEncoder>,
    started: Instant,
}

/// The GPU-capture window of `MOEFLUX_GPU_CAPTURE=chunk:first_layer:last_layer` (written to
/// `MOEFLUX_GPU_CAPTURE_PATH`, default `moeflux.gputrace`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct CaptureWindow {
    chunk: usize,
    first: usize,
    last: usize,
    path: PathBuf,
}

impl CaptureWindow {
    fn from_env() -> Option<CaptureWindow> {
        let spec = std::env::var("MOEFLUX_GPU_CAPTURE").ok()?;
        let v: Vec<usize> = spec
            .split(':')
            .map(|s| s.trim().parse().ok())
            .collect::<Option<_>>()?;
        let path = std::env::var_os("MOEFLUX_GPU_CAPTURE_PATH")
            .map_or_else(|| "moeflux.gputrace".into(), PathBuf::from);
        match v.as_slice() {
            &[chunk, first, last] if first <= last => Some(CaptureWindow {
                chunk,
                first,
                last,
                path,
            }),
            _ => None,
        }
    }
}

/// The Metal backend: pool, weight file wrapped as one buffer, pipelines, and one command
/// buffer per graph.
pub struct MetalBackend {
    device: Device,
    queue: CommandQueue,
    kernels: MetalKernels,
    pool: MetalBufferPool,
    // Declared before `weights`, so the buffer is released before the mapping it wraps.
    weights_buf: Option<(Buffer, u64)>,
    weights: Option<WeightFile>,
    stats: Stats,
    profile_per_op: bool,
    switches: Switches,
    capture: Option<CaptureWindow>,
    capturing: bool,
}

impl MetalBackend {
    /// Open on the default device with an already opened weight file (or none); every pipeline
    /// is built now, so shader errors surface here.
    pub fn with_weights(weights: Option<WeightFile>, switches: Switches) -> Result<Self> {
        let device = Device::system_default().ok_or_else(|| metal_err("no Metal device found"))?;
        // The weight file is one mmap: wrap its pages as one buffer without copying.
        let weights_buf = weights.as_ref().map(|w| {
            let bytes = w.bytes();
            let addr = bytes.as_ptr() as usize;
            let pg = page();
            let start = addr / pg * pg;
            let end = (addr + bytes.len().max(1)).next_multiple_of(pg);
            let buf = device.new_buffer_with_bytes_no_copy(
                start as *const std::ffi::c_void,
                (end - start) as u64,
                MTLResourceOptions::StorageModeShared,
                None,
            );
            (buf, (addr - start) as u64)
        });
        let kernels = MetalKernels::new(device.clone());
        kernels.prefetch_all()?;
        Ok(MetalBackend {
            queue: device.new_command_queue(),
            pool: MetalBufferPool::new(device.clone()),
            device,
            kernels,
            weights_buf,
            weights,
            stats: Stats::default(),
            profile_per_op: std::env::var_os("MOEFLUX_PROFILE_PER_OP").is_some_and(|v| v != "0"),
            switches,
            capture: CaptureWindow::from_env(),
            capturing: false,
        })
    }

    /// The system's default Metal device.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The pipeline cache.
    pub fn kernels(&self) -> &MetalKernels {
        &self.kernels
    }
    /// The open weight file, if any.
    pub fn weight_file(&self) -> Option<&WeightFile> {
        self.weights.as_ref()
    }
    /// Force the one-op-per-submission profile mode on or off.
    pub fn set_profile_per_op(&mut self, on: bool) {
        self.profile_per_op = on;
    }
    /// The kernel switches in effect.
    pub fn switches(&self) -> Switches {
        self.switches
    }
    /// Change the kernel switches.
    pub fn set_switches(&mut self, switches: Switches) {
        self.switches = switches;
    }

    fn encoder<'c>(&'c self, ctx: &'c mut MetalEncodeCtx) -> MetalEncoder<'c> {
        let enc = ctx
            .enc
            .get_or_insert_with(|| ctx.cmdbuf.new_compute_command_encoder().to_owned());
        MetalEncoder::new(enc, &self.kernels)
    }
}

struct PoolBindings<'a> {
    pool: &'a MetalBufferPool,
    weights: Option<&'a (Buffer, u64)>,
}

impl<'e> Bindings<MetalEncoder<'e>> for PoolBindings<'_> {
    fn buffer(&self, enc: &mut MetalEncoder<'e>, index: u32, raw: u32, offset: u64) -> Result<()> {
        let (buf, base) = self.pool.handle_offset(raw)?;
        enc.set_buffer(index, buf, base + offset);
        Ok(())
    }
    fn weights(&self, enc: &mut MetalEncoder<'e>, index: u32, offset: u64) -> Result<()> {
        let (buf, base) = self
            .weights
            .ok_or_else(|| metal_err("an op reads weights but no weight file is open"))?;
        enc.set_buffer(index, buf, base + offset);
        Ok(())
    }
    fn size(&self, raw: u32) -> Option<usize> {
        self.pool.byte_size(raw)
    }
}

/// The error a failed command buffer carries (`-[MTLCommandBuffer error]`, which metal-rs does
/// not wrap).
fn command_buffer_error(cmdbuf: &CommandBuffer) -> String {
    use objc::runtime::{Object, Sel};
    use objc::Message;
    let describe = || -> Option<String> {
        // SAFETY: a `&CommandBufferRef` is the Objective-C object's address; these are plain
        // getters returning retained-by-owner objects, and nil results are checked.
        unsafe {
            let cb = &*(cmdbuf.as_ref() as *const ::metal::CommandBufferRef as *const Object);
            let err: *mut Object = cb.send_message(Sel::register("error"), ()).ok()?;
            let err = err.as_ref()?;
            let desc: *mut Object = err
                .send_message(Sel::register("localizedDescription"), ())
                .ok()?;
            let desc = desc.as_ref()?;
            let s: *const std::os::raw::c_char =
                desc.send_message(Sel::register("UTF8String"), ()).ok()?;
            (!s.is_null()).then(|| std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned())
        }
    };
    describe().unwrap_or_else(|| "no error description".into())
}

impl Backend for MetalBackend {
    type Pool = MetalBufferPool;
    type EncodeCtx = MetalEncodeCtx;
    type Config = MetalConfig;

    fn open(config: MetalConfig) -> Result<Self> {
        let weights = match &config.weights {
            Some(p) => Some(WeightFile::open(p)?),
            None => None,
        };
        Self::with_weights(weights, config.switches.unwrap_or_else(Switches::from_env))
    }
    fn name(&self) -> &'static str {
        "metal"
    }
    fn pool(&self) -> &MetalBufferPool {
        &self.pool
    }
    fn pool_mut(&mut self) -> &mut MetalBufferPool {
        &mut self.pool
    }
    fn weight_bytes(&self) -> Option<&[u8]> {
        self.weights.as_ref().map(|w| w.bytes())
    }
    fn begin_encoding(&self) -> MetalEncodeCtx {
        MetalEncodeCtx {
            cmdbuf: self.queue.new_command_buffer().to_owned(),
            enc: None,
            started: Instant::now(),
        }
    }
    fn encode_op(&self, op: &Op, ctx: &mut MetalEncodeCtx) -> Result<()> {
        validate_op(op, &self.pool, self.weight_bytes().map(|w| w.len() as u64))?;
        let b = PoolBindings {
            pool: &self.pool,
            weights: self.weights_buf.as_ref(),
        };
        let mut enc = self.encoder(ctx);
        encode_op(&mut enc, &b, op, &self.switches).map_err(|e| match e {
            Error::Backend { backend, msg } => Error::Backend {
                backend,
                msg: format!("{}: {msg}", op_ident(op)),
            },
            other => other,
        })
    }
    fn submit_and_wait(&self, ctx: MetalEncodeCtx, label: &str) -> Result<()> {
        if let Some(enc) = &ctx.enc {
            enc.end_encoding();
        }
        ctx.cmdbuf.set_label(label);
        ctx.cmdbuf.commit();
        ctx.cmdbuf.wait_until_completed();
        self.stats.record(label, ctx.started.elapsed());
        match ctx.cmdbuf.status() {
            MTLCommandBufferStatus::Completed => Ok(()),
            status => Err(metal_err(format!(
                "command buffer of graph `{label}` ended {status:?}: {}",
                command_buffer_error(&ctx.cmdbuf)
            ))),
        }
    }
    fn stats(&self) -> &Stats {
        &self.stats
    }
    fn profile_per_op(&self) -> bool {
        self.profile_per_op
    }

    /// As the trait's, with the graph label in encode failures too.
    fn execute(&self, graph: &Graph, label: &str) -> Result<()> {
        validate(
            graph,
            &self.pool,
            self.weight_bytes().map(|w| w.len() as u64),
        )?;
        let run = |ops: &[Op], label: &str| -> Result<()> {
            let mut ctx = self.begin_encoding();
            for op in ops {
                if let Err(e) = self.encode_op(op, &mut ctx) {
                    // Close the encoder so the command buffer can be released.
                    if let Some(enc) = &ctx.enc {
                        enc.end_encoding();
                    }
                    return Err(e);
                }
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
        res.map_err(|e| match e {
            Error::Backend { backend, msg } if !msg.contains(label) => Error::Backend {
                backend,
                msg: format!("graph `{label}`: {msg}"),
            },
            other => other,
        })
    }

    fn begin_layer(&mut self, chunk_idx: usize, layer_idx: usize) {
        let Some(w) = &self.capture else { return };
        let inside = chunk_idx == w.chunk && (w.first..=w.last).contains(&layer_idx);
        let manager = CaptureManager::shared();
        if inside && !self.capturing {
            let desc = CaptureDescriptor::new();
            desc.set_capture_device(&self.device);
            desc.set_destination(MTLCaptureDestination::GpuTraceDocument);
            desc.set_output_url(&w.path);
            match manager.start_capture(&desc) {
                Ok(()) => self.capturing = true,
                Err(e) => eprintln!("moeflux: GPU capture did not start: {e}"),
            }
        } else if !inside && self.capturing {
            manager.stop_capture();
            self.capturing = false;
            // One window per run.
            self.capture = None;
        }
    }
}
