//! `ExpertStore`: a budgeted cache of experts in one slot buffer, filled by a background pool of
//! `pread` workers, with demand reads ahead of prefetches and statistics of where time goes.
//!
//! Slot life cycle: `Free -> Loading -> Valid` (or `Failed`). A slot is `Valid` only after every
//! piece of its read completed in full, and only `Valid` slots are returned by `acquire`, so no
//! graph ever runs on a partially read expert. Pinned slots (between `acquire` and `release`) and
//! slots being read are never evicted or written; a queued (not started) load may be cancelled.

use super::file::{open_expert_file, ExpertFile, DIRECT_ALIGN};
use super::slots::SlotMemory;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Which cached expert is evicted first.
///
/// LRU is the default: decode's reuse signals are recent (a layer's experts of the previous token,
/// the next layer's experts the predictive prefetch just read), while LFU ranks a just-loaded expert
/// by its low count and evicts it first. Measured at a 25% budget (`BENCHMARKS.md`, synthetic
/// model with near-random routing): with both prefetches LRU hits 47% of lookups and LFU 44%;
/// with the previous-token prefetch only, LFU 30% and LRU 28%. LFU suits stable popularity skew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Least recently used.
    Lru,
    /// Least frequently used (counts of every lookup of the key, halved periodically so the
    /// cache follows drifting routing), least recent first among equal counts.
    Lfu,
}

impl Policy {
    /// `"lru"` or `"lfu"`.
    pub fn from_name(s: &str) -> Option<Policy> {
        match s {
            "lru" => Some(Policy::Lru),
            "lfu" => Some(Policy::Lfu),
            _ => None,
        }
    }

    /// The policy's name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Lru => "lru",
            Policy::Lfu => "lfu",
        }
    }
}

/// How to open and cache one model's expert files.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Bytes per expert in the files and per slot (a multiple of 4096 for direct I/O).
    pub stride: u64,
    /// Experts per file; each file must be `num_experts * stride` bytes.
    pub num_experts: u32,
    /// Cache capacity in experts (the memory budget divided by `stride`), at least 1.
    pub slots: usize,
    /// Background reader threads.
    pub io_threads: usize,
    pub policy: Policy,
    /// Try `O_DIRECT` (Linux) / `F_NOCACHE` (macOS); falls back to buffered reads with a note.
    pub direct_io: bool,
    /// After a buffered read, tell the kernel to drop the pages (keeps reads cold, RAM bounded).
    pub drop_page_cache: bool,
    /// Split one expert's read into pieces of at most this many bytes, read in parallel
    /// (0: one read per expert). Rounded up to 4096.
    pub read_chunk: usize,
    /// Label of the slot buffer in errors.
    pub label: String,
}

impl StoreConfig {
    /// Defaults for a model with `num_experts` experts of `stride` bytes and `slots` slots:
    /// 8 readers, LRU, direct I/O with page-cache dropping as the fallback, whole-expert reads.
    pub fn new(stride: u64, num_experts: u32, slots: usize) -> StoreConfig {
        StoreConfig {
            stride,
            num_experts,
            slots,
            io_threads: 8,
            policy: Policy::Lru,
            direct_io: true,
            drop_page_cache: true,
            read_chunk: 0,
            label: "expert_slots".into(),
        }
    }
}

/// Counters since open (or the last `reset_stats`). Invariants: `lookups = hits + misses`,
/// `prefetch_hits <= hits`, and once idle, without failed reads or acquires,
/// `bytes_read = (demand_reads + prefetch_reads) * stride` with `demand_reads = misses`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IoStats {
    /// `acquire` calls.
    pub acquires: u64,
    /// Experts asked for by `acquire` (distinct per call).
    pub lookups: u64,
    /// Lookups found cached or already loading.
    pub hits: u64,
    /// Lookups that had to be read.
    pub misses: u64,
    /// Hits on an expert that a prefetch brought in (first use only).
    pub prefetch_hits: u64,
    /// Loads completed for a miss.
    pub demand_reads: u64,
    /// Loads queued by `prefetch`.
    pub prefetch_issued: u64,
    /// Loads completed for a prefetch.
    pub prefetch_reads: u64,
    /// Queued prefetches dropped before they started (their slot was needed).
    pub prefetch_cancelled: u64,
    /// Prefetched experts evicted without ever being used.
    pub prefetch_wasted: u64,
    /// Valid experts evicted.
    pub evictions: u64,
    /// Read pieces that failed.
    pub read_errors: u64,
    /// Bytes read from the files.
    pub bytes_read: u64,
    /// Wall time with at least one read in flight.
    pub io_busy_s: f64,
    /// Sum of the durations of all reads (exceeds `io_busy_s` when reads overlap).
    pub read_s: f64,
    /// Time `acquire` spent waiting for reads or for a slot.
    pub stall_s: f64,
}

impl IoStats {
    /// `hits / lookups` (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        if self.lookups == 0 {
            0.0
        } else {
            self.hits as f64 / self.lookups as f64
        }
    }

    /// Achieved read bandwidth: bytes read per second of busy I/O time, in GB/s (1e9).
    pub fn gb_per_s(&self) -> f64 {
        if self.io_busy_s > 0.0 {
            self.bytes_read as f64 / self.io_busy_s / 1e9
        } else {
            0.0
        }
    }
}

/// Key of a cached expert: (file index, expert).
type Key = (u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Free,
    Loading,
    Valid,
    Failed,
}

#[derive(Debug)]
struct Slot {
    key: Option<Key>,
    phase: Phase,
    pins: u32,
    /// Bumped whenever the slot is given a new load; queued jobs of an older load are dropped.
    gen: u64,
    /// Read pieces not finished yet.
    pending: u32,
    /// A piece of the current load was handed to a reader (the load can no longer be cancelled).
    started: bool,
    /// The current load was issued by `prefetch`.
    by_prefetch: bool,
    /// Brought in by a prefetch and not acquired since.
    unused_prefetch: bool,
    error: Option<String>,
    /// Last use (a tick of the store's clock).
    stamp: u64,
}

#[derive(Debug)]
struct Job {
    slot: u32,
    gen: u64,
    file: u32,
    offset: u64,
    dst: usize,
    len: usize,
}

struct State {
    policy: Policy,
    num_experts: u32,
    slots: Vec<Slot>,
    map: HashMap<Key, u32>,
    free: Vec<u32>,
    /// `(frequency, stamp, slot)` of every slot that may be evicted, coldest first.
    evictable: BTreeSet<(u64, u64, u32)>,
    /// Lookups per key (LFU), indexed `file * num_experts + expert`.
    freq: Vec<u32>,
    lookups_since_aging: u64,
    age_period: u64,
    clock: u64,
    demand_q: VecDeque<Job>,
    prefetch_q: VecDeque<Job>,
    in_flight: usize,
    busy_since: Option<Instant>,
    stats: IoStats,
    last_error: Option<String>,
    shutdown: bool,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn freq_of(&self, key: Key) -> u64 {
        self.freq[key.0 as usize * self.num_experts as usize + key.1 as usize] as u64
    }

    /// The slot's entry in `evictable`, if it may be evicted now.
    fn entry(&self, s: usize) -> Option<(u64, u64, u32)> {
        let sl = &self.slots[s];
        let evictable = sl.pins == 0
            && (sl.phase == Phase::Valid || (sl.phase == Phase::Loading && !sl.started));
        if !evictable {
            return None;
        }
        let f = match self.policy {
            Policy::Lru => 0,
            // An unused prefetch counts as one pending use, so a prefetch batch does not evict itself.
            Policy::Lfu => {
                self.freq_of(sl.key.expect("an evictable slot has a key"))
                    + sl.unused_prefetch as u64
            }
        };
        Some((f, sl.stamp, s as u32))
    }

    /// Apply `f` (which may change slot `s` and the frequency of its key) keeping `evictable` exact.
    fn update<R>(&mut self, s: usize, f: impl FnOnce(&mut State) -> R) -> R {
        if let Some(e) = self.entry(s) {
            self.evictable.remove(&e);
        }
        let r = f(self);
        if let Some(e) = self.entry(s) {
            self.evictable.insert(e);
        }
        r
    }

    fn rebuild_evictable(&mut self) {
        self.evictable = (0..self.slots.len())
            .filter_map(|s| self.entry(s))
            .collect();
    }

    /// Count one lookup of `key` (for LFU) and age the counts every `age_period` lookups.
    fn count_lookup(&mut self, key: Key) {
        let i = key.0 as usize * self.num_experts as usize + key.1 as usize;
        match self.map.get(&key).copied() {
            Some(s) => self.update(s as usize, |st| st.freq[i] = st.freq[i].saturating_add(1)),
            None => self.freq[i] = self.freq[i].saturating_add(1),
        }
        self.lookups_since_aging += 1;
        if self.lookups_since_aging >= self.age_period {
            self.lookups_since_aging = 0;
            for f in &mut self.freq {
                *f /= 2;
            }
            if self.policy == Policy::Lfu {
                self.rebuild_evictable();
            }
        }
    }

    /// Make `s` free: drop its key and any queued jobs (by bumping the generation).
    fn clear_slot(&mut self, s: usize) {
        if let Some(e) = self.entry(s) {
            self.evictable.remove(&e);
        }
        let sl = &mut self.slots[s];
        if let Some(k) = sl.key.take() {
            self.map.remove(&k);
        }
        sl.phase = Phase::Free;
        sl.gen += 1;
        sl.pending = 0;
        sl.started = false;
        sl.by_prefetch = false;
        sl.unused_prefetch = false;
        sl.error = None;
    }

    /// A slot for a new load: a free one, else the coldest evictable one if `admit` accepts its
    /// entry. The slot is returned cleared and is not in `free` or `evictable`.
    fn take_slot(&mut self, admit: impl Fn(&(u64, u64, u32)) -> bool) -> Option<usize> {
        if let Some(s) = self.free.pop() {
            return Some(s as usize);
        }
        let e = *self.evictable.iter().next()?;
        if !admit(&e) {
            return None;
        }
        let s = e.2 as usize;
        let sl = &self.slots[s];
        match sl.phase {
            Phase::Valid => {
                self.stats.evictions += 1;
                if sl.unused_prefetch {
                    self.stats.prefetch_wasted += 1;
                }
            }
            _ => self.stats.prefetch_cancelled += 1,
        }
        self.clear_slot(s);
        Some(s)
    }

    /// Whether an unpinned slot is being read (it will become evictable when the read ends).
    fn reading_unpinned(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.pins == 0 && s.phase == Phase::Loading && s.started)
    }

    /// Queue the read of `key` into slot `s` (already cleared) as a demand or prefetch load.
    fn start_load(
        &mut self,
        s: usize,
        key: Key,
        pins: u32,
        prefetch: bool,
        stride: u64,
        chunk: usize,
    ) {
        let stamp = self.tick();
        let pieces = plan_pieces(stride, chunk);
        let sl = &mut self.slots[s];
        sl.key = Some(key);
        sl.phase = Phase::Loading;
        sl.pins = pins;
        sl.gen += 1;
        sl.pending = pieces.len() as u32;
        sl.started = false;
        sl.by_prefetch = prefetch;
        sl.unused_prefetch = prefetch;
        sl.error = None;
        sl.stamp = stamp;
        let gen = sl.gen;
        self.map.insert(key, s as u32);
        let q = if prefetch {
            &mut self.prefetch_q
        } else {
            &mut self.demand_q
        };
        for (off, len) in pieces {
            q.push_back(Job {
                slot: s as u32,
                gen,
                file: key.0,
                offset: key.1 as u64 * stride + off,
                dst: s * stride as usize + off as usize,
                len,
            });
        }
        if let Some(e) = self.entry(s) {
            self.evictable.insert(e);
        }
    }

    /// Move the queued prefetch jobs of slot `s` to the demand queue (someone now waits on them).
    fn promote(&mut self, s: usize) {
        let gen = self.slots[s].gen;
        let (mine, rest): (VecDeque<Job>, VecDeque<Job>) = std::mem::take(&mut self.prefetch_q)
            .into_iter()
            .partition(|j| j.slot as usize == s && j.gen == gen);
        self.prefetch_q = rest;
        self.demand_q.extend(mine);
    }

    fn busy_now(&self) -> f64 {
        self.stats.io_busy_s + self.busy_since.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }
}

/// `(offset within the expert, length)` of each read piece.
fn plan_pieces(stride: u64, chunk: usize) -> Vec<(u64, usize)> {
    let chunk = if chunk == 0 {
        stride
    } else {
        (chunk.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN) as u64
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < stride {
        let len = chunk.min(stride - at);
        out.push((at, len as usize));
        at += len;
    }
    out
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when jobs are queued or on shutdown.
    work: Condvar,
    /// Signalled when a read piece ends.
    done: Condvar,
    files: Vec<ExpertFile>,
    mem: Arc<SlotMemory>,
    stride: u64,
    read_chunk: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn worker(sh: Arc<Shared>) {
    loop {
        let job = {
            let mut st = sh.lock();
            loop {
                if st.shutdown {
                    return;
                }
                if let Some(j) = st
                    .demand_q
                    .pop_front()
                    .or_else(|| st.prefetch_q.pop_front())
                {
                    let s = j.slot as usize;
                    if st.slots[s].gen != j.gen || st.slots[s].phase != Phase::Loading {
                        continue; // cancelled
                    }
                    if !st.slots[s].started {
                        st.update(s, |st| st.slots[s].started = true);
                    }
                    st.in_flight += 1;
                    if st.in_flight == 1 {
                        st.busy_since = Some(Instant::now());
                    }
                    break j;
                }
                st = sh.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let file = &sh.files[job.file as usize];
        let t0 = Instant::now();
        // SAFETY: the destination lies inside slot `job.slot` of the slot buffer (kept alive by
        // `sh.mem`); the slot is `Loading` and started, so nothing reads it and nothing else
        // writes this piece until the piece is reported done below.
        let res = unsafe { file.read_exact_at(sh.mem.ptr().add(job.dst), job.len, job.offset) };
        let dt = t0.elapsed();
        let mut st = sh.lock();
        st.in_flight -= 1;
        if st.in_flight == 0 {
            if let Some(t) = st.busy_since.take() {
                st.stats.io_busy_s += t.elapsed().as_secs_f64();
            }
        }
        st.stats.read_s += dt.as_secs_f64();
        let s = job.slot as usize;
        match res {
            Ok(()) => st.stats.bytes_read += job.len as u64,
            Err(e) => {
                st.stats.read_errors += 1;
                let key = st.slots[s].key.unwrap_or((job.file, 0));
                let msg = format!(
                    "expert {}: reading {} bytes at offset {}: {e}",
                    key.1, job.len, job.offset
                );
                st.last_error = Some(format!("{}: {msg}", file.path().display()));
                st.slots[s].error.get_or_insert(msg);
            }
        }
        st.slots[s].pending -= 1;
        if st.slots[s].pending == 0 {
            if st.slots[s].error.is_some() {
                st.slots[s].phase = Phase::Failed;
                if st.slots[s].pins == 0 {
                    st.clear_slot(s);
                    st.free.push(s as u32);
                }
            } else {
                if st.slots[s].by_prefetch {
                    st.stats.prefetch_reads += 1;
                } else {
                    st.stats.demand_reads += 1;
                }
                st.update(s, |st| st.slots[s].phase = Phase::Valid);
            }
        }
        drop(st);
        sh.done.notify_all();
    }
}

/// The experts of one model, streamed from their per-layer files into a budgeted slot cache.
pub struct ExpertStore {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Model layer index -> file index.
    layers: BTreeMap<u32, u32>,
    notes: Vec<String>,
    slots: usize,
    num_experts: u32,
    label: String,
}

impl std::fmt::Debug for ExpertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertStore")
            .field("layers", &self.layers.len())
            .field("slots", &self.slots)
            .field("stride", &self.shared.stride)
            .finish()
    }
}

impl ExpertStore {
    /// Open one expert file per MoE layer (`(layer index, path)`), check each is exactly
    /// `num_experts * stride` bytes, map the slot buffer (`slots * stride` bytes, 2 MiB aligned)
    /// and start the readers.
    pub fn open(files: &[(u32, PathBuf)], cfg: StoreConfig) -> Result<ExpertStore> {
        let bad = |msg: String| Error::Alloc {
            label: cfg.label.clone(),
            msg,
        };
        if cfg.stride == 0 || cfg.stride % DIRECT_ALIGN as u64 != 0 {
            return Err(bad(format!(
                "expert stride {} is not a positive multiple of {DIRECT_ALIGN}",
                cfg.stride
            )));
        }
        if cfg.num_experts == 0 || cfg.slots == 0 || cfg.io_threads == 0 {
            return Err(bad(format!(
                "num_experts ({}), slots ({}) and io_threads ({}) must be at least 1",
                cfg.num_experts, cfg.slots, cfg.io_threads
            )));
        }
        let bytes = (cfg.slots as u64)
            .checked_mul(cfg.stride)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| {
                bad(format!(
                    "{} slots of {} bytes overflow",
                    cfg.slots, cfg.stride
                ))
            })?;
        let expected = cfg.num_experts as u64 * cfg.stride;
        let what = format!("{} experts x {} bytes", cfg.num_experts, cfg.stride);
        let mut layers = BTreeMap::new();
        let mut opened = Vec::with_capacity(files.len());
        let mut notes = Vec::new();
        for (layer, path) in files {
            if layers.insert(*layer, opened.len() as u32).is_some() {
                return Err(bad(format!("layer {layer} is given two expert files")));
            }
            let (f, note) =
                open_expert_file(path, expected, &what, cfg.direct_io, cfg.drop_page_cache)?;
            notes.extend(note);
            opened.push(f);
        }
        let mem = Arc::new(SlotMemory::new(bytes, &cfg.label)?);
        let n_keys = opened.len() * cfg.num_experts as usize;
        let slots = (0..cfg.slots)
            .map(|_| Slot {
                key: None,
                phase: Phase::Free,
                pins: 0,
                gen: 0,
                pending: 0,
                started: false,
                by_prefetch: false,
                unused_prefetch: false,
                error: None,
                stamp: 0,
            })
            .collect();
        let state = State {
            policy: cfg.policy,
            num_experts: cfg.num_experts,
            slots,
            map: HashMap::new(),
            free: (0..cfg.slots as u32).rev().collect(),
            evictable: BTreeSet::new(),
            freq: vec![0; n_keys],
            lookups_since_aging: 0,
            // Counts halve after about eight cache turnovers' worth of lookups.
            age_period: 8 * cfg.slots.max(cfg.num_experts as usize) as u64,
            clock: 0,
            demand_q: VecDeque::new(),
            prefetch_q: VecDeque::new(),
            in_flight: 0,
            busy_since: None,
            stats: IoStats::default(),
            last_error: None,
            shutdown: false,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            work: Condvar::new(),
            done: Condvar::new(),
            files: opened,
            mem,
            stride: cfg.stride,
            read_chunk: cfg.read_chunk,
        });
        let mut workers = Vec::with_capacity(cfg.io_threads);
        for i in 0..cfg.io_threads {
            let sh = Arc::clone(&shared);
            let h = std::thread::Builder::new()
                .name(format!("moeflux-io-{i}"))
                .spawn(move || worker(sh))
                .map_err(|e| Error::io("spawning an expert reader thread", e));
            match h {
                Ok(h) => workers.push(h),
                Err(e) => {
                    let mut store = ExpertStore {
                        shared,
                        workers,
                        layers,
                        notes,
                        slots: cfg.slots,
                        num_experts: cfg.num_experts,
                        label: cfg.label,
                    };
                    store.shutdown();
                    return Err(e);
                }
            }
        }
        Ok(ExpertStore {
            shared,
            workers,
            layers,
            notes,
            slots: cfg.slots,
            num_experts: cfg.num_experts,
            label: cfg.label,
        })
    }

    /// The slot buffer, to register in a backend pool: expert `slot` lives at byte
    /// `slot * stride`. Keep the `Arc` as the pool owner so the memory outlives the readers.
    pub fn memory(&self) -> Arc<SlotMemory> {
        Arc::clone(&self.shared.mem)
    }

    /// Capacity in experts.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes per expert and per slot.
    pub fn stride(&self) -> u64 {
        self.shared.stride
    }

    /// Whether every file is read with direct I/O.
    pub fn direct_io(&self) -> bool {
        self.shared.files.iter().all(|f| f.direct())
    }

    /// Why direct I/O is not used, per file where it was wanted and refused.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The model layers with expert files, ascending.
    pub fn layers(&self) -> Vec<u32> {
        self.layers.keys().copied().collect()
    }

    fn file_of(&self, layer: u32) -> Result<u32> {
        self.layers.get(&layer).copied().ok_or_else(|| {
            Error::bad_data(
                &self.label,
                "layer",
                format!(
                    "layer {layer} has no expert file (layers with experts: {:?})",
                    self.layers()
                ),
            )
        })
    }

    /// `experts` without repeats, in first-seen order, each checked `< num_experts`.
    fn distinct(&self, experts: &[u32]) -> Result<Vec<u32>> {
        let n = self.num_experts;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(experts.len());
        for &e in experts {
            if e >= n {
                return Err(Error::bad_data(
                    &self.label,
                    "experts",
                    format!("expert {e} >= num_experts {n}"),
                ));
            }
            if seen.insert(e) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Pin the experts of `layer` in the cache, reading the missing ones (in parallel, ahead of
    /// any prefetch), and wait until all are fully read. Returns each expert's slot, in the order
    /// given (a repeated expert gets the same slot). Every returned slot stays valid and unchanged
    /// until `release`d. A read error or a short read (file truncated) is an `Io` error naming
    /// the file, and nothing stays pinned. More distinct experts than slots is an error.
    pub fn acquire(&self, layer: u32, experts: &[u32]) -> Result<Vec<u32>> {
        let file = self.file_of(layer)?;
        let want = self.distinct(experts)?;
        if want.len() > self.slots {
            return Err(Error::Alloc {
                label: self.label.clone(),
                msg: format!(
                    "layer {layer}: {} distinct experts requested at once but the cache has {} slots",
                    want.len(),
                    self.slots
                ),
            });
        }
        let sh = &*self.shared;
        let mut st = sh.lock();
        // Refuse up front (changing nothing) when the misses cannot all get a slot.
        let hit_slots: Vec<usize> = want
            .iter()
            .filter_map(|&e| st.map.get(&(file, e)).map(|&s| s as usize))
            .collect();
        let misses = want.len() - hit_slots.len();
        let obtainable = st.free.len()
            + (0..self.slots)
                .filter(|&s| {
                    let sl = &st.slots[s];
                    let soon = sl.pins == 0 && sl.phase == Phase::Loading && sl.started;
                    (st.entry(s).is_some() || soon) && !hit_slots.contains(&s)
                })
                .count();
        if misses > obtainable {
            return Err(Error::Alloc {
                label: self.label.clone(),
                msg: format!(
                    "layer {layer}: {misses} experts to read but only {obtainable} of {} slots are not pinned \
                     (release earlier acquires)",
                    self.slots
                ),
            });
        }
        let mut stalled = Duration::ZERO;
        st.stats.acquires += 1;
        let mut got: Vec<Option<usize>> = vec![None; want.len()];
        // Hits first, pinned before any miss picks a victim.
        for (g, &e) in got.iter_mut().zip(&want) {
            let key = (file, e);
            st.stats.lookups += 1;
            st.count_lookup(key);
            if let Some(s) = st.map.get(&key).copied() {
                let s = s as usize;
                st.stats.hits += 1;
                st.update(s, |st| {
                    let now = st.tick();
                    let sl = &mut st.slots[s];
                    sl.pins += 1;
                    sl.stamp = now;
                    if sl.unused_prefetch {
                        sl.unused_prefetch = false;
                        st.stats.prefetch_hits += 1;
                    }
                });
                if st.slots[s].phase == Phase::Loading && st.slots[s].by_prefetch {
                    st.promote(s);
                }
                *g = Some(s);
            }
        }
        let mut queued = false;
        for i in 0..want.len() {
            if got[i].is_some() {
                continue;
            }
            st.stats.misses += 1;
            let s = loop {
                if let Some(s) = st.take_slot(|_| true) {
                    break s;
                }
                if !st.reading_unpinned() {
                    let pinned: Vec<usize> = got.iter().flatten().copied().collect();
                    self.unpin(&mut st, &pinned);
                    return Err(Error::Alloc {
                        label: self.label.clone(),
                        msg: format!(
                            "layer {layer}: no slot free for expert {}: all {} slots are pinned (release earlier acquires)",
                            want[i], self.slots
                        ),
                    });
                }
                if queued {
                    sh.work.notify_all();
                    queued = false;
                }
                let t = Instant::now();
                st = sh.done.wait(st).unwrap_or_else(|e| e.into_inner());
                stalled += t.elapsed();
            };
            st.start_load(s, (file, want[i]), 1, false, sh.stride, sh.read_chunk);
            queued = true;
            got[i] = Some(s);
        }
        if queued {
            sh.work.notify_all();
        }
        let slots: Vec<usize> = got
            .into_iter()
            .map(|g| g.expect("every expert has a slot"))
            .collect();
        while slots.iter().any(|&s| st.slots[s].phase == Phase::Loading) {
            let t = Instant::now();
            st = sh.done.wait(st).unwrap_or_else(|e| e.into_inner());
            stalled += t.elapsed();
        }
        st.stats.stall_s += stalled.as_secs_f64();
        let failed: Vec<String> = slots
            .iter()
            .filter_map(|&s| st.slots[s].error.clone())
            .collect();
        if !failed.is_empty() {
            self.unpin(&mut st, &slots);
            let path = self.shared.files[file as usize]
                .path()
                .display()
                .to_string();
            return Err(Error::io(
                path,
                io::Error::other(format!("layer {layer}: {}", failed.join("; "))),
            ));
        }
        let index: HashMap<u32, u32> = want
            .iter()
            .copied()
            .zip(slots.iter().map(|&s| s as u32))
            .collect();
        let out: Vec<u32> = experts.iter().map(|e| index[e]).collect();
        // One pin per returned entry, so that `release(&out)` balances.
        for &s in &out[..] {
            let s = s as usize;
            st.update(s, |st| st.slots[s].pins += 1);
        }
        self.unpin(&mut st, &slots);
        Ok(out)
    }

    fn unpin(&self, st: &mut State, slots: &[usize]) {
        for &s in slots {
            st.update(s, |st| {
                st.slots[s].pins = st.slots[s].pins.saturating_sub(1)
            });
            if st.slots[s].pins == 0 && st.slots[s].phase == Phase::Failed {
                st.clear_slot(s);
                st.free.push(s as u32);
            }
        }
    }

    /// Unpin slots returned by `acquire` (once per returned entry). Unknown slots are errors.
    pub fn release(&self, slots: &[u32]) -> Result<()> {
        if let Some(&s) = slots.iter().find(|&&s| s as usize >= self.slots) {
            return Err(Error::bad_data(
                &self.label,
                "slots",
                format!("slot {s} >= {} slots", self.slots),
            ));
        }
        let idx: Vec<usize> = slots.iter().map(|&s| s as usize).collect();
        let mut st = self.shared.lock();
        self.unpin(&mut st, &idx);
        Ok(())
    }

    /// Start reading the experts of `layer` that are not cached, behind every demand read, into
    /// free slots or slots colder than the prefetched experts (never pinned ones, never ones this
    /// call touched). Cached ones are marked recently used. Returns the number of reads queued.
    pub fn prefetch(&self, layer: u32, experts: &[u32]) -> Result<usize> {
        let file = self.file_of(layer)?;
        let want = self.distinct(experts)?;
        let sh = &*self.shared;
        let mut st = sh.lock();
        let first = st.clock + 1;
        let mut issued = 0;
        for &e in &want {
            let key = (file, e);
            if let Some(s) = st.map.get(&key).copied() {
                let s = s as usize;
                st.update(s, |st| {
                    let now = st.tick();
                    st.slots[s].stamp = now;
                });
                continue;
            }
            let mine = match st.policy {
                Policy::Lru => 0,
                Policy::Lfu => st.freq_of(key) + 1,
            };
            let Some(s) = st.take_slot(|&(f, stamp, _)| stamp < first && f <= mine) else {
                break;
            };
            st.start_load(s, key, 0, true, sh.stride, sh.read_chunk);
            st.stats.prefetch_issued += 1;
            issued += 1;
        }
        drop(st);
        if issued > 0 {
            sh.work.notify_all();
        }
        Ok(issued)
    }

    /// For each expert of `layer`: cached or being read.
    pub fn resident(&self, layer: u32, experts: &[u32]) -> Result<Vec<bool>> {
        let file = self.file_of(layer)?;
        let st = self.shared.lock();
        Ok(experts
            .iter()
            .map(|&e| st.map.contains_key(&(file, e)))
            .collect())
    }

    /// Number of experts cached (valid) now.
    pub fn cached(&self) -> usize {
        let st = self.shared.lock();
        st.slots.iter().filter(|s| s.phase == Phase::Valid).count()
    }

    /// Wait until no read is queued or running.
    pub fn wait_idle(&self) {
        let sh = &*self.shared;
        let mut st = sh.lock();
        while st.slots.iter().any(|s| s.phase == Phase::Loading) {
            st = sh.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Drop every unpinned cached expert and queued prefetch (after running reads finish);
    /// lookup counts are kept. Returns the number of experts dropped.
    pub fn evict_all(&self) -> usize {
        let sh = &*self.shared;
        let mut st = sh.lock();
        while st.reading_unpinned() {
            st = sh.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let victims: Vec<u32> = st.evictable.iter().map(|e| e.2).collect();
        for &s in &victims {
            st.clear_slot(s as usize);
            st.free.push(s);
        }
        victims.len()
    }

    /// A snapshot of the counters (busy time includes a read running now).
    pub fn stats(&self) -> IoStats {
        let st = self.shared.lock();
        let mut s = st.stats.clone();
        s.io_busy_s = st.busy_now();
        s
    }

    /// Zero the counters (the cache contents stay).
    pub fn reset_stats(&self) {
        let mut st = self.shared.lock();
        st.stats = IoStats::default();
        if st.busy_since.is_some() {
            st.busy_since = Some(Instant::now());
        }
    }

    /// The last read error (also of a prefetch nobody waited for), if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared.lock().last_error.clone()
    }

    fn shutdown(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}
