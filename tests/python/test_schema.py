"""The op dataclasses of `moeflux.ops` match the Rust op table (`_core.op_schema()`, exported from
`Op::schema()` in src/graph/op.rs): names, order, field names, field order, types, defaults, docs."""

from __future__ import annotations

import dataclasses

import pytest

from moeflux import _core, ops

SCHEMA = _core.op_schema()

# Rust field kind -> the annotation the dataclass must carry.
ANNOTATION = {
    "buf": "BufId",
    "u32": "int",
    "u64": "int",
    "f32": "float",
    "weight_ref": "WeightRef",
    "expert_layout": "ExpertLayout",
    "u32_list": "tuple[int, ...]",
    "dtype": "str",
}


def squash(text: str) -> str:
    return " ".join(text.split())


def test_schema_export_is_well_formed():
    roles = set(_core.roles())
    assert len(SCHEMA) == 23
    assert len({s["name"] for s in SCHEMA}) == 23
    for s in SCHEMA:
        assert set(s) == {"name", "doc", "fields"}
        assert s["doc"].strip(), s["name"]
        for f in s["fields"]:
            assert set(f) == {"name", "type", "accepts", "role_name", "access"}
            assert f["type"] in ANNOTATION
            if f["type"] == "buf":
                assert f["access"] in ("r", "w", "rw")
                assert f["accepts"] and set(f["accepts"]) <= roles
                assert f["role_name"]
            else:
                assert f["access"] is None and f["accepts"] is None and f["role_name"] is None


def test_every_op_has_exactly_one_dataclass_in_table_order():
    names = [s["name"] for s in SCHEMA]
    assert list(ops.OPS) == names
    for name in names:
        assert name in ops.__all__
        assert getattr(ops, name) is ops.OPS[name]
    # No dataclass in ops that the Rust table does not know (besides the two value types).
    defined = {
        n
        for n, v in vars(ops).items()
        if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == ops.__name__
    }
    assert defined == set(names) | {"WeightRef", "ExpertLayout"}


@pytest.mark.parametrize("schema", SCHEMA, ids=[s["name"] for s in SCHEMA])
def test_dataclass_matches_rust(schema):
    cls = ops.OPS[schema["name"]]
    assert dataclasses.is_dataclass(cls)
    assert cls.__dataclass_params__.frozen
    fields = dataclasses.fields(cls)
    rust = schema["fields"]
    assert [f.name for f in fields] == [f["name"] for f in rust] + ["label"]
    assert [f.type for f in fields[:-1]] == [ANNOTATION[f["type"]] for f in rust]
    label = fields[-1]
    assert label.type == "str" and label.default == ""
    for f in fields[:-1]:
        if f.name == "weight_dtype":
            assert f.default == "bf16"
            assert f is fields[-2], "weight_dtype must be second to last"
        else:
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f.name


@pytest.mark.parametrize("schema", SCHEMA, ids=[s["name"] for s in SCHEMA])
def test_docstring_carries_the_rust_doc_and_roles(schema):
    doc = squash(ops.OPS[schema["name"]].__doc__ or "")
    assert squash(schema["doc"]) in doc
    for f in schema["fields"]:
        assert f"{f['name']}:" in doc, f["name"]
        if f["type"] == "buf":
            accepts = f["accepts"]
            roles = (
                "any role" if len(accepts) == len(_core.roles()) else " | ".join(f"``{r}``" for r in accepts)
            )
            assert f"{f['name']}: buffer ({roles})" in doc, f["name"]


def test_value_types():
    assert [f.name for f in dataclasses.fields(ops.WeightRef)] == [
        "w_off",
        "s_off",
        "b_off",
        "bits",
        "group_size",
        "scale_dtype",
    ]
    assert [f.name for f in dataclasses.fields(ops.ExpertLayout)] == [
        "hidden_dim",
        "inter_dim",
        "bits",
        "group_size",
        "scale_dtype",
    ]
    assert dataclasses.fields(ops.WeightRef)[-1].default == "bf16"
    assert dataclasses.fields(ops.ExpertLayout)[-1].default == "bf16"
    for cls in (ops.WeightRef, ops.ExpertLayout):
        assert cls.__dataclass_params__.frozen


def test_schema_field_kinds_round_trip_through_the_builder():
    """Every op built from its dataclass with plausible values compiles (field kinds agree)."""
    bufs = {r: _core.BufId(i, r) for i, r in enumerate(_core.roles())}
    wref = ops.WeightRef(0, 0, 0, 4, 64)
    layout = ops.ExpertLayout(64, 64, 4, 64)
    value = {
        "u32": 1,
        "u64": 0,
        "f32": 1.0,
        "weight_ref": wref,
        "expert_layout": layout,
        "u32_list": [0],
        "dtype": "f32",
    }
    built = []
    for s in SCHEMA:
        kwargs = {
            f["name"]: bufs[f["accepts"][0]] if f["type"] == "buf" else value[f["type"]] for f in s["fields"]
        }
        built.append(ops.OPS[s["name"]](**kwargs, label=s["name"].lower()))
    compiled = _core.CompiledGraph(built)
    assert len(compiled) == 23
    assert compiled.ops() == [(s["name"], s["name"].lower()) for s in SCHEMA]
