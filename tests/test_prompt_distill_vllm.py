"""PromptDistill in a real vLLM engine, against the transformers path (itself tested against an independent
per-layer-mask reference in test_prompt_distill.py): the same tokens, the same log-probabilities."""

from __future__ import annotations

import gc

import pytest
import torch

from llmgraft.testing.corpus import read_texts, stdlib_files
from llmgraft.testing.engine import cpu_engine
from llmgraft.testing.models import build_tiny_decoder, code_lm_path, load_tokenizer

pytestmark = pytest.mark.engine

STAGES = [[1, 0.3], [2, 0.5]]
STEPS = 6


def _engine(model, architecture, settings, **extra):
    args = dict(max_model_len=1024, max_num_batched_tokens=1024, enable_chunked_prefill=False,
                enable_prefix_caching=False, hf_overrides={"architectures": [architecture]},
                additional_config={"llmgraft": {"prompt_distill": settings}})
    return cpu_engine(model, **{**args, **extra})


@pytest.fixture(scope="module")
def prompts():
    tokenizer = load_tokenizer()
    texts = read_texts(stdlib_files("heldout")[:6])
    return [tokenizer(t)["input_ids"][:n] for t, n in zip(texts, (300, 97, 512, 40, 200, 700))]


def _hf_reference(model_dir, prompts, stages):
    from transformers import AutoModelForCausalLM

    from llmgraft.integrations.transformers.retention import prompt_distill

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with prompt_distill(model, stages=[tuple(s) for s in stages]):
            result = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
        tokens = result.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(result.logits, tokens)]
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False)
        out.append((tokens, logprobs, plain[0, len(prompt):].tolist()))
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_vllm_matches_transformers_token_for_token(prompts, model_type, tmp_path_factory):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # The trained code LM is a Llama; Qwen2 (with its q/k/v biases) and Mistral run random grouped-query models.
    model = code_lm_path() if model_type == "llama" else \
        build_tiny_decoder(tmp_path_factory.mktemp(model_type) / "model", model_type)
    architecture = {"llama": "LlmgraftLlamaForCausalLM", "qwen2": "LlmgraftQwen2ForCausalLM",
                    "mistral": "LlmgraftMistralForCausalLM"}[model_type]
    # max_num_seqs=3 for 6 prompts: later prompts prefill in the same steps as earlier ones decode.
    llm = _engine(model, architecture, {"stages": STAGES}, max_num_seqs=3)
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    del llm
    gc.collect()
    reference = _hf_reference(model, prompts, STAGES)
    differs_from_full = 0
    for output, (tokens, logprobs, plain) in zip(outputs, reference):
        completion = output.outputs[0]
        assert list(completion.token_ids) == tokens
        got = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]
        assert got == pytest.approx(logprobs, abs=1e-4)
        differs_from_full += tokens != plain
    assert differs_from_full >= 2  # the retention changes outputs, so the match above means something


@pytest.mark.parametrize("settings, extra, message", [
    ({"stages": [[1, 0.3]]}, {"enable_chunked_prefill": True, "max_num_batched_tokens": 256},
     "no-enable-chunked-prefill"),
    ({"stages": [[1, 0.3]], "method": "gemfilter"}, {}, "transformers"),
    ({"stages": [[3, 0.3]]}, {}, "out of range"),
    ({"stages": [[1, 0.3]]}, {"hf_overrides": {}}, "needs llmgraft's model class.*LlmgraftLlamaForCausalLM"),
])
def test_engine_start_errors_are_clear(settings, extra, message):
    with pytest.raises(Exception, match=message):
        _engine(code_lm_path(), "LlmgraftLlamaForCausalLM", settings, **extra)
    gc.collect()


def test_unsupported_architectures_are_named_at_start_up():
    from types import SimpleNamespace

    from llmgraft.hooks.errors import ParamError
    from llmgraft.integrations.vllm.sampling import _check_retention_architecture

    def config(*architectures):
        return SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(architectures=architectures)))

    section = {"prompt_distill": {"stages": [[1, 0.3]]}}
    with pytest.raises(ParamError, match=r'\["LlmgraftQwen2ForCausalLM"\]'):
        _check_retention_architecture(section, config("Qwen2ForCausalLM"))
    with pytest.raises(ParamError, match="supports .*this model runs \\['GPT2LMHeadModel'\\]"):
        _check_retention_architecture(section, config("GPT2LMHeadModel"))
    _check_retention_architecture(section, config("LlmgraftMistralForCausalLM"))
    _check_retention_architecture({}, config("GPT2LMHeadModel"))  # no retention settings: nothing to check
