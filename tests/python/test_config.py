"""`moeflux.config.ModelConfig`: parsing of every supported config variant, the derived sizes the
runtime uses, and clear `ConfigError`s for unsupported or inconsistent configs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import moeflux
from moeflux.config import ConfigError, ModelConfig

# The hub config of Qwen3-Next-80B-A3B (legacy keys), trimmed to what matters.
QWEN3_NEXT_80B = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "vocab_size": 151936,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "intermediate_size": 5120,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "full_attention_interval": 4,
    "rope_theta": 10000000,
    "partial_rotary_factor": 0.25,
    "rope_scaling": None,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "max_position_embeddings": 262144,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

TEXT_KEYS = [
    "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    "linear_conv_kernel_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size", "rms_norm_eps", "hidden_act", "attention_bias", "max_position_embeddings",
]  # fmt: skip


def v5(d):
    """The same model as `d` written with transformers-v5 keys (`layer_types`, `rope_parameters`)."""
    d = copy.deepcopy(d)
    k = d.pop("full_attention_interval")
    d["layer_types"] = [
        "linear_attention" if (i + 1) % k else "full_attention" for i in range(d["num_hidden_layers"])
    ]
    d["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": d.pop("rope_theta"),
        "partial_rotary_factor": d.pop("partial_rotary_factor"),
    }
    d.pop("rope_scaling")
    d["dtype"] = d.pop("torch_dtype")
    return d


def qwen35_wrapper(text_overrides=None, **top):
    text = {k: QWEN3_NEXT_80B[k] for k in TEXT_KEYS}
    text.update(num_hidden_layers=40, num_experts=256, num_experts_per_tok=8, vocab_size=248320)
    text["model_type"] = "qwen3_5_moe_text"
    text["layer_types"] = ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(40)]
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    }
    text["eos_token_id"] = 248044
    text.update(text_overrides or {})
    d = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": {"model_type": "qwen3_5_moe_vision", "depth": 27},
        "tie_word_embeddings": False,
    }
    d.update(top)
    return d


def test_qwen3_next_80b_derived_sizes():
    c = ModelConfig.from_dict(QWEN3_NEXT_80B)
    assert c.model_type == "qwen3_next" and c.proj_layout == "qkvz" and not c.wrapped
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (2048, 48, 151936)
    assert c.conv_dim == 2 * 16 * 128 + 32 * 128 == 8192
    assert c.qkvz_dim == 8192 + 4096 and c.ba_dim == 64
    assert c.linear_key_dim == 2048 and c.linear_value_dim == 4096 and c.v_heads_per_k == 2
    assert c.rotary_dim == 64 and c.head_dim == 256
    assert c.q_proj_dim == 2 * 16 * 256 and c.kv_dim == 512 and c.attn_dim == 4096 and c.heads_per_kv == 8
    assert c.full_attention_layers == list(range(3, 48, 4))
    assert c.linear_attention_layers == [i for i in range(48) if i % 4 != 3]
    assert c.moe_layers == list(range(48)) and c.dense_layers == []
    assert [spec.kind for spec in c.layers[:4]] == ["linear_moe"] * 3 + ["full_moe"]
    assert c.layer(3).is_full and c.layer(3).is_moe and c.layer(0).is_linear
    assert c.norm_topk_prob and not c.tie_word_embeddings
    assert c.rms_norm_eps == 1e-6 and c.rope_theta == 1e7 and c.partial_rotary_factor == 0.25
    assert c.eos_token_ids == (151645,) and c.bos_token_id == 151643 and c.torch_dtype == "bfloat16"
    assert c.quantization is None


def test_inv_freq_matches_formula():
    c = ModelConfig.from_dict(QWEN3_NEXT_80B)
    f = c.inv_freq()
    assert f.dtype == np.float32 and f.shape == (32,)
    want = [1.0 / (1e7 ** (2 * i / 64)) for i in range(32)]
    np.testing.assert_allclose(f, want, rtol=1e-6)


def test_v5_keys_parse_like_legacy():
    a = ModelConfig.from_dict(QWEN3_NEXT_80B)
    b = ModelConfig.from_dict(v5(QWEN3_NEXT_80B))
    assert a == b


def test_layer_types_can_be_irregular():
    d = v5(QWEN3_NEXT_80B)
    d["layer_types"][0] = "full_attention"
    c = ModelConfig.from_dict(d)
    assert c.full_attention_layers[:2] == [0, 3]


def test_both_rope_sources_agreeing_is_fine_disagreeing_is_an_error():
    d = v5(QWEN3_NEXT_80B)
    d["rope_theta"] = 10000000
    assert ModelConfig.from_dict(d).rope_theta == 1e7
    d["rope_theta"] = 5000
    with pytest.raises(ConfigError, match="rope_theta"):
        ModelConfig.from_dict(d)


def test_default_partial_rotary_factor_and_head_dim():
    d = copy.deepcopy(QWEN3_NEXT_80B)
    del d["partial_rotary_factor"]
    del d["head_dim"]
    c = ModelConfig.from_dict(d)
    assert c.partial_rotary_factor == 0.25 and c.head_dim == 2048 // 16 and c.rotary_dim == 32


def test_qwen35_wrapper():
    c = ModelConfig.from_dict(qwen35_wrapper())
    assert c.model_type == "qwen3_5_moe" and c.wrapped and c.proj_layout == "separate"
    assert c.num_hidden_layers == 40 and c.vocab_size == 248320 and c.num_experts == 256
    assert c.moe_layers == list(range(40))
    assert c.full_attention_layers == list(range(3, 40, 4))
    assert c.norm_topk_prob  # Qwen3.5 always renormalises
    assert c.rope_theta == 1e7 and c.rotary_dim == 64
    assert c.eos_token_ids == (248044,)


def test_qwen35_flat_text_config():
    wrapped = qwen35_wrapper()
    flat = dict(wrapped["text_config"])
    c = ModelConfig.from_dict(flat)
    w = ModelConfig.from_dict(wrapped)
    assert c.model_type == "qwen3_5_moe_text" and not c.wrapped and c.proj_layout == "separate"
    assert c.layers == w.layers and c.conv_dim == w.conv_dim and c.hidden_size == w.hidden_size


def test_qwen35_ignores_qwen3_next_dense_keys():
    c = ModelConfig.from_dict(qwen35_wrapper({"mlp_only_layers": [0], "decoder_sparse_step": 2}))
    assert c.dense_layers == []


def test_dense_layers_from_mlp_only_layers_and_sparse_step():
    d = dict(QWEN3_NEXT_80B, num_hidden_layers=8, mlp_only_layers=[0, 5], decoder_sparse_step=2)
    c = ModelConfig.from_dict(d)
    # dense iff in mlp_only_layers or (i + 1) % step != 0
    assert c.moe_layers == [1, 3, 7]
    assert c.dense_layers == [0, 2, 4, 5, 6]
    assert c.layer(3).kind == "full_moe" and c.layer(2).kind == "linear_dense"
    assert c.intermediate_size == 5120


def test_no_experts_means_all_dense():
    d = dict(QWEN3_NEXT_80B, num_experts=0)
    c = ModelConfig.from_dict(d)
    assert c.moe_layers == []


def test_tied_embeddings():
    assert ModelConfig.from_dict(dict(QWEN3_NEXT_80B, tie_word_embeddings=True)).tie_word_embeddings
    # the wrapper's flag applies when the text settings do not say
    assert ModelConfig.from_dict(qwen35_wrapper(tie_word_embeddings=True)).tie_word_embeddings
    assert not ModelConfig.from_dict(
        qwen35_wrapper({"tie_word_embeddings": False}, tie_word_embeddings=True)
    ).tie_word_embeddings


def test_eos_list_and_generation_config(tmp_path):
    assert ModelConfig.from_dict(dict(QWEN3_NEXT_80B, eos_token_id=[1, 2])).eos_token_ids == (1, 2)
    d = dict(QWEN3_NEXT_80B)
    del d["eos_token_id"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert ModelConfig.load(tmp_path).eos_token_ids == (7, 9)
    assert ModelConfig.load(tmp_path / "config.json").eos_token_ids == ()


def test_quantization_entry_is_kept():
    q = {"bits": 4, "group_size": 64, "model.layers.0.mlp.gate": {"bits": 8, "group_size": 64}}
    assert ModelConfig.from_dict(dict(QWEN3_NEXT_80B, quantization=q)).quantization == q
    assert ModelConfig.from_dict(qwen35_wrapper(quantization=q)).quantization == q


def test_config_error_is_a_moeflux_error_and_value_error():
    assert issubclass(ConfigError, moeflux.MoefluxError)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "llama"}, "unsupported architecture model_type='llama'"),
        ({"model_type": None}, "no `model_type`"),
        ({"hidden_size": None}, "missing required key `hidden_size`"),
        ({"hidden_size": "2048"}, "`hidden_size` must be an integer"),
        ({"num_hidden_layers": 0}, "`num_hidden_layers` must be >= 1"),
        (
            {"linear_num_value_heads": 24, "linear_num_key_heads": 16},
            "not a multiple of linear_num_key_heads",
        ),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"linear_conv_kernel_dim": 3}, "linear_conv_kernel_dim = 3 is not supported"),
        ({"num_experts_per_tok": 600}, "num_experts_per_tok = 600"),
        ({"shared_expert_intermediate_size": 0}, "without a shared expert"),
        ({"mlp_only_layers": [48]}, "outside"),
        ({"mlp_only_layers": [0], "intermediate_size": 0}, "intermediate_size must be positive"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn' is not supported"),
        ({"rope_theta": None}, "missing `rope_theta`"),
        ({"partial_rotary_factor": 1.5}, r"partial_rotary_factor must be in \(0, 1\]"),
        ({"partial_rotary_factor": 0.003}, "rotary dim"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"layer_types": ["linear_attention"] * 3}, "must be a list of 48 entries"),
        ({"layer_types": ["sliding_attention"] * 48}, r"layer_types\[0\] = 'sliding_attention'"),
        ({"layer_types": ["full_attention"] * 48}, "disagrees with full_attention_interval"),
        ({"eos_token_id": "x"}, "eos_token_id"),
        ({"norm_topk_prob": "yes"}, "`norm_topk_prob` must be true or false"),
    ],
)
def test_errors(change, match):
    d = copy.deepcopy(QWEN3_NEXT_80B)
    for k, v in change.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(d, source="cfg.json")


def test_error_messages_name_the_source(tmp_path):
    d = dict(QWEN3_NEXT_80B)
    del d["vocab_size"]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json: missing required key `vocab_size`"):
        ModelConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="text_config: missing required key `hidden_size`"):
        ModelConfig.from_dict(qwen35_wrapper({"hidden_size": None}))


def test_unsupported_text_config_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="text_config.model_type='llama'"):
        ModelConfig.from_dict(qwen35_wrapper({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.load(tmp_path)
