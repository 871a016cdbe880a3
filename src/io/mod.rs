//! Expert streaming from SSD: per-layer expert files read with parallel `pread` into a budgeted slot cache.
//!
//! `ExpertStore` opens a model's expert files (direct I/O where the filesystem allows), checks their
//! sizes, maps one 2 MiB-aligned slot buffer that a backend pool adopts as an `expert_base`
//! buffer, and serves `acquire(layer, experts) -> slots` from its cache, reading misses on a
//! background thread pool; `prefetch` queues likely-next experts behind the demand reads.

mod file;
mod slots;
mod store;

pub use file::{open_expert_file, ExpertFile, DIRECT_ALIGN};
pub use slots::{SlotMemory, SLOT_ALIGN};
pub use store::{ExpertStore, IoStats, Policy, StoreConfig};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::collections::{HashMap, HashSet};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Rng(u64);
    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const STRIDE: u64 = 8192;

    /// The bytes of expert `e` of layer `layer` in the test files (never all zero).
    fn pattern(layer: u32, e: u32) -> Vec<u8> {
        let mut r = Rng::new(((layer as u64) << 32) | e as u64 | 1 << 20);
        (0..STRIDE).map(|_| (r.next() >> 24) as u8 | 1).collect()
    }

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmpdir() -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "moeflux-io-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    /// One file per layer in `layers`, `n` experts each.
    fn write_files(dir: &Path, layers: &[u32], n: u32) -> Vec<(u32, PathBuf)> {
        layers
            .iter()
            .map(|&l| {
                let p = dir.join(format!("layer_{l:03}.bin"));
                let bytes: Vec<u8> = (0..n).flat_map(|e| pattern(l, e)).collect();
                std::fs::write(&p, bytes).unwrap();
                (l, p)
            })
            .collect()
    }

    fn config(n: u32, slots: usize) -> StoreConfig {
        StoreConfig {
            io_threads: 3,
            ..StoreConfig::new(STRIDE, n, slots)
        }
    }

    fn slot_bytes(store: &ExpertStore, slot: u32) -> Vec<u8> {
        let mem = store.memory();
        // SAFETY: the slot is pinned by the caller, so no reader writes it.
        unsafe {
            std::slice::from_raw_parts(
                mem.ptr().add(slot as usize * STRIDE as usize),
                STRIDE as usize,
            )
        }
        .to_vec()
    }

    fn check_invariants(s: &IoStats, stride: u64) {
        assert_eq!(s.lookups, s.hits + s.misses, "{s:?}");
        assert!(s.prefetch_hits <= s.hits, "{s:?}");
        assert_eq!(
            s.bytes_read,
            (s.demand_reads + s.prefetch_reads) * stride,
            "{s:?}"
        );
        assert_eq!(s.demand_reads, s.misses, "{s:?}");
    }

    /// An independent model of the cache without prefetch: keys with last-use stamps, lookup
    /// counts halved every `period` lookups, the coldest unpinned entry evicted first.
    struct RefCache {
        cap: usize,
        lfu: bool,
        period: u64,
        since: u64,
        clock: u64,
        stamp: HashMap<(u32, u32), u64>,
        freq: HashMap<(u32, u32), u64>,
        hits: u64,
        misses: u64,
        evictions: u64,
    }

    impl RefCache {
        fn acquire(&mut self, layer: u32, experts: &[u32]) {
            let mut missing = Vec::new();
            for &e in experts {
                let k = (layer, e);
                *self.freq.entry(k).or_default() += 1;
                self.since += 1;
                if self.since >= self.period {
                    self.since = 0;
                    self.freq.values_mut().for_each(|f| *f /= 2);
                }
                if self.stamp.contains_key(&k) {
                    self.hits += 1;
                    self.clock += 1;
                    self.stamp.insert(k, self.clock);
                } else {
                    missing.push(k);
                }
            }
            let pinned: HashSet<(u32, u32)> = experts.iter().map(|&e| (layer, e)).collect();
            for k in missing {
                self.misses += 1;
                if self.stamp.len() == self.cap {
                    let victim = *self
                        .stamp
                        .iter()
                        .filter(|(k, _)| !pinned.contains(k))
                        .min_by_key(|(k, &st)| (if self.lfu { self.freq[k] } else { 0 }, st))
                        .unwrap()
                        .0;
                    self.stamp.remove(&victim);
                    self.evictions += 1;
                }
                self.clock += 1;
                self.stamp.insert(k, self.clock);
            }
        }
    }

    #[test]
    fn acquired_slots_hold_the_file_bytes_and_policies_match_a_reference() {
        let dir = tmpdir();
        let (n, layers) = (16u32, [0u32, 2, 3]);
        let files = write_files(&dir.0, &layers, n);
        for (policy, slots, chunk, direct) in [
            (Policy::Lru, 1, 0, true),
            (Policy::Lru, 5, 4096, false),
            (Policy::Lfu, 7, 0, true),
            (Policy::Lfu, 3, 4096, true),
            (Policy::Lfu, 48, 0, false),
        ] {
            let cfg = StoreConfig {
                policy,
                read_chunk: chunk,
                direct_io: direct,
                ..config(n, slots)
            };
            let store = ExpertStore::open(&files, cfg).unwrap();
            assert!(store.direct_io() || !store.notes().is_empty() || !direct);
            let mut reference = RefCache {
                cap: slots,
                lfu: policy == Policy::Lfu,
                period: 8 * slots.max(n as usize) as u64,
                since: 0,
                clock: 0,
                stamp: HashMap::new(),
                freq: HashMap::new(),
                hits: 0,
                misses: 0,
                evictions: 0,
            };
            let mut rng = Rng::new(slots as u64 + 7);
            for _ in 0..300 {
                let layer = layers[rng.below(3) as usize];
                let k = 1 + rng.below(slots.min(4) as u64) as usize;
                let mut experts = Vec::new();
                while experts.len() < k {
                    // Skewed: low expert ids are hot.
                    let e = (rng.below(n as u64) * rng.below(n as u64) / n as u64) as u32;
                    if !experts.contains(&e) {
                        experts.push(e);
                    }
                }
                let got = store.acquire(layer, &experts).unwrap();
                reference.acquire(layer, &experts);
                for (&e, &s) in experts.iter().zip(&got) {
                    assert!(
                        slot_bytes(&store, s) == pattern(layer, e),
                        "layer {layer} expert {e} slot {s}"
                    );
                }
                store.release(&got).unwrap();
            }
            let st = store.stats();
            check_invariants(&st, STRIDE);
            assert_eq!(
                (st.hits, st.misses, st.evictions),
                (reference.hits, reference.misses, reference.evictions),
                "{policy:?} slots {slots}"
            );
            assert!(st.hits > 0 && st.misses > 0 || slots == 48);
            assert!(st.io_busy_s > 0.0 && st.read_s > 0.0);
            assert_eq!(store.cached(), slots.min(reference.stamp.len()));
        }
    }

    #[test]
    fn repeated_experts_share_a_slot_and_bad_requests_are_errors() {
        let dir = tmpdir();
        let files = write_files(&dir.0, &[1], 4);
        let store = ExpertStore::open(&files, config(4, 2)).unwrap();
        let got = store.acquire(1, &[3, 3, 0]).unwrap();
        assert_eq!(got[0], got[1]);
        assert_ne!(got[0], got[2]);
        assert_eq!(store.stats().lookups, 2);
        assert!(
            matches!(store.acquire(1, &[1]), Err(Error::Alloc { .. })),
            "all slots pinned"
        );
        store.release(&got).unwrap();
        assert!(
            matches!(store.acquire(1, &[0, 1, 2]), Err(Error::Alloc { .. })),
            "more than slots"
        );
        assert!(
            matches!(store.acquire(0, &[0]), Err(Error::BadData { .. })),
            "no such layer"
        );
        assert!(
            matches!(store.acquire(1, &[4]), Err(Error::BadData { .. })),
            "no such expert"
        );
        assert!(store.release(&[2]).is_err());
        let again = store.acquire(1, &[1, 2]).unwrap();
        assert!(slot_bytes(&store, again[1]) == pattern(1, 2));
        // Refused acquires change nothing, not even the counters.
        let st = store.stats();
        assert_eq!((st.acquires, st.lookups, st.hits, st.misses), (2, 4, 0, 4));
        check_invariants(&st, STRIDE);
    }

    #[test]
    fn prefetch_is_read_once_counted_and_never_evicts_itself() {
        let dir = tmpdir();
        let files = write_files(&dir.0, &[0, 1], 8);
        for policy in [Policy::Lru, Policy::Lfu] {
            let store = ExpertStore::open(
                &files,
                StoreConfig {
                    policy,
                    ..config(8, 3)
                },
            )
            .unwrap();
            let a = store.acquire(0, &[1, 2]).unwrap();
            store.release(&a).unwrap();
            // 2 and 1 are cached (refreshed, not read); 3 takes the free slot; 4 and 5 would have
            // to evict this call's own entries.
            assert_eq!(store.prefetch(0, &[2, 3, 1, 4, 5]).unwrap(), 1);
            store.wait_idle();
            let b = store.acquire(0, &[3, 1]).unwrap();
            assert!(slot_bytes(&store, b[0]) == pattern(0, 3));
            store.release(&b).unwrap();
            let st = store.stats();
            check_invariants(&st, STRIDE);
            assert_eq!((st.hits, st.misses, st.prefetch_hits), (2, 2, 1));
            assert_eq!((st.prefetch_issued, st.prefetch_reads), (1, 1));
            // A prefetch evicted unused is counted as wasted.
            store.evict_all();
            store.reset_stats();
            assert_eq!(store.prefetch(1, &[0, 1, 2]).unwrap(), 3);
            let c = store.acquire(1, &[5, 6, 7]).unwrap();
            assert!(slot_bytes(&store, c[2]) == pattern(1, 7));
            store.release(&c).unwrap();
            let st = store.stats();
            assert_eq!(st.prefetch_wasted + st.prefetch_cancelled, 3, "{st:?}");
            assert_eq!(st.misses, 3);
            assert_eq!(
                st.bytes_read,
                (st.demand_reads + st.prefetch_reads) * STRIDE
            );
        }
    }

    #[test]
    fn two_threads_share_the_cache() {
        let dir = tmpdir();
        let files = write_files(&dir.0, &[0, 1], 32);
        let store = ExpertStore::open(
            &files,
            StoreConfig {
                read_chunk: 4096,
                ..config(32, 6)
            },
        )
        .unwrap();
        std::thread::scope(|sc| {
            for t in 0..2u64 {
                let store = &store;
                sc.spawn(move || {
                    let mut rng = Rng::new(t + 100);
                    for _ in 0..200 {
                        let layer = rng.below(2) as u32;
                        let experts: Vec<u32> = (0..3).map(|_| rng.below(32) as u32).collect();
                        let got = store.acquire(layer, &experts).unwrap();
                        if rng.below(2) == 0 {
                            store.prefetch(layer, &[rng.below(32) as u32]).unwrap();
                        }
                        for (&e, &s) in experts.iter().zip(&got) {
                            assert!(
                                slot_bytes(store, s) == pattern(layer, e),
                                "layer {layer} expert {e}"
                            );
                        }
                        store.release(&got).unwrap();
                    }
                });
            }
        });
        store.wait_idle();
        let st = store.stats();
        assert_eq!(st.lookups, st.hits + st.misses);
        assert_eq!(
            st.bytes_read,
            (st.demand_reads + st.prefetch_reads) * STRIDE
        );
    }

    #[test]
    fn wrong_file_size_is_rejected_at_open() {
        let dir = tmpdir();
        let files = write_files(&dir.0, &[0, 5], 4);
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&files[1].1)
            .unwrap();
        f.set_len(4 * STRIDE - 4096).unwrap();
        match ExpertStore::open(&files, config(4, 2)) {
            Err(Error::WeightFile { path, msg }) => {
                assert!(path.ends_with("layer_005.bin"), "{path}");
                assert!(msg.contains("28672 bytes, expected 32768"), "{msg}");
            }
            other => panic!("expected a weight-file error, got {other:?}"),
        }
        assert!(matches!(
            ExpertStore::open(&[(0, dir.0.join("missing"))], config(4, 2)),
            Err(Error::Io { .. })
        ));
        assert!(
            ExpertStore::open(&files[..1], StoreConfig::new(1000, 4, 2)).is_err(),
            "unaligned stride"
        );
        assert!(
            ExpertStore::open(&files[..1], config(4, 0)).is_err(),
            "no slots"
        );
    }

    #[test]
    fn a_file_truncated_while_running_is_a_clear_error_and_frees_the_slot() {
        let dir = tmpdir();
        let files = write_files(&dir.0, &[0], 8);
        for direct in [true, false] {
            std::fs::write(
                &files[0].1,
                (0..8).flat_map(|e| pattern(0, e)).collect::<Vec<u8>>(),
            )
            .unwrap();
            let store = ExpertStore::open(
                &files,
                StoreConfig {
                    direct_io: direct,
                    ..config(8, 2)
                },
            )
            .unwrap();
            let a = store.acquire(0, &[6]).unwrap();
            store.release(&a).unwrap();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&files[0].1)
                .unwrap();
            f.set_len(5 * STRIDE + 100).unwrap();
            let err = store.acquire(0, &[0, 5]).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::Io { .. }), "{msg}");
            assert!(
                msg.contains("layer_000.bin")
                    && msg.contains("truncated")
                    && msg.contains("expert 5"),
                "{msg}"
            );
            // Nothing stays pinned and the cache keeps working on the intact part.
            let b = store.acquire(0, &[1, 4]).unwrap();
            assert!(slot_bytes(&store, b[0]) == pattern(0, 1));
            assert!(slot_bytes(&store, b[1]) == pattern(0, 4));
            store.release(&b).unwrap();
            assert!(store.last_error().unwrap().contains("short read"));
            assert!(store.stats().read_errors >= 1);
        }
    }

    #[test]
    fn slot_memory_is_aligned_and_read_pieces_cover_the_expert() {
        let m = SlotMemory::new(3 * 4096 + 5, "t").unwrap();
        assert_eq!(m.ptr() as usize % SLOT_ALIGN, 0);
        assert_eq!(m.len(), 3 * 4096 + 5);
        // SAFETY: fresh anonymous memory of that length.
        let s = unsafe { std::slice::from_raw_parts(m.ptr(), m.len()) };
        assert!(s.iter().all(|&b| b == 0));
        assert!(SlotMemory::new(0, "t").is_err());
        let dir = tmpdir();
        let files = write_files(&dir.0, &[0], 2);
        let (f, _) = open_expert_file(&files[0].1, 2 * STRIDE, "2 experts", false, true).unwrap();
        let buf = file::AlignedBuf::new(STRIDE as usize);
        // SAFETY: `buf` owns STRIDE bytes.
        unsafe { f.read_exact_at(buf.ptr, STRIDE as usize, STRIDE) }.unwrap();
        assert!(buf.as_slice() == &pattern(0, 1)[..]);
        // SAFETY: as above; the read runs past the end of the file.
        let e = unsafe { f.read_exact_at(buf.ptr, STRIDE as usize, STRIDE + 4096) }.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
