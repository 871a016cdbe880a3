//! Per-label submission timings shared by all backends.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Accumulated timings of one label.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LabelStats {
    pub count: u64,
    pub total: Duration,
    pub min: Duration,
    pub max: Duration,
}

/// Thread-safe per-label timing table.
#[derive(Debug, Default)]
pub struct Stats {
    table: Mutex<BTreeMap<String, LabelStats>>,
}

impl Stats {
    pub fn record(&self, label: &str, elapsed: Duration) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let entry = table.entry(label.to_string()).or_insert(LabelStats {
            min: Duration::MAX,
            ..LabelStats::default()
        });
        entry.count += 1;
        entry.total += elapsed;
        entry.min = entry.min.min(elapsed);
        entry.max = entry.max.max(elapsed);
    }
    /// A copy of the table, sorted by label.
    pub fn snapshot(&self) -> Vec<(String, LabelStats)> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
    pub fn clear(&self) {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
