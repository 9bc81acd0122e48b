"""MoS itself: its factors and layer output against an independent replica of the official code, its index
layout, its parameter counts on a meta-device Llama-2-7B, its errors, and its registration with PEFT."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from llmgraft.hooks import AdaptedLayer, ParamError, get_registry
from tests.replicas import mos as official

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mos():
    return get_registry().get("adapter", "mos")


def layers(count=4, d_in=64, d_out=96, group="q_proj"):
    return [AdaptedLayer(f"model.layers.{i}.{group}", group, i, d_in, d_out) for i in range(count)]


@pytest.mark.parametrize("r, r_v, r_p, c", [(8, 4, 1, 2), (8, 2, 0, 4), (3, 3, 3, 1),
                                            (10, 4, 2, 4)])
def test_factors_and_output_match_the_official_code(r, r_v, r_p, c):
    params = mos().params_cls(r=r, r_v=r_v, r_p=r_p, c=c, init_weights=False, alpha=16.0)
    state = mos().init_state(layers(), params)
    pools = state.shared["q_proj"]
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    for layer in layers():
        fixed = state.fixed[layer.name]
        a, b = mos().factors(pools, {}, fixed, params)
        ref_a, ref_b = official.layer_factors(pools["A"], pools["B"], fixed["index_A"], fixed["index_B"], c)
        assert torch.equal(a.double(), ref_a) and torch.equal(b.double(), ref_b)
        ours = torch.nn.functional.linear(x, mos().delta_weight(pools, {}, fixed, params).double())
        ref = official.layer_output(x, pools["A"], pools["B"], fixed["index_A"], fixed["index_B"], c, 16.0, r)
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)  # ΔW in float32, the replica in float64


def test_indices_follow_the_official_layout():
    r, r_v, r_p, c, count = 8, 4, 2, 2, 6
    params = mos().params_cls(r=r, r_v=r_v, r_p=r_p, c=c)
    state = mos().init_state(layers(count), params)
    shared_rows = (r_v - r_p) * count * c
    differ = 0
    for layer in layers(count):
        index_a, index_b = (state.fixed[layer.name][k] for k in ("index_A", "index_B"))
        ref_a, ref_b = official.layer_indices(layer.index, count, r, r_v, r_p, c, torch.Generator().manual_seed(0))
        assert len(index_a) == len(index_b) == r * c
        # privatization: the layer's own block, last and identical for A and B
        assert torch.equal(index_a[(r - r_p) * c:], ref_a[(r - r_p) * c:].long())
        assert torch.equal(index_b[(r - r_p) * c:], ref_b[(r - r_p) * c:].long())
        for index in (index_a, index_b):  # subset selection: distinct shards of the shared region
            head = index[:(r - r_p) * c]
            assert head.unique().numel() == head.numel() and int(head.max()) < shared_rows
        differ += not torch.equal(index_a[:(r - r_p) * c], index_b[:(r - r_p) * c])  # pair dissociation
    assert differ == count
    again = mos().init_state(layers(count), params)
    other = mos().init_state(layers(count), mos().params_cls(r=r, r_v=r_v, r_p=r_p, c=c, seed=1))
    first = layers(count)[0].name
    assert torch.equal(again.fixed[first]["index_A"], state.fixed[first]["index_A"])
    assert not torch.equal(other.fixed[first]["index_A"], state.fixed[first]["index_A"])


def test_official_initialisation():
    params = mos().params_cls()
    pools = mos().init_state(layers(8, d_in=256, d_out=128), params).shared["q_proj"]
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=√5) with fan d_in
    assert pools["A"].abs().max() <= bound and pools["A"].abs().max() > 0.95 * bound
    assert pools["A"].shape == (8 * 4 * 2, 128) and pools["B"].shape == (64, 8 * 4 * 2)
    assert not pools["B"].any()


def _meta_llama2_7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


@pytest.mark.parametrize("r, r_v, r_p, c", [(64, 2, 0, 1)] + [(8, 4, r_p, c) for r_p in range(4) for c in (1, 2, 4)])
def test_parameter_counts_on_llama2_7b(r, r_v, r_p, c):
    from peft import get_peft_model

    from llmgraft.integrations.peft import MoSConfig

    model = get_peft_model(_meta_llama2_7b(), MoSConfig(r=r, r_v=r_v, r_p=r_p, c=c, target_modules=ALL_SEVEN))
    trainable = model.get_nb_trainable_parameters()[0]
    assert trainable == official.llama2_7b_mos_parameter_count(r_v)
    if (r, r_v) == (64, 2):
        assert trainable == 4_997_120  # the official configuration: LoRA's count at rank 2


def test_peft_layer_forward_matches_the_official_code(tiny_llama):
    """The PEFT layer's added output (dropout off), in float64, against the replica's forward."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from llmgraft.integrations.peft import MoSConfig

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama)),
                           MoSConfig(r=6, r_v=4, r_p=1, c=2, alpha=12.0, init_weights=False,
                                     target_modules=["q_proj", "down_proj"])).double().eval()
    layers = [m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj")) and hasattr(m, "mos_fixed")]
    assert len(layers) == 4
    for layer in layers:
        group = "q_proj" if layer.in_features == 64 and layer.out_features == 64 else "down_proj"
        pools = {k.split("__")[1]: v for k, v in model.base_model.mos_shared["default"].items() if k.startswith(group)}
        fixed = layer.mos_fixed["default"]
        x = torch.randn(2, 3, layer.in_features, dtype=torch.float64)
        with torch.no_grad():
            ours = layer(x) - layer.base_layer(x)
        ref = official.layer_output(x, pools["A"], pools["B"], fixed["index_A"], fixed["index_B"], 2, 12.0, 6)
        assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_bad_input_gets_clear_errors(tiny_llama, tmp_path):
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from llmgraft.integrations.peft import MoSConfig
    from llmgraft.testing.models import llama_config

    def base():
        return AutoModelForCausalLM.from_pretrained(str(tiny_llama))

    with pytest.raises(ParamError, match="r_p=9 private ranks cannot exceed the rank r=8"):
        MoSConfig(r=8, r_p=9)
    with pytest.raises(ParamError, match="c=3 shards per vector must divide d_in=64"):
        get_peft_model(base(), MoSConfig(r=4, r_v=4, c=3, target_modules=["q_proj"]))
    with pytest.raises(ParamError, match="r_v=2 is too small for q_proj"):
        get_peft_model(base(), MoSConfig(r=8, r_v=2, r_p=0, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(base(), MoSConfig(r=4, target_modules=["no_such_proj"]))
    with pytest.raises(ParamError, match="r_v=4 is too small for q_proj.*raise r_v, or lower r_p or r"):
        get_peft_model(base(), MoSConfig(r=9, r_v=4, r_p=1, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="nn.Linear layers only"):
        get_peft_model(base(), MoSConfig(r=4, target_modules=["embed_tokens"]))
    model = get_peft_model(base(), MoSConfig(r=4, r_v=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "mos-q")
    other = LlamaForCausalLM(llama_config(5000, hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64))
    with pytest.raises(RuntimeError, match="size mismatch for .*mos_shared"):
        PeftModel.from_pretrained(other, tmp_path / "mos-q")


def test_peft_type_extension_is_idempotent():
    from peft.utils import PeftType

    from llmgraft.integrations.peft import extend_peft_type

    first, second = extend_peft_type("MOS"), extend_peft_type("MOS")
    assert first is second is PeftType.MOS is PeftType("MOS") and list(PeftType).count(PeftType.MOS) == 1
    assert PeftType.LORA in list(PeftType)


def test_import_llmgraft_stays_free_of_peft():
    code = ("import sys, llmgraft; llmgraft.get_registry().get('adapter', 'mos'); "
            "print(sorted(m for m in ('peft', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "peft" not in out and "transformers" not in out
