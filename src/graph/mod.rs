//! The op-graph IR: a straight-line list of labelled ops over typed buffer ids.

pub mod buf;
pub mod format;
pub mod op;
pub mod validate;

pub use buf::*;
pub use op::*;

/// A straight-line dispatch list: no shape inference, no folding; ops run in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    pub ops: Vec<Op>,
}

impl Graph {
    pub fn new() -> Self {
        Graph::default()
    }
    pub fn push(&mut self, op: Op) -> &mut Self {
        self.ops.push(op);
        self
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

impl From<Vec<Op>> for Graph {
    fn from(ops: Vec<Op>) -> Self {
        Graph { ops }
    }
}
