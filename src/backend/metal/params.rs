//! `#[repr(C)]` mirrors of the kernel parameter structs in `shaders/metal/params.h`.
//!
//! Width rule (as stated in `params.h`): fields are `u32`/`f32` (4 bytes) or `u64` (8 bytes), the
//! `u64` fields first, so no struct has implicit padding and each can be bound with `set_value`.
//! A test parses `params.h` and checks every struct's size and field offsets against these.

macro_rules! params {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident { $( $field:ident : $ty:ty ),* $(,)? }
    )*) => {
        $(
            $(#[doc = $doc])*
            #[repr(C)]
            #[derive(Clone, Copy, Debug, Default, PartialEq)]
            pub struct $name { $( pub $field: $ty ),* }
        )*

        /// `(struct, size, [(field, offset)])` of every parameter struct, for the layout test.
        pub fn layouts() -> Vec<(&'static str, usize, Vec<(&'static str, usize)>)> {
            vec![$(
                (
                    stringify!($name),
                    std::mem::size_of::<$name>(),
                    vec![$( (stringify!($field), std::mem::offset_of!($name, $field)) ),*],
                ),
            )*]
        }
    };
}

params! {
    /// `norm_rms_*`: `rows` rows of `dim`.
    NormRowsParams { dim: u32, rows: u32, eps: f32 }
    /// `norm_rms_qk`.
    QkNormParams { num_k_heads: u32, key_dim: u32, key_offset: u32, per_token_total: u32, q_scale: f32 }
    /// `norm_gated_rms_*`: `rows` rows of `dim`.
    GatedNormParams { dim: u32, rows: u32, eps: f32 }
    /// `attn_rope`.
    RopeParams { n_tokens: u32, num_heads: u32, head_dim: u32, rotary_dim: u32, start_pos: u32 }
    /// `attn_split_q_gate`.
    SplitParams { head_dim: u32, n: u32 }
    /// Element-wise kernels over `n` elements.
    ElemParams { n: u32 }
    /// `attn_zero_bytes`.
    ZeroParams { n_bytes: u64 }
    /// `attn_sdpa_f{1,2}`.
    SdpaParams {
        n_tokens: u32, num_heads: u32, heads_per_kv: u32, head_dim: u32, kv_dim: u32,
        kv_start: u32, scale: f32, fold: u32,
    }
    /// `matvec_qmv_*`.
    QmvParams { in_dim: u32, out_dim: u32, n_tokens: u32, group_size: u32 }
    /// `matvec_qmm_*`: `Y[m, n] = X[m, k] W[n, k]^T`.
    QmmParams { m: u32, n: u32, k: u32, group_size: u32 }
    /// `matvec_embed_*`.
    EmbedParams { hidden: u32, n_tokens: u32, vocab: u32, group_size: u32 }
    /// `moe_softmax_topk`.
    TopkParams { n_experts: u32, k: u32 }
    /// `moe_normalize`.
    NormalizeParams { n_tokens: u32, k: u32 }
    /// `moe_combine`.
    CombineParams { n_tokens: u32, dim: u32 }
    /// `moe_route_count`, `moe_route_sort`.
    RouteParams { n_assign: u32, n_experts: u32 }
    /// `moe_gather_combine`.
    GatherCombineParams { n_tokens: u32, k: u32, hidden: u32 }
    /// `moe_gather_rows`.
    GatherRowsParams { n_rows: u32, hidden: u32, n_src_rows: u32 }
    /// `moe_bucket_accumulate`.
    BucketAccParams { n_tokens: u32, total: u32, hidden: u32 }
    /// `moe_ggemm_*`: `off` = gate w/s/b, up w/s/b (down uses the first three); `mode` 0..=3 as
    /// in `params.h`.
    MoeGemmParams {
        stride: u64, off: [u64; 6], mode: u32, rows: u32, in_dim: u32, out_dim: u32,
        group_size: u32, k: u32, n_buckets: u32, n_slots: u32, n_src_rows: u32, write_gate: u32,
    }
    /// `linear_attn_conv1d_*`, `linear_attn_conv1d_state`.
    ConvParams { conv_dim: u32, n_tokens: u32 }
    /// `linear_attn_decay_beta_*`.
    DecayParams { num_v_heads: u32, n: u32 }
    /// `linear_attn_delta_seq`, `linear_attn_delta_chunk`.
    DeltaParams { num_v_heads: u32, value_dim: u32, key_dim: u32, k_heads_per_v: u32, n_tokens: u32, chunk: u32 }
}

/// `MoeGemmParams::mode`: gate/up of `MoeGatherIdFuse` (rows in `hids` order).
pub const MOE_MODE_GATHER_GU: u32 = 0;
/// `MoeGemmParams::mode`: down of `MoeGatherIdFuse` (outputs scattered to assignment order).
pub const MOE_MODE_GATHER_DOWN: u32 = 1;
/// `MoeGemmParams::mode`: gate/up of `MoeBatchedPermuteFuse` (buckets).
pub const MOE_MODE_BUCKET_GU: u32 = 2;
/// `MoeGemmParams::mode`: down of `MoeBatchedPermuteFuse`.
pub const MOE_MODE_BUCKET_DOWN: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// One struct of `params.h` as C lays it out: size and `(field, offset)`.
    #[derive(Debug, PartialEq)]
    struct CLayout {
        size: usize,
        fields: Vec<(String, usize)>,
    }

    fn scalar_size(ty: &str) -> usize {
        match ty {
            "uint" | "float" | "int" => 4,
            "ulong" | "long" => 8,
            other => panic!("params.h uses type `{other}`, outside the width rule"),
        }
    }

    /// Parse `struct Name { type field; type arr[N]; };` declarations with C layout rules.
    fn parse_params_h(src: &str) -> BTreeMap<String, CLayout> {
        let code: String = src
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let mut out = BTreeMap::new();
        let mut rest = code.as_str();
        while let Some(at) = rest.find("struct ") {
            rest = &rest[at + 7..];
            let open = rest.find('{').expect("struct without body");
            let name = rest[..open].trim().to_string();
            let close = rest.find("};").expect("unterminated struct");
            let body = &rest[open + 1..close];
            rest = &rest[close + 2..];
            let (mut off, mut align) = (0usize, 1usize);
            let mut fields = Vec::new();
            for decl in body.split(';').map(str::trim).filter(|d| !d.is_empty()) {
                let mut words = decl.split_whitespace();
                let ty = words.next().expect("field type");
                let mut name_part: String = words.collect();
                let size = scalar_size(ty);
                let mut count = 1;
                if let Some(b) = name_part.find('[') {
                    count = name_part[b + 1..name_part.len() - 1]
                        .parse()
                        .expect("array length");
                    name_part.truncate(b);
                }
                off = off.next_multiple_of(size);
                align = align.max(size);
                fields.push((name_part, off));
                off += size * count;
            }
            out.insert(
                name,
                CLayout {
                    size: off.next_multiple_of(align),
                    fields,
                },
            );
        }
        out
    }

    #[test]
    fn rust_structs_match_params_h() {
        let src = include_str!("../../../shaders/metal/params.h");
        let c = parse_params_h(src);
        let rust = layouts();
        assert_eq!(
            c.len(),
            rust.len(),
            "params.h has {:?}",
            c.keys().collect::<Vec<_>>()
        );
        for (name, size, fields) in rust {
            let cl = c
                .get(name)
                .unwrap_or_else(|| panic!("{name} is not in params.h"));
            let rf: Vec<(String, usize)> =
                fields.iter().map(|(f, o)| (f.to_string(), *o)).collect();
            assert_eq!(cl.fields, rf, "{name}: field names or offsets differ");
            assert_eq!(cl.size, size, "{name}: size differs");
        }
    }

    #[test]
    fn shader_static_asserts_match_rust_sizes() {
        let src = include_str!("../../../shaders/metal/params.h");
        let sizes: BTreeMap<&str, usize> = layouts().into_iter().map(|(n, s, _)| (n, s)).collect();
        let mut seen = 0;
        for line in src
            .lines()
            .filter(|l| l.starts_with("static_assert(sizeof("))
        {
            let name = &line["static_assert(sizeof(".len()..line.find(')').unwrap()];
            let n: usize = line
                .split("== ")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(sizes.get(name), Some(&n), "static_assert for {name}");
            seen += 1;
        }
        assert_eq!(
            seen,
            sizes.len(),
            "every struct needs a static_assert in params.h"
        );
    }

    #[test]
    fn no_struct_has_padding() {
        for (name, size, fields) in layouts() {
            let mut end = 0;
            for (f, o) in &fields {
                assert_eq!(*o, end, "{name}.{f} leaves a gap before it");
                end = match (name, *f) {
                    ("MoeGemmParams", "off") => o + 48,
                    ("ZeroParams", _) | ("MoeGemmParams", "stride") => o + 8,
                    _ => o + 4,
                };
            }
            assert_eq!(end, size, "{name} has tail padding");
        }
    }

    #[test]
    fn the_parser_sees_offsets_and_arrays() {
        let c = parse_params_h(
            "struct A { ulong s; ulong o[3]; uint m; uint k; };\nstruct B { uint x; };",
        );
        assert_eq!(
            c["A"].fields,
            vec![
                ("s".into(), 0),
                ("o".into(), 8),
                ("m".into(), 32),
                ("k".into(), 36)
            ]
        );
        assert_eq!(c["A"].size, 40);
        assert_eq!(c["B"].size, 4);
    }
}
