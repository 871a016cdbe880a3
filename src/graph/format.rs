//! A readable dump of a graph: one line per op with its label, kind and fields.

use super::op::{FieldValue, Op};
use super::Graph;
use std::fmt::Write;

/// One op as `label  Name  field=value ...`; buffers print as `#id:role(access)`.
pub fn format_op(op: &Op) -> String {
    let mut s = format!("{:<28} {:<26}", op.label(), op.name());
    op.visit_fields(|name, v| {
        let _ = match v {
            FieldValue::Buf { raw, access, .. } => write!(s, " {name}=#{raw}({})", access.name()),
            FieldValue::U32(x) => write!(s, " {name}={x}"),
            FieldValue::U64(x) => write!(s, " {name}={x}"),
            FieldValue::F32(x) => write!(s, " {name}={x:e}"),
            FieldValue::Dtype(d) => write!(s, " {name}={}", d.name()),
            FieldValue::Weight(w) => write!(
                s,
                " {name}=q{}g{}[w@{} s@{} b@{} {}]",
                w.bits,
                w.group_size,
                w.w_off,
                w.s_off,
                w.b_off,
                w.scale_dtype.name()
            ),
            FieldValue::Layout(l) => write!(
                s,
                " {name}=experts[{}x{} q{}g{} {}]",
                l.hidden_dim,
                l.inter_dim,
                l.bits,
                l.group_size,
                l.scale_dtype.name()
            ),
            FieldValue::U32List(v) if v.len() > 8 => {
                write!(s, " {name}={:?}..(+{})", &v[..8], v.len() - 8)
            }
            FieldValue::U32List(v) => write!(s, " {name}={v:?}"),
        };
    });
    s
}

impl Graph {
    /// Multi-line dump, one numbered line per op.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for (i, op) in self.ops.iter().enumerate() {
            let _ = writeln!(s, "{i:>4}  {}", format_op(op));
        }
        s
    }
}
