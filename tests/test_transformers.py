"""transformers integration: GraftLogitsProcessor inside a real ``generate`` on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from llmgraft.hooks import ParamError, UnknownPluginError
from llmgraft.integrations.transformers import GraftLogitsProcessor
from llmgraft.kernels.top_h import top_h


@pytest.fixture(scope="module")
def model_and_inputs(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    inputs = tok(["def main():\n    ", "class Parser:\n"], return_tensors="pt", padding=True)
    return model, inputs


def generate(model, inputs, processor, temperature, seed=0):
    torch.manual_seed(seed)
    return model.generate(**inputs, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                          max_new_tokens=12, logits_processor=[processor], output_logits=True,
                          output_scores=True, return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_sampling_sees_top_h_of_temperature_scaled_logits(model_and_inputs, temperature):
    model, inputs = model_and_inputs
    out = generate(model, inputs, GraftLogitsProcessor("top_h", temperature=temperature, alpha=0.4), temperature)
    for raw, processed in zip(out.logits, out.scores):
        expected = top_h(raw / temperature, 0.4)
        # What the sampler draws from is exactly Top-H applied to logits / T (T applied once, not twice).
        assert torch.equal(torch.isfinite(processed), torch.isfinite(expected))
        finite = torch.isfinite(expected)
        torch.testing.assert_close(processed[finite], expected[finite])


def test_wrong_temperature_would_change_the_kept_set(model_and_inputs):
    """Guards the test above: scaling twice (or not at all) gives different sets on this model."""
    model, inputs = model_and_inputs
    out = generate(model, inputs, GraftLogitsProcessor("top_h", temperature=2.0, alpha=0.4), 2.0)
    raw = torch.cat(out.logits)
    assert not torch.equal(torch.isfinite(top_h(raw / 2.0, 0.4)), torch.isfinite(top_h(raw / 4.0, 0.4)))


def test_third_party_sampler_through_hf(model_and_inputs, plugin_site):
    model, inputs = model_and_inputs
    out = generate(model, inputs, GraftLogitsProcessor("top_a", temperature=1.0, a=0.5), 1.0)
    for raw, processed in zip(out.logits, out.scores):
        probs = raw.softmax(-1)
        expected = probs >= 0.5 * probs.amax(-1, keepdim=True) ** 2
        assert torch.equal(torch.isfinite(processed), expected)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ParamError, match="temperature"):
        GraftLogitsProcessor("top_h", temperature=0)
    with pytest.raises(ParamError, match="alpha"):
        GraftLogitsProcessor("top_h", alpha=2.0)
    with pytest.raises(ParamError, match="alpha must be a number, got True"):
        GraftLogitsProcessor("top_h", alpha=True)
    with pytest.raises(TypeError, match="positional"):
        GraftLogitsProcessor("top_h", 0.4)  # would have been read as the temperature
    assert GraftLogitsProcessor("top_h", top_h=0.3).params.alpha == 0.3
    with pytest.raises(ParamError, match=r"parameter 'alpha' given twice \('top_h' and 'alpha'\)"):
        GraftLogitsProcessor("top_h", top_h=0.3, alpha=0.2)
    assert GraftLogitsProcessor("top_h", top_h_variant="paper").params.variant == "paper"  # request spellings
    with pytest.raises(ParamError, match="keyword argument 'alpah' is not a parameter of top_h; did you mean"):
        GraftLogitsProcessor("top_h", alpah=0.3)
    with pytest.raises(ParamError, match="keyword argument 'temp' is not a parameter"):
        GraftLogitsProcessor("top_h", temp=0.3)  # llmgraft's own keywords: nothing passes through
    with pytest.raises(ParamError, match="name of a registered sampler"):
        GraftLogitsProcessor("none")
    with pytest.raises(UnknownPluginError, match="available"):
        GraftLogitsProcessor("top_zz")
