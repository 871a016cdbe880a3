//! Kernel names (`{family}_{op}_{variant}`, the `[[host_name]]`s of `shaders/metal/`) and the
//! embedded shader sources, so host and shader spell every name the same way in one place.

use crate::error::{Error, Result};
use crate::graph::WDtype;

/// The shader families: `shaders/metal/<family>.metal`, one per CPU kernel file.
pub const FAMILIES: [&str; 5] = ["norm", "attn", "matvec", "moe", "linear_attn"];

/// `shaders/metal/params.h`, embedded.
pub const PARAMS_H: &str = include_str!("../../../shaders/metal/params.h");
/// `shaders/metal/common.h`, embedded.
pub const COMMON_H: &str = include_str!("../../../shaders/metal/common.h");

/// The source of one family, embedded.
pub fn family_source(family: &str) -> Option<&'static str> {
    Some(match family {
        "norm" => include_str!("../../../shaders/metal/norm.metal"),
        "attn" => include_str!("../../../shaders/metal/attn.metal"),
        "matvec" => include_str!("../../../shaders/metal/matvec.metal"),
        "moe" => include_str!("../../../shaders/metal/moe.metal"),
        "linear_attn" => include_str!("../../../shaders/metal/linear_attn.metal"),
        _ => return None,
    })
}

/// The family a kernel name belongs to (its prefix).
pub fn family_of(kernel: &str) -> Option<&'static str> {
    // `linear_attn` first: it is the only family with an underscore.
    ["linear_attn", "norm", "attn", "matvec", "moe"]
        .into_iter()
        .find(|f| {
            kernel
                .strip_prefix(f)
                .is_some_and(|rest| rest.starts_with('_'))
        })
}

/// One self-contained MSL source for a family: `params.h`, `common.h` and the family file with
/// their `#include "..."` lines removed (Metal's runtime compiler has no include path).
pub fn standalone_source(family: &str) -> Option<String> {
    let body = family_source(family)?;
    let strip = |s: &str| {
        s.lines()
            .map(|l| {
                if l.trim_start().starts_with("#include \"") {
                    ""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    Some(format!(
        "{}\n{}\n{}\n",
        strip(PARAMS_H),
        strip(COMMON_H),
        strip(body)
    ))
}

/// Every kernel defined in `shaders/metal/`, by family.
pub const KERNELS: &[&str] = &[
    "norm_rms_f32",
    "norm_rms_bf16",
    "norm_rms_f16",
    "norm_rms_qk",
    "norm_gated_rms_f32",
    "norm_gated_rms_bf16",
    "norm_gated_rms_f16",
    "attn_rope",
    "attn_split_q_gate",
    "attn_residual_add",
    "attn_sigmoid_gate",
    "attn_kv_append",
    "attn_zero_bytes",
    "attn_sdpa_f1",
    "attn_sdpa_f2",
    "attn_sdpa_tile_f1_d64",
    "attn_sdpa_tile_f1_d128",
    "attn_sdpa_tile_f1_d256",
    "attn_sdpa_tile_f2_d64",
    "attn_sdpa_tile_f2_d128",
    "attn_sdpa_tile_f2_d256",
    "matvec_qmv_b4_f32",
    "matvec_qmv_b4_bf16",
    "matvec_qmv_b4_f16",
    "matvec_qmv_b8_f32",
    "matvec_qmv_b8_bf16",
    "matvec_qmv_b8_f16",
    "matvec_qmm_b4_f32",
    "matvec_qmm_b4_bf16",
    "matvec_qmm_b4_f16",
    "matvec_qmm_b8_f32",
    "matvec_qmm_b8_bf16",
    "matvec_qmm_b8_f16",
    "matvec_embed_b4_f32",
    "matvec_embed_b4_bf16",
    "matvec_embed_b4_f16",
    "matvec_embed_b8_f32",
    "matvec_embed_b8_bf16",
    "matvec_embed_b8_f16",
    "moe_swiglu",
    "moe_softmax_topk",
    "moe_normalize",
    "moe_combine",
    "moe_route_count",
    "moe_route_sort",
    "moe_gather_combine",
    "moe_gather_rows",
    "moe_bucket_accumulate",
    "moe_ggemm_gu_b4_f32",
    "moe_ggemm_gu_b4_bf16",
    "moe_ggemm_gu_b4_f16",
    "moe_ggemm_gu_b8_f32",
    "moe_ggemm_gu_b8_bf16",
    "moe_ggemm_gu_b8_f16",
    "moe_ggemm_down_b4_f32",
    "moe_ggemm_down_b4_bf16",
    "moe_ggemm_down_b4_f16",
    "moe_ggemm_down_b8_f32",
    "moe_ggemm_down_b8_bf16",
    "moe_ggemm_down_b8_f16",
    "moe_gmv_gu_b4_f32",
    "moe_gmv_gu_b4_bf16",
    "moe_gmv_gu_b4_f16",
    "moe_gmv_gu_b8_f32",
    "moe_gmv_gu_b8_bf16",
    "moe_gmv_gu_b8_f16",
    "moe_gmv_down_b4_f32",
    "moe_gmv_down_b4_bf16",
    "moe_gmv_down_b4_f16",
    "moe_gmv_down_b8_f32",
    "moe_gmv_down_b8_bf16",
    "moe_gmv_down_b8_f16",
    "linear_attn_conv1d_f32",
    "linear_attn_conv1d_bf16",
    "linear_attn_conv1d_f16",
    "linear_attn_conv1d_state",
    "linear_attn_decay_beta_f32",
    "linear_attn_decay_beta_bf16",
    "linear_attn_decay_beta_f16",
    "linear_attn_delta_seq",
    "linear_attn_delta_chunk",
];

/// Look `name` up in [`KERNELS`] (so every name the encoder builds is a `&'static str`).
fn known(name: String) -> Result<&'static str> {
    KERNELS
        .iter()
        .copied()
        .find(|k| *k == name)
        .ok_or_else(|| Error::Backend {
            backend: "metal".into(),
            msg: format!(
                "no Metal kernel `{name}` (see shaders/metal/ and metal::kernels::KERNELS)"
            ),
        })
}

/// The variant suffix of a stored float type.
pub fn dtype_suffix(d: WDtype) -> &'static str {
    d.name()
}

/// `{family}_{op}_{dtype}` for kernels templated on a stored float type.
pub fn typed(family_op: &str, d: WDtype) -> Result<&'static str> {
    known(format!("{family_op}_{}", dtype_suffix(d)))
}

/// `{family}_{op}_b{bits}_{dtype}` for the quantized kernels (`bits` 4 or 8).
pub fn quant(family_op: &str, bits: u32, scale_dtype: WDtype) -> Result<&'static str> {
    known(format!("{family_op}_b{bits}_{}", dtype_suffix(scale_dtype)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Kernel names defined in a source: `[[host_name("x")]]` instantiations and non-template
    /// `[[kernel]] void x(` definitions.
    fn defined(src: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut prev = "";
        for line in src.lines() {
            let templated = std::mem::replace(&mut prev, line).starts_with("template <");
            if let Some(at) = line.find("host_name(\"") {
                let rest = &line[at + 11..];
                out.push(rest[..rest.find('"').unwrap()].to_string());
            } else if let (false, Some(at)) = (templated, line.find("[[kernel]] void ")) {
                let rest = &line[at + 16..];
                out.push(rest[..rest.find('(').unwrap()].to_string());
            }
        }
        out
    }

    #[test]
    fn the_table_lists_exactly_the_kernels_of_the_sources() {
        let mut from_src = Vec::new();
        for f in FAMILIES {
            let names = defined(family_source(f).unwrap());
            for n in &names {
                assert_eq!(
                    family_of(n),
                    Some(f),
                    "{n} is defined in {f}.metal but named otherwise"
                );
            }
            from_src.extend(names);
        }
        let src: BTreeSet<_> = from_src.iter().map(String::as_str).collect();
        assert_eq!(src.len(), from_src.len(), "a kernel name is defined twice");
        let table: BTreeSet<_> = KERNELS.iter().copied().collect();
        assert_eq!(table.len(), KERNELS.len(), "a kernel is listed twice");
        assert_eq!(src, table);
    }

    #[test]
    fn names_are_built_from_the_table() {
        assert_eq!(typed("norm_rms", WDtype::Bf16).unwrap(), "norm_rms_bf16");
        assert_eq!(
            quant("matvec_qmv", 8, WDtype::F16).unwrap(),
            "matvec_qmv_b8_f16"
        );
        assert!(quant("matvec_qmv", 3, WDtype::F32).is_err());
        assert_eq!(family_of("linear_attn_delta_seq"), Some("linear_attn"));
        assert_eq!(family_of("attn_rope"), Some("attn"));
        assert_eq!(family_of("bogus_x"), None);
    }

    #[test]
    fn standalone_sources_have_no_includes_but_metal_stdlib() {
        for f in FAMILIES {
            let s = standalone_source(f).unwrap();
            assert!(!s.contains("#include \""), "{f}");
            assert!(s.contains("#include <metal_stdlib>"), "{f}");
            assert!(s.contains("struct MoeGemmParams"), "{f}");
        }
    }
}
