//! The op vocabulary: 23 ops, declared once in an annotated table.
//!
//! `define_ops!` generates from the table the `Op` enum, `name()`/`label()`, the read and write
//! sets the planner uses (each buffer field is tagged `r`, `w` or `rw`; scalars `_`), a field
//! visitor used by the dump and the Python boundary, a builder from a generic field source, and
//! the exported schema the Python dataclasses are tested against. Adding an op is one table entry
//! plus its validation rule and its kernels.
//!
//! Conventions: activations are f32, ids u32, all dims u32, weight-file offsets and byte offsets
//! u64. Rows of `[n_tokens, dim]` buffers are contiguous.

use super::buf::*;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Element type of a float vector or of quantization scales/biases stored in the weight file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WDtype {
    F32,
    Bf16,
    F16,
}

impl WDtype {
    pub fn size(self) -> u64 {
        match self {
            WDtype::F32 => 4,
            WDtype::Bf16 | WDtype::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            WDtype::F32 => "f32",
            WDtype::Bf16 => "bf16",
            WDtype::F16 => "f16",
        }
    }
    pub fn from_name(s: &str) -> Option<WDtype> {
        match s {
            "f32" | "float32" => Some(WDtype::F32),
            "bf16" | "bfloat16" => Some(WDtype::Bf16),
            "f16" | "float16" => Some(WDtype::F16),
            _ => None,
        }
    }
}

/// An MLX-affine quantized matrix `[out_dim, in_dim]` in the weight file: packed u32 words at
/// `w_off` (`[out, in*bits/32]`), scales at `s_off` and biases at `b_off` (`[out, in/group_size]`,
/// element type `scale_dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightRef {
    pub w_off: u64,
    pub s_off: u64,
    pub b_off: u64,
    pub bits: u32,
    pub group_size: u32,
    pub scale_dtype: WDtype,
}

impl WeightRef {
    /// Bytes of packed words for a `[rows, cols]` matrix.
    pub fn packed_bytes(&self, rows: u64, cols: u64) -> u64 {
        rows * cols * self.bits as u64 / 8
    }
    /// Bytes of the scales (and, equally, of the biases).
    pub fn scale_bytes(&self, rows: u64, cols: u64) -> u64 {
        rows * (cols / self.group_size.max(1) as u64) * self.scale_dtype.size()
    }
}

/// Shape and format of one expert block `[gate.w|gate.s|gate.b|up.w|up.s|up.b|down.w|down.s|down.b]`:
/// gate and up are `[inter_dim, hidden_dim]`, down is `[hidden_dim, inter_dim]`, all quantized with
/// the same bits and group size. The block is packed without padding in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExpertLayout {
    pub hidden_dim: u32,
    pub inter_dim: u32,
    pub bits: u32,
    pub group_size: u32,
    pub scale_dtype: WDtype,
}

/// Byte offsets of the nine parts of an expert block, relative to the block start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertOffsets {
    pub gate: WeightRef,
    pub up: WeightRef,
    pub down: WeightRef,
    pub block_bytes: u64,
}

impl ExpertLayout {
    /// Offsets of gate/up/down within one block (as `WeightRef`s relative to the block start).
    pub fn offsets(&self) -> ExpertOffsets {
        let (h, i) = (self.hidden_dim as u64, self.inter_dim as u64);
        let proto = WeightRef {
            w_off: 0,
            s_off: 0,
            b_off: 0,
            bits: self.bits,
            group_size: self.group_size,
            scale_dtype: self.scale_dtype,
        };
        let mut at = 0u64;
        let mut part = |rows: u64, cols: u64| {
            let w_off = at;
            at += proto.packed_bytes(rows, cols);
            let s_off = at;
            at += proto.scale_bytes(rows, cols);
            let b_off = at;
            at += proto.scale_bytes(rows, cols);
            WeightRef {
                w_off,
                s_off,
                b_off,
                ..proto
            }
        };
        let gate = part(i, h);
        let up = part(i, h);
        let down = part(h, i);
        ExpertOffsets {
            gate,
            up,
            down,
            block_bytes: at,
        }
    }
}

/// How an op uses a buffer field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

impl Access {
    pub fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }
    pub fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "r",
            Access::Write => "w",
            Access::ReadWrite => "rw",
        }
    }
}

/// The kind of one op field, as exported in the schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    Buf {
        accepts: &'static [Role],
        role_name: &'static str,
        access: Access,
    },
    U32,
    U64,
    F32,
    Weight,
    Layout,
    U32List,
    Dtype,
}

impl FieldKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            FieldKind::Buf { .. } => "buf",
            FieldKind::U32 => "u32",
            FieldKind::U64 => "u64",
            FieldKind::F32 => "f32",
            FieldKind::Weight => "weight_ref",
            FieldKind::Layout => "expert_layout",
            FieldKind::U32List => "u32_list",
            FieldKind::Dtype => "dtype",
        }
    }
}

/// A borrowed view of one field's value, for generic walks (dump, Python export, read/write sets).
#[derive(Clone, Copy, Debug)]
pub enum FieldValue<'a> {
    Buf {
        raw: u32,
        accepts: &'static [Role],
        role_name: &'static str,
        access: Access,
    },
    U32(u32),
    U64(u64),
    F32(f32),
    Weight(&'a WeightRef),
    Layout(&'a ExpertLayout),
    U32List(&'a [u32]),
    Dtype(WDtype),
}

/// Where the builder takes field values from (the Python boundary implements it over a dict).
pub trait FieldSource {
    /// A buffer id for `field`; the source checks the id's role against `accepts`.
    fn buf(
        &mut self,
        field: &'static str,
        accepts: &'static [Role],
        role_name: &'static str,
    ) -> Result<u32>;
    fn u32(&mut self, field: &'static str) -> Result<u32>;
    fn u64(&mut self, field: &'static str) -> Result<u64>;
    fn f32(&mut self, field: &'static str) -> Result<f32>;
    fn weight(&mut self, field: &'static str) -> Result<WeightRef>;
    fn layout(&mut self, field: &'static str) -> Result<ExpertLayout>;
    fn u32_list(&mut self, field: &'static str) -> Result<Vec<u32>>;
    fn dtype(&mut self, field: &'static str) -> Result<WDtype>;
}

/// A Rust type usable as an op field.
pub trait FieldType: Sized {
    fn kind(access: Option<Access>) -> FieldKind;
    fn value(&self, access: Option<Access>) -> FieldValue<'_>;
    fn take(src: &mut dyn FieldSource, field: &'static str) -> Result<Self>;
    /// Overwrite with a u32 (only u32 fields accept; others return false).
    fn set_u32(&mut self, _v: u32) -> bool {
        false
    }
}

impl<B: Buf> FieldType for BufId<B> {
    fn kind(access: Option<Access>) -> FieldKind {
        FieldKind::Buf {
            accepts: B::ACCEPTS,
            role_name: B::NAME,
            access: access.expect("buffer field without access tag"),
        }
    }
    fn value(&self, access: Option<Access>) -> FieldValue<'_> {
        FieldValue::Buf {
            raw: self.raw(),
            accepts: B::ACCEPTS,
            role_name: B::NAME,
            access: access.expect("buffer field without access tag"),
        }
    }
    fn take(src: &mut dyn FieldSource, field: &'static str) -> Result<Self> {
        Ok(BufId::from_raw(src.buf(field, B::ACCEPTS, B::NAME)?))
    }
}

macro_rules! scalar_field {
    ($ty:ty, $kind:ident, $method:ident, |$v:ident| $val:expr) => {
        impl FieldType for $ty {
            fn kind(_: Option<Access>) -> FieldKind {
                FieldKind::$kind
            }
            fn value(&self, _: Option<Access>) -> FieldValue<'_> {
                let $v = self;
                FieldValue::$kind($val)
            }
            fn take(src: &mut dyn FieldSource, field: &'static str) -> Result<Self> {
                src.$method(field)
            }
        }
    };
}
impl FieldType for u32 {
    fn kind(_: Option<Access>) -> FieldKind {
        FieldKind::U32
    }
    fn value(&self, _: Option<Access>) -> FieldValue<'_> {
        FieldValue::U32(*self)
    }
    fn take(src: &mut dyn FieldSource, field: &'static str) -> Result<Self> {
        src.u32(field)
    }
    fn set_u32(&mut self, v: u32) -> bool {
        *self = v;
        true
    }
}
scalar_field!(u64, U64, u64, |v| *v);
scalar_field!(f32, F32, f32, |v| *v);
scalar_field!(WDtype, Dtype, dtype, |v| *v);
scalar_field!(WeightRef, Weight, weight, |v| v);
scalar_field!(ExpertLayout, Layout, layout, |v| v);
scalar_field!(Vec<u32>, U32List, u32_list, |v| v.as_slice());

/// Schema of one op, exported to Python.
#[derive(Clone, Debug)]
pub struct OpSchema {
    pub name: &'static str,
    pub doc: &'static str,
    pub fields: Vec<(&'static str, FieldKind)>,
}

macro_rules! access {
    (r) => {
        Some(Access::Read)
    };
    (w) => {
        Some(Access::Write)
    };
    (rw) => {
        Some(Access::ReadWrite)
    };
    (_) => {
        None
    };
}

macro_rules! define_ops {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident { $( $field:ident : $acc:tt $ty:ty ),* $(,)? }
    )*) => {
        /// One op of a graph. Every variant carries a `label` used in errors, dumps and timings.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Op {$(
            $(#[doc = $doc])*
            $name { label: String, $( $field: $ty ),* },
        )*}

        impl Op {
            /// The op's kind name (`"MatvecNTokens"`), shared by errors, traces and kernels.
            pub fn name(&self) -> &'static str {
                match self { $( Op::$name { .. } => stringify!($name), )* }
            }

            /// The label given when the op was built.
            pub fn label(&self) -> &str {
                match self { $( Op::$name { label, .. } => label, )* }
            }

            /// Visit every field but the label, in declaration order.
            pub fn visit_fields(&self, mut f: impl FnMut(&'static str, FieldValue<'_>)) {
                match self {$(
                    #[allow(unused_variables)]
                    Op::$name { label: _, $( $field ),* } => {
                        $( f(stringify!($field), FieldType::value($field, access!($acc))); )*
                    }
                )*}
            }

            /// Patch a u32 field in place (positions and lengths of a replayed decode graph).
            pub fn set_u32(&mut self, field: &str, value: u32) -> Result<()> {
                let ident = format!("{} ({})", self.label(), self.name());
                let found = match self {$(
                    #[allow(unused_variables)]
                    Op::$name { label: _, $( $field ),* } => {
                        match field {
                            $( stringify!($field) => Some(FieldType::set_u32($field, value)), )*
                            _ => None,
                        }
                    }
                )*};
                match found {
                    Some(true) => Ok(()),
                    Some(false) => Err(Error::dims(&ident, "set_u32", format!("field `{field}` is not a u32 field"))),
                    None => Err(Error::dims(&ident, "set_u32", format!("no field `{field}`"))),
                }
            }

            /// Build an op by name, pulling each field from `src`.
            pub fn build(name: &str, label: String, src: &mut dyn FieldSource) -> Result<Op> {
                match name {
                    $( stringify!($name) => Ok(Op::$name {
                        label,
                        $( $field: <$ty as FieldType>::take(src, stringify!($field))?, )*
                    }), )*
                    _ => Err(Error::UnknownOp(name.to_string())),
                }
            }

            /// The schema of all ops, in declaration order.
            pub fn schema() -> Vec<OpSchema> {
                vec![$( OpSchema {
                    name: stringify!($name),
                    doc: concat!($($doc, "\n"),*),
                    fields: vec![ $( (stringify!($field), <$ty as FieldType>::kind(access!($acc))) ),* ],
                }, )*]
            }
        }
    };
}

define_ops! {
    /// `out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w` with `w[dim]` (`weight_dtype`) from the weight file.
    RmsNormBf16NTokens { x: r BufId<RmsNormIn>, weight_off: _ u64, out: w BufId<NormedBuf>,
        dim: _ u32, n_tokens: _ u32, eps: _ f32, weight_dtype: _ WDtype }
    /// In place, per token and key head of a `q|k|v` slot of `per_token_total` floats:
    /// `q = q * rsqrt(sum(q^2) + 1e-6) / sqrt(key_dim)` at offset 0 and
    /// `k = k * rsqrt(sum(k^2) + 1e-6)` at `key_offset_per_token`.
    RmsNormQkNTokens { x: rw BufId<ActBuf>, num_k_heads: _ u32, key_dim: _ u32,
        key_offset_per_token: _ u32, per_token_total: _ u32, n_tokens: _ u32 }
    /// In place, per (token, head): RMSNorm over `head_dim` times a shared `w[head_dim]`.
    RmsNormPerHeadNTokens { x: rw BufId<ActBuf>, weight_off: _ u64, num_heads: _ u32,
        head_dim: _ u32, n_tokens: _ u32, eps: _ f32, weight_dtype: _ WDtype }
    /// In place NeoX rotation of the first `rotary_dim` channels of each head at position
    /// `start_pos + t`: pairs `(i, i + rotary_dim/2)` rotate by `pos * inv_freq[i]`.
    RopeNTokens { x: rw BufId<ActBuf>, inv_freq: r BufId<InvFreqBuf>, n_tokens: _ u32,
        num_heads: _ u32, head_dim: _ u32, rotary_dim: _ u32, start_pos: _ u32 }
    /// De-interleave per-head `[q | gate]` rows of `q_proj` `[T, H, 2*head_dim]`.
    SplitQGate { q_proj: r BufId<ActBuf>, q_out: w BufId<ActBuf>, gate_out: w BufId<ActBuf>,
        num_heads: _ u32, head_dim: _ u32, n_tokens: _ u32 }
    /// `out = a + b` over `[n_tokens, dim]`.
    ResidualAddNTokens { a: r BufId<ResidualBuf>, b: r BufId<ActBuf>, out: w BufId<ResidualBuf>,
        n_tokens: _ u32, dim: _ u32 }
    /// Set the first `n_bytes` of `buf` to zero.
    ZeroBuffer { buf: w BufId<AnyBuf>, n_bytes: _ u64 }
    /// `y[t] = dequant(W) x[t]` for a 4- or 8-bit `[out_dim, in_dim]` matrix; rows of `x` start at
    /// byte `input_off`, rows of `y` at byte `output_off`.
    MatvecNTokens { weight: _ WeightRef, input: r BufId<MatvecIn>, input_off: _ u64,
        output: w BufId<MatvecOut>, output_off: _ u64, in_dim: _ u32, out_dim: _ u32, n_tokens: _ u32 }
    /// `out = silu(gate) * up` over `total` elements.
    SwigluFusedBatched { gate: r BufId<ActIo>, up: r BufId<ActIo>, out: w BufId<ActIo>, total: _ u32 }
    /// Causal attention of token t (position `kv_start + t`) over cache rows `[0, kv_start + t]`,
    /// GQA by `kv_head = h / heads_per_kv`; q and out are `[T, num_heads * head_dim]`.
    SdpaCausalTiled { q: r BufId<ActBuf>, k: r BufId<KvCacheKBuf>, v: r BufId<KvCacheVBuf>,
        attn_out: w BufId<ActBuf>, n_tokens: _ u32, num_heads: _ u32, heads_per_kv: _ u32,
        head_dim: _ u32, kv_dim: _ u32, kv_start: _ u32, kv_len_total: _ u32, softmax_scale: _ f32 }
    /// `x *= sigmoid(gate)` in place over `[n_tokens, dim]`.
    SigmoidGateNTokens { x: rw BufId<ActBuf>, gate: r BufId<ActBuf>, dim: _ u32, n_tokens: _ u32 }
    /// Copy `n_tokens` rows of `kv_dim` into the caches at rows `kv_start..`.
    KvCacheAppendNTokens { k_src: r BufId<ActBuf>, v_src: r BufId<ActBuf>,
        k_cache: rw BufId<KvCacheKBuf>, v_cache: rw BufId<KvCacheVBuf>, kv_dim: _ u32,
        n_tokens: _ u32, kv_start: _ u32 }
    /// Softmax over `n_experts` logits per token, then the top `k` (ties: lower index first).
    MoeSoftmaxTopK { logits: r BufId<RouterLogitsBuf>, indices_out: w BufId<RouterIdxBuf>,
        weights_out: w BufId<RouterWeightBuf>, n_tokens: _ u32, n_experts: _ u32, k: _ u32 }
    /// `w /= sum(w)` per token when the sum is positive.
    MoeNormalizeWeights { weights: rw BufId<RouterWeightBuf>, n_tokens: _ u32, k: _ u32 }
    /// Routed experts over host-built buckets. Bucket `b` holds the assignments
    /// `buckets[b]..buckets[b+1]` (CSR offsets, `n_buckets + 1` entries) and uses the expert block at
    /// `expert_base + expert_slots[b] * expert_stride`; `expert_indices` is the device copy of
    /// `expert_slots`. Assignment `j` takes row `bucket_token_idx[j]` of `bucket_input`, runs the
    /// SwiGLU expert (scratch rows `j` of `bucket_gate/up/act` `[total, inter]` and `bucket_out`
    /// `[total, hidden]`) and adds `bucket_weights[j] * y` to row `bucket_token_idx[j]` of `out_sum`,
    /// which is overwritten (zeroed first) over `[n_tokens, hidden]`.
    MoeBatchedPermuteFuse { expert_base: r BufId<ExpertBaseBuf>, expert_stride: _ u64,
        layout: _ ExpertLayout, expert_indices: r BufId<MoeIndexBuf>, expert_slots: _ Vec<u32>,
        bucket_input: r BufId<NormedBuf>, bucket_gate: w BufId<MoeScratchBuf>,
        bucket_up: w BufId<MoeScratchBuf>, bucket_act: w BufId<MoeScratchBuf>,
        bucket_out: w BufId<MoeScratchBuf>, bucket_token_idx: r BufId<MoeIndexBuf>,
        bucket_weights: r BufId<RouterWeightBuf>, out_sum: w BufId<MoeSumBuf>, n_tokens: _ u32,
        buckets: _ Vec<u32> }
    /// Routed experts with routing on the device: count tokens per expert into `htpe`
    /// `[n_experts]`, gather assignment ids sorted by expert into `hids` `[n_tokens*k]`, run the
    /// grouped gate/up (`gate_mid`, `up_mid` `[n_tokens*k, inter]`) and down (`down_mid`
    /// `[n_tokens*k, hidden]`) GEMMs, and combine the top-k into `out_sum` (overwritten).
    /// Expert `e` lives at `expert_base + e * expert_stride`.
    MoeGatherIdFuse { expert_base: r BufId<ExpertBaseBuf>, expert_stride: _ u64,
        layout: _ ExpertLayout, indices: r BufId<RouterIdxBuf>, weights: r BufId<RouterWeightBuf>,
        mlp_in: r BufId<NormedBuf>, out_sum: w BufId<MoeSumBuf>, htpe: w BufId<MoeIndexBuf>,
        hids: w BufId<MoeIndexBuf>, gate_mid: w BufId<MoeScratchBuf>, up_mid: w BufId<MoeScratchBuf>,
        down_mid: w BufId<MoeScratchBuf>, n_tokens: _ u32, n_experts: _ u32, k: _ u32 }
    /// `hidden_out = h_mid + moe_sum + sigmoid(shared_gate[t]) * shared_out` over `[n_tokens, dim]`.
    MoeCombineResidualNTokens { h_mid: r BufId<ResidualBuf>, moe_sum: r BufId<MoeSumBuf>,
        shared_out: r BufId<ActBuf>, shared_gate: r BufId<ActBuf>, hidden_out: w BufId<ResidualBuf>,
        n_tokens: _ u32, dim: _ u32 }
    /// Depthwise causal conv (kernel 4, weights `[conv_dim, 4]`, tap 3 on the current token) then
    /// SiLU; `conv_state` `[3, conv_dim]` holds the previous 3 inputs, oldest first, and is advanced.
    Conv1dStepNTokens { qkv_in: r BufId<ActBuf>, conv_state: rw BufId<ConvStateBuf>,
        weight_off: _ u64, conv_out: w BufId<ActBuf>, conv_dim: _ u32, n_tokens: _ u32,
        weight_dtype: _ WDtype }
    /// `g_decay = exp(-exp(A_log) * softplus(alpha + dt_bias))`, `beta_gate = sigmoid(beta)`,
    /// over `[n_tokens, num_v_heads]`; `A_log` and `dt_bias` are `[num_v_heads]` (`weight_dtype`).
    ComputeDecayBetaNTokens { alpha_in: r BufId<ActBuf>, beta_in: r BufId<ActBuf>,
        a_log_off: _ u64, dt_bias_off: _ u64, g_decay_out: w BufId<ActBuf>,
        beta_gate_out: w BufId<ActBuf>, num_v_heads: _ u32, n_tokens: _ u32, weight_dtype: _ WDtype }
    /// The GatedDeltaNet recurrence token by token. `conv_out` rows are `q|k|v` with
    /// `num_k_heads = num_v_heads / k_heads_per_v` key heads of `key_dim` and `num_v_heads` value
    /// heads of `value_dim`; value head `h` uses key head `h / k_heads_per_v`. State
    /// `[num_v_heads, key_dim, value_dim]` f32 is updated in place; output `[T, num_v_heads*value_dim]`.
    GatedDeltaNetStepNTokens { state: rw BufId<DeltaStateBuf>, conv_out: r BufId<ActBuf>,
        g_decay: r BufId<ActBuf>, beta_gate: r BufId<ActBuf>, output: w BufId<ActBuf>,
        num_v_heads: _ u32, value_dim: _ u32, k_heads_per_v: _ u32, key_dim: _ u32, n_tokens: _ u32 }
    /// The same recurrence in chunks of `chunk_size` tokens (WY form); same result.
    GatedDeltaNetChunkwise { state: rw BufId<DeltaStateBuf>, conv_out: r BufId<ActBuf>,
        g_decay: r BufId<ActBuf>, beta_gate: r BufId<ActBuf>, output: w BufId<ActBuf>,
        num_v_heads: _ u32, value_dim: _ u32, k_heads_per_v: _ u32, key_dim: _ u32, n_tokens: _ u32,
        chunk_size: _ u32 }
    /// `out = rmsnorm(v) * w * silu(z)` per (token, value head) over `value_dim`.
    GatedRmsNormNTokens { values: r BufId<ActBuf>, z: r BufId<ActBuf>, weight_off: _ u64,
        output: w BufId<ActBuf>, num_v_heads: _ u32, value_dim: _ u32, n_tokens: _ u32, eps: _ f32,
        weight_dtype: _ WDtype }
    /// Dequantize rows `token_ids[t]` of a quantized `[vocab, hidden_dim]` table; ids are checked
    /// against the vocabulary size `vocab`.
    EmbedGatherNTokens { token_ids: r BufId<TokenIdsBuf>, weight: _ WeightRef,
        hidden_out: w BufId<ResidualBuf>, hidden_dim: _ u32, n_tokens: _ u32, vocab: _ u32 }
}

impl Op {
    /// `(field, raw id, access)` for every buffer field.
    pub fn buffers(&self) -> Vec<(&'static str, u32, Access)> {
        let mut out = Vec::with_capacity(8);
        self.visit_fields(|name, v| {
            if let FieldValue::Buf { raw, access, .. } = v {
                out.push((name, raw, access));
            }
        });
        out
    }
    /// Raw ids the op reads (a read-modify-write buffer is in both sets).
    pub fn reads(&self) -> Vec<u32> {
        self.buffers()
            .into_iter()
            .filter(|b| b.2.reads())
            .map(|b| b.1)
            .collect()
    }
    /// Raw ids the op writes.
    pub fn writes(&self) -> Vec<u32> {
        self.buffers()
            .into_iter()
            .filter(|b| b.2.writes())
            .map(|b| b.1)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twenty_three_ops_with_label_free_schema() {
        let s = Op::schema();
        assert_eq!(s.len(), 23);
        for op in &s {
            assert!(op.fields.iter().all(|(f, _)| *f != "label"), "{}", op.name);
            assert!(!op.doc.is_empty(), "{} has no doc", op.name);
        }
    }

    #[test]
    fn read_modify_write_is_in_both_sets() {
        let op = Op::SigmoidGateNTokens {
            label: "g".into(),
            x: BufId::from_raw(3),
            gate: BufId::from_raw(4),
            dim: 8,
            n_tokens: 1,
        };
        assert_eq!(op.reads(), vec![3, 4]);
        assert_eq!(op.writes(), vec![3]);
    }

    #[test]
    fn expert_layout_offsets_pack_nine_parts() {
        let l = ExpertLayout {
            hidden_dim: 128,
            inter_dim: 64,
            bits: 4,
            group_size: 64,
            scale_dtype: WDtype::Bf16,
        };
        let o = l.offsets();
        // gate: 64x128 4-bit = 4096 B words + 2 * 64*2*2 = 256 B scales/biases each
        assert_eq!(o.gate.s_off, 4096);
        assert_eq!(o.gate.b_off, 4096 + 256);
        assert_eq!(o.up.w_off, 4096 + 512);
        assert_eq!(o.block_bytes, 3 * (4096 + 512));
    }
}
