//! Typed buffer ids: `BufId<B>` is a `u32` with a phantom role tag, so wiring a buffer of the
//! wrong role into an op field does not compile.
//!
//! Concrete roles are what a buffer *is* (chosen at allocation); union roles are what an op field
//! *accepts*. A concrete id converts into a union id only through the explicit `From` impls
//! generated below, one per member. The runtime [`Role`] mirrors the concrete markers so the
//! Python boundary can check the same rules on ids that arrive as integers.

use std::fmt;
use std::marker::PhantomData;

mod sealed {
    pub trait Sealed {}
}

/// Marker for a buffer role. Sealed: only the roles declared in this module exist.
pub trait Buf: sealed::Sealed + Copy + Send + Sync + 'static {
    /// Human name of the role or union, used in errors and dumps.
    const NAME: &'static str;
    /// Concrete roles this marker accepts (one for a concrete role, several for a union).
    const ACCEPTS: &'static [Role];
}

/// A role a buffer can be allocated with (the marker types implement this).
pub trait ConcreteBuf: Buf {
    const ROLE: Role;
}

macro_rules! concrete_roles {
    ($( $(#[$doc:meta])* $marker:ident => $variant:ident, $name:literal; )*) => {
        /// Runtime mirror of the concrete role markers.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Role { $( $(#[$doc])* $variant ),* }

        impl Role {
            pub const ALL: &'static [Role] = &[$(Role::$variant),*];
            /// snake_case name, as used from Python (`role="residual"`).
            pub fn name(self) -> &'static str {
                match self { $( Role::$variant => $name ),* }
            }
            pub fn from_name(name: &str) -> Option<Role> {
                match name { $( $name => Some(Role::$variant), )* _ => None }
            }
        }

        $(
            $(#[$doc])*
            #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
            pub struct $marker;
            impl sealed::Sealed for $marker {}
            impl Buf for $marker {
                const NAME: &'static str = $name;
                const ACCEPTS: &'static [Role] = &[Role::$variant];
            }
            impl ConcreteBuf for $marker {
                const ROLE: Role = Role::$variant;
            }
        )*
    };
}

concrete_roles! {
    /// `u32` token ids.
    TokenIdsBuf => TokenIds, "token_ids";
    /// The residual stream, f32 `[n_tokens, hidden]`.
    ResidualBuf => Residual, "residual";
    /// Output of a weighted RMSNorm: the input of projections and of the MoE block.
    NormedBuf => Normed, "normed";
    /// Any other f32 activation: projections, q/k/v, gates, attention output.
    ActBuf => Act, "act";
    /// RoPE inverse frequencies, f32 `[rotary_dim / 2]`.
    InvFreqBuf => InvFreq, "inv_freq";
    /// Full-attention key cache, f32 `[max_len, kv_dim]`.
    KvCacheKBuf => KvCacheK, "kv_cache_k";
    /// Full-attention value cache, f32 `[max_len, kv_dim]`.
    KvCacheVBuf => KvCacheV, "kv_cache_v";
    /// Depthwise-conv history, f32 `[kernel - 1, conv_dim]`.
    ConvStateBuf => ConvState, "conv_state";
    /// GatedDeltaNet recurrent state, f32 `[num_v_heads, key_dim, value_dim]`.
    DeltaStateBuf => DeltaState, "delta_state";
    /// Router logits, f32 `[n_tokens, n_experts]`.
    RouterLogitsBuf => RouterLogits, "router_logits";
    /// Vocabulary logits, f32 `[n_tokens, vocab]`.
    LogitsBuf => Logits, "logits";
    /// Router top-k expert ids, u32 `[n_tokens, k]`.
    RouterIdxBuf => RouterIdx, "router_idx";
    /// Router top-k weights, f32 `[n_tokens, k]`.
    RouterWeightBuf => RouterWeight, "router_weight";
    /// Packed expert blocks (an mmap'd expert file or a slot pool).
    ExpertBaseBuf => ExpertBase, "expert_base";
    /// f32 MoE intermediates (bucket rows, gate/up/act/down scratch).
    MoeScratchBuf => MoeScratch, "moe_scratch";
    /// u32 MoE bookkeeping (bucket slots, token indices, counts).
    MoeIndexBuf => MoeIndex, "moe_index";
    /// The routed-expert sum, f32 `[n_tokens, hidden]`.
    MoeSumBuf => MoeSum, "moe_sum";
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

macro_rules! union_roles {
    ($( $(#[$doc:meta])* $union:ident, $name:literal = [$($member:ident),+]; )*) => {$(
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $union;
        impl sealed::Sealed for $union {}
        impl Buf for $union {
            const NAME: &'static str = $name;
            const ACCEPTS: &'static [Role] = &[$(<$member as ConcreteBuf>::ROLE),+];
        }
        $(
            impl From<BufId<$member>> for BufId<$union> {
                fn from(id: BufId<$member>) -> Self { BufId::from_raw(id.raw()) }
            }
        )+
    )*};
}

union_roles! {
    /// What a matvec reads: normed hidden states, other activations, MoE rows.
    MatvecIn, "MatvecIn" = [NormedBuf, ActBuf, MoeScratchBuf];
    /// What a matvec writes.
    MatvecOut, "MatvecOut" = [ActBuf, RouterLogitsBuf, LogitsBuf, MoeScratchBuf];
    /// What a weighted RMSNorm reads.
    RmsNormIn, "RmsNormIn" = [ResidualBuf, ActBuf];
    /// Element-wise activation operands (SwiGLU of the shared expert or of MoE rows).
    ActIo, "ActIo" = [ActBuf, MoeScratchBuf];
    /// Any buffer at all (`ZeroBuffer`).
    AnyBuf, "AnyBuf" = [TokenIdsBuf, ResidualBuf, NormedBuf, ActBuf, InvFreqBuf, KvCacheKBuf,
        KvCacheVBuf, ConvStateBuf, DeltaStateBuf, RouterLogitsBuf, LogitsBuf, RouterIdxBuf,
        RouterWeightBuf, ExpertBaseBuf, MoeScratchBuf, MoeIndexBuf, MoeSumBuf];
}

/// A buffer id tagged with the role `B` it is used as.
pub struct BufId<B: Buf> {
    raw: u32,
    _role: PhantomData<B>,
}

impl<B: Buf> BufId<B> {
    /// Wrap a raw index. The pool is the only producer of fresh ids; this exists for the
    /// boundary (Python) and for conversions, which check the role at run time.
    pub const fn from_raw(raw: u32) -> Self {
        BufId {
            raw,
            _role: PhantomData,
        }
    }
    pub const fn raw(self) -> u32 {
        self.raw
    }
}

// Manual impls: derives would demand `B: Clone` etc. on the phantom parameter.
impl<B: Buf> Clone for BufId<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Buf> Copy for BufId<B> {}
impl<B: Buf> PartialEq for BufId<B> {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}
impl<B: Buf> Eq for BufId<B> {}
impl<B: Buf> std::hash::Hash for BufId<B> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.raw.hash(state)
    }
}
impl<B: Buf> fmt::Debug for BufId<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", B::NAME, self.raw)
    }
}

/// Does a field typed `B` accept a buffer allocated with `role`?
pub fn accepts<B: Buf>(role: Role) -> bool {
    B::ACCEPTS.contains(&role)
}

/// Human description of the roles a field accepts (for errors).
pub fn describe_accepts(accepts: &[Role]) -> String {
    let names: Vec<&str> = accepts.iter().map(|r| r.name()).collect();
    if names.len() == 1 {
        format!("`{}`", names[0])
    } else {
        format!("one of [{}]", names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_round_trip() {
        for &r in Role::ALL {
            assert_eq!(Role::from_name(r.name()), Some(r));
        }
        assert_eq!(Role::from_name("nope"), None);
    }

    #[test]
    fn union_conversion_keeps_raw_and_membership() {
        let n: BufId<NormedBuf> = BufId::from_raw(7);
        let m: BufId<MatvecIn> = n.into();
        assert_eq!(m.raw(), 7);
        assert!(accepts::<MatvecIn>(Role::Normed));
        assert!(!accepts::<MatvecIn>(Role::Residual));
        assert_eq!(AnyBuf::ACCEPTS.len(), Role::ALL.len());
    }
}
