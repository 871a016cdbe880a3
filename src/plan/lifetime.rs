//! Lifetime analysis and greedy colouring of graph buffers; knows nothing of devices.
//!
//! A buffer's live interval is `[first write, last read]` in op order, with two extensions that
//! keep results correct: a buffer read before (or at) its first write carries data in from the
//! host, so it is live from the start; a buffer written but never read is a graph output, so it is
//! live to the end. Only buffers written by some op, not live-in and not persistent, may share
//! memory. Colouring sorts candidates by (first write, id) and reuses the lowest colour whose last
//! member's interval ended strictly before the new first write: deterministic, so every backend
//! gets the same layout. `check_layout` proves a layout safe for a graph independently.

use crate::backend::PoolInfo;
use crate::graph::Graph;
use std::collections::BTreeMap;

/// Inclusive live interval in op indices; `start == -1` means live on entry, `end == n_ops`
/// means live on exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval {
    pub start: i64,
    pub end: i64,
}

impl Interval {
    pub fn overlaps(&self, other: &Interval) -> bool {
        !(self.end < other.start || other.end < self.start)
    }
}

/// Per-buffer facts from one graph.
#[derive(Clone, Debug, Default)]
pub struct Lifetimes {
    /// Interval of every raw id the graph touches.
    pub intervals: BTreeMap<u32, Interval>,
    /// Ids written by some op before any read (candidates for aliasing, before persistence).
    pub written_first: BTreeMap<u32, bool>,
    pub n_ops: usize,
}

/// Compute live intervals from the ops' read and write sets.
pub fn analyze_lifetimes(graph: &Graph) -> Lifetimes {
    #[derive(Default)]
    struct Uses {
        first_read: Option<usize>,
        last_read: Option<usize>,
        first_write: Option<usize>,
        last_write: Option<usize>,
    }
    let mut uses: BTreeMap<u32, Uses> = BTreeMap::new();
    for (i, op) in graph.ops.iter().enumerate() {
        for (_, raw, access) in op.buffers() {
            let u = uses.entry(raw).or_default();
            if access.reads() {
                u.first_read.get_or_insert(i);
                u.last_read = Some(i);
            }
            if access.writes() {
                u.first_write.get_or_insert(i);
                u.last_write = Some(i);
            }
        }
    }
    let n = graph.ops.len() as i64;
    let mut out = Lifetimes {
        n_ops: graph.ops.len(),
        ..Lifetimes::default()
    };
    for (raw, u) in uses {
        // Written strictly before any read: the graph produces its contents.
        let produced = match (u.first_write, u.first_read) {
            (Some(w), Some(r)) => w < r,
            (Some(_), None) => true,
            _ => false,
        };
        let start = if produced {
            u.first_write.unwrap_or(0) as i64
        } else {
            -1
        };
        // A value written and not read again inside the graph is an output: live to the end.
        let end = match (u.last_write, u.last_read) {
            (Some(w), Some(r)) if w < r => r as i64,
            (Some(_), _) => n,
            (None, r) => r.unwrap_or(0) as i64,
        };
        out.intervals.insert(raw, Interval { start, end });
        out.written_first.insert(raw, produced);
    }
    out
}

/// Result of colouring: colour per aliasable id and the byte size of each colour.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Coloring {
    pub bufid_to_color: BTreeMap<u32, u32>,
    pub color_bytes: Vec<usize>,
}

/// Deterministic greedy colouring of the ids for which `colorable` holds.
pub fn greedy_color(
    lt: &Lifetimes,
    sizes: impl Fn(u32) -> usize,
    colorable: impl Fn(u32) -> bool,
) -> Coloring {
    let mut cands: Vec<(i64, u32, Interval)> = lt
        .intervals
        .iter()
        .filter(|(raw, _)| lt.written_first[raw] && colorable(**raw))
        .map(|(raw, iv)| (iv.start, *raw, *iv))
        .collect();
    cands.sort_by_key(|c| (c.0, c.1));
    let mut color_end: Vec<i64> = Vec::new();
    let mut out = Coloring::default();
    for (_, raw, iv) in cands {
        let reuse = color_end.iter().position(|&end| end < iv.start);
        let color = match reuse {
            Some(c) => {
                color_end[c] = iv.end;
                c
            }
            None => {
                color_end.push(iv.end);
                out.color_bytes.push(0);
                color_end.len() - 1
            }
        };
        out.color_bytes[color] = out.color_bytes[color].max(sizes(raw));
        out.bufid_to_color.insert(raw, color as u32);
    }
    out
}

/// Memory figures of a plan, in bytes of pool-owned memory (borrowed memory excluded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanReport {
    /// Sum of all pool-owned logical buffers, as if none shared memory.
    pub logical_bytes: u64,
    /// Sum of distinct physical buffers after colouring.
    pub physical_bytes: u64,
    /// Non-aliasable bytes plus the largest sum of aliasable bytes live at any one op: no
    /// interval-respecting layout of these buffers can use less.
    pub lower_bound_bytes: u64,
    /// Number of ids that now share memory through a colour.
    pub aliased_buffers: u64,
    /// Number of colours (shared physical buffers) created.
    pub colors: u64,
}

/// Lower bound of memory for the aliasable ids: the peak over ops of the summed bytes live there.
pub fn peak_live_bytes(lt: &Lifetimes, coloring: &Coloring, sizes: impl Fn(u32) -> usize) -> u64 {
    let n = lt.n_ops as i64;
    let mut delta = vec![0i64; lt.n_ops + 2];
    for raw in coloring.bufid_to_color.keys() {
        let iv = lt.intervals[raw];
        let (s, e) = (iv.start.max(0), iv.end.min(n - 1).max(iv.start.max(0)));
        delta[s as usize] += sizes(*raw) as i64;
        delta[e as usize + 1] -= sizes(*raw) as i64;
    }
    let mut live = 0i64;
    let mut peak = 0i64;
    for d in delta {
        live += d;
        peak = peak.max(live);
    }
    peak as u64
}

/// Prove that no two ids sharing a physical buffer are live at the same op of `graph`.
/// Returns a description of the first conflict.
pub fn check_layout(graph: &Graph, pool: &(impl PoolInfo + ?Sized)) -> Result<(), String> {
    check_layout_with(
        graph,
        |raw| pool.physical_of(raw).map(u64::from),
        |raw| pool.label_of(raw).unwrap_or("?").to_string(),
    )
}

/// [`check_layout`] for a prospective layout: `memory_of(raw)` names the memory behind each id
/// (ids with equal keys share it).
pub fn check_layout_with(
    graph: &Graph,
    memory_of: impl Fn(u32) -> Option<u64>,
    label_of: impl Fn(u32) -> String,
) -> Result<(), String> {
    let lt = analyze_lifetimes(graph);
    let mut by_memory: BTreeMap<u64, Vec<(u32, Interval)>> = BTreeMap::new();
    for (raw, iv) in &lt.intervals {
        if let Some(m) = memory_of(*raw) {
            by_memory.entry(m).or_default().push((*raw, *iv));
        }
    }
    for members in by_memory.values() {
        for (i, (a, ia)) in members.iter().enumerate() {
            for (b, ib) in &members[i + 1..] {
                if ia.overlaps(ib) {
                    return Err(format!(
                        "buffers {a} (`{}`, live {}..={}) and {b} (`{}`, live {}..={}) share memory",
                        label_of(*a),
                        ia.start,
                        ia.end,
                        label_of(*b),
                        ib.start,
                        ib.end
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{BufId, Op};

    fn add(a: u32, b: u32, out: u32) -> Op {
        Op::ResidualAddNTokens {
            label: format!("add{out}"),
            a: BufId::from_raw(a),
            b: BufId::from_raw(b),
            out: BufId::from_raw(out),
            n_tokens: 1,
            dim: 4,
        }
    }

    #[test]
    fn chain_reuses_colours() {
        // 0,1 inputs; 2 = 0+1; 3 = 2+1; 4 = 3+1 ; 5 = 4+1 (output)
        let g = Graph::from(vec![add(0, 1, 2), add(2, 1, 3), add(3, 1, 4), add(4, 1, 5)]);
        let lt = analyze_lifetimes(&g);
        assert_eq!(lt.intervals[&0], Interval { start: -1, end: 0 });
        assert_eq!(lt.intervals[&2], Interval { start: 0, end: 1 });
        assert_eq!(
            lt.intervals[&5],
            Interval { start: 3, end: 4 },
            "output lives to the end"
        );
        let c = greedy_color(&lt, |_| 16, |_| true);
        // 2:[0,1] 3:[1,2] 4:[2,3] 5:[3,4]: 2 and 4 share, 3 and 5 share.
        assert_eq!(c.bufid_to_color[&2], c.bufid_to_color[&4]);
        assert_eq!(c.bufid_to_color[&3], c.bufid_to_color[&5]);
        assert_ne!(c.bufid_to_color[&2], c.bufid_to_color[&3]);
        assert!(
            !c.bufid_to_color.contains_key(&0),
            "live-in inputs never alias"
        );
        assert_eq!(peak_live_bytes(&lt, &c, |_| 16), 32);
    }
}
