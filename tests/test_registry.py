"""The contract every registered mechanism keeps."""

import dataclasses

import pytest
import torch

import attn_zoo
from conftest import MECHANISMS


def test_registry_holds_the_eight_mechanisms():
    assert MECHANISMS[0] == "dense"
    assert len(MECHANISMS) == 8 and len(set(MECHANISMS)) == 8


@pytest.mark.parametrize("name", MECHANISMS)
def test_mechanism_contract(name):
    mech = attn_zoo.get(name)
    assert mech.name == name
    assert dataclasses.is_dataclass(mech.config)
    assert mech.Config.__dataclass_params__.frozen, "configs are frozen dataclasses"
    for text in (mech.citation, mech.summary, mech.complexity, mech.oracle_summary):
        assert isinstance(text, str) and len(text) > 10
    assert "reference" in mech.impls
    for field in mech.small:
        assert field in {f.name for f in dataclasses.fields(mech.config)}


def test_unknown_mechanism_lists_the_accepted():
    with pytest.raises(ValueError, match="unknown mechanism 'nope'; accepted: dense, "):
        attn_zoo.get("nope")


def test_unknown_config_field_is_named():
    with pytest.raises(ValueError, match="unknown config field"):
        attn_zoo.get("lsh", buckets=3)


def test_unknown_impl_is_named():
    q, k, v = torch.randn(3, 1, 1, 8, 16).unbind(0)
    with pytest.raises(ValueError, match="unknown implementation 'fast'; accepted: reference"):
        attn_zoo.get("dense")(q, k, v, impl="fast")


def test_register_and_unregister_a_mechanism():
    @attn_zoo.register
    class Probe(attn_zoo.Mechanism):
        name = "probe_mechanism"

        @dataclasses.dataclass(frozen=True)
        class Config:
            pass

    try:
        assert "probe_mechanism" in attn_zoo.names()
    finally:
        attn_zoo.unregister("probe_mechanism")
    assert "probe_mechanism" not in attn_zoo.names()
