"""A real in-process vLLM engine with GraftSampling loaded through its entry point.

Sampled tokens are checked against the Top-H set that an independent forward pass of the same model in
transformers implies, so the tests fail if the processor is not loaded, not applied, or applied wrongly.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from llmgraft.kernels.top_h import top_h
from llmgraft.testing.engine import completion_logits

pytestmark = pytest.mark.engine

PROMPTS = ["def parse(self, text):\n", "import os\n\nclass ", "for item in items:\n    ", "return {"]
TEMPERATURE = 1.5


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()


def step_logits(hf_model, output) -> tuple[torch.Tensor, list[int]]:
    """Temperature-scaled logits [steps, V] before each generated token, and the tokens themselves."""
    logits, tokens = completion_logits(hf_model, output)[0]
    return logits / TEMPERATURE, tokens


def outside_top_h(hf_model, outputs, alpha: float) -> int:
    """How many sampled tokens fall outside the Top-H(alpha) set of the model's own distribution."""
    misses = 0
    for output in outputs:
        logits, tokens = step_logits(hf_model, output)
        allowed = torch.isfinite(top_h(logits.clone(), alpha))
        misses += sum(not bool(allowed[i, t]) for i, t in enumerate(tokens))
    return misses


def params(seed: int, **extra_args):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=24, temperature=TEMPERATURE, seed=seed, ignore_eos=True,
                          extra_args=extra_args or None)


def test_top_h_per_request_restricts_sampling(llm, hf_model):
    with_top_h = llm.generate(PROMPTS, [params(i, top_h=0.2) for i in range(4)], use_tqdm=False)
    plain = llm.generate(PROMPTS, [params(i) for i in range(4)], use_tqdm=False)
    # Top-H is monotone in alpha, so alpha=0.3 on HF's logits is a superset robust to tiny numeric drift.
    assert outside_top_h(hf_model, with_top_h, 0.3) == 0
    assert outside_top_h(hf_model, plain, 0.2) > 5  # without the processor, sampling roams wider


def test_invalid_requests_are_rejected(llm):
    from vllm.exceptions import VLLMValidationError  # what the OpenAI server turns into HTTP 400

    for bad, message in (({"top_h": 1.5}, r"alpha must be in \(0, 1\]"),
                         ({"top_h_variant": "nope"}, "must be one of"),
                         ({"llmgraft_sampler": "missing"}, "no sampler named"),
                         ({"top_h": True}, "must be a number"),  # offline a bool stays a bool (HTTP: README)
                         ({"top_h": 0.3, "varaint": "paper"}, "did you mean 'variant'")):
        with pytest.raises(VLLMValidationError, match=message):
            llm.generate(["x = "], params(0, **bad), use_tqdm=False)


def test_mixed_batch_third_party_and_greedy(llm, hf_model):
    from vllm import SamplingParams

    requests = [params(1, top_h=0.1, top_h_variant="paper"),
                params(2, llmgraft_sampler="top_a", top_a_a=0.9),
                params(3),
                SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, extra_args={"top_h": 0.5})]
    outputs = llm.generate(PROMPTS, requests, use_tqdm=False)

    logits, tokens = step_logits(hf_model, outputs[0])
    allowed = torch.isfinite(top_h(logits.clone(), 0.15, variant="paper"))
    assert all(bool(allowed[i, t]) for i, t in enumerate(tokens))

    logits, tokens = step_logits(hf_model, outputs[1])  # third-party Top-A: p >= 0.9 * p_max^2
    probs = logits.softmax(-1)
    margin = 0.8 * probs.amax(-1) ** 2
    assert all(float(probs[i, t]) >= float(margin[i]) for i, t in enumerate(tokens))

    logits, tokens = step_logits(hf_model, outputs[3])  # greedy rows are left alone: argmax each step
    assert tokens == logits.argmax(-1).tolist()


def test_processor_state_follows_batch_updates(llm):
    """Drive the engine's own processor class through add / move / remove with real vLLM objects."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from llmgraft.integrations.vllm import GraftSampling

    config = copy.copy(llm.llm_engine.vllm_config)
    config.additional_config = {"llmgraft": {"sampler": "top_h", "top_h": 0.9}}
    proc = GraftSampling(config, torch.device("cpu"), False)
    x = torch.randn(4, 500, generator=torch.Generator().manual_seed(0)) * 2
    added = [(0, SamplingParams(temperature=1.0, extra_args={"top_h": 0.1}), None, []),
             (1, SamplingParams(temperature=1.0, extra_args={"llmgraft_sampler": "none"}), None, []),
             (2, SamplingParams(temperature=1.0), None, []),      # gets the server default, alpha 0.9
             (3, SamplingParams(temperature=0.0), None, [])]      # greedy: not tracked
    proc.update_state(BatchUpdate(batch_size=4, removed=[], added=added, moved=[]))
    out = proc.apply(x.clone())
    assert torch.equal(out[0], top_h(x[:1].clone(), 0.1)[0])
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])
    assert torch.equal(out[2], top_h(x[2:3].clone(), 0.9)[0])

    proc.update_state(BatchUpdate(batch_size=4, removed=[], added=[],
                                  moved=[(0, 1, MoveDirectionality.SWAP)]))
    out = proc.apply(x.clone())
    assert torch.equal(out[1], top_h(x[1:2].clone(), 0.1)[0]) and torch.equal(out[0], x[0])
    proc.update_state(None)  # vLLM's "no change this step": the swapped assignment must stay
    assert torch.equal(proc.apply(x.clone()), out)

    proc.update_state(BatchUpdate(batch_size=2, removed=[1, 2], added=[], moved=[]))
    assert proc.groups == [] and torch.equal(proc.apply(x[:2].clone()), x[:2])


def test_model_runner_v2_loader_accepts_the_entry_point():
    """On GPUs vLLM 0.32 defaults to Model Runner V2, whose loader rejects V1-only processors (fatal)."""
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins

    from llmgraft.integrations.vllm import GraftSampling

    assert GraftSampling in _load_v2_logitsprocs_plugins()


def test_model_runner_v2_processor_scales_by_each_rows_temperature(llm):
    """V2 sees unscaled logits and rows in any slot order; each row must get sampler(logits / T) * T."""
    import numpy as np
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState

    from llmgraft.integrations.vllm import GraftSampling

    vocab = 500
    states = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=8, vocab_size=vocab,
                                    all_token_ids=None, prompt_len=None, prefill_len=None, total_len=None)
    proc = GraftSampling(llm.llm_engine.vllm_config, states)
    assert type(proc).__name__ == "_V2GraftSampling"
    requests = {5: SamplingParams(temperature=0.7, extra_args={"top_h": 0.3}),
                2: SamplingParams(temperature=1.5, extra_args={"top_h": 0.6}),
                7: SamplingParams(temperature=0.0, extra_args={"top_h": 0.6}),  # greedy: declined
                0: SamplingParams(temperature=1.0)}                             # no llmgraft field
    assert [proc.add_request(slot, sp) for slot, sp in requests.items()] == [True, True, False, False]

    def context(slots):
        mapping = torch.tensor(slots)
        return LogitsContext(expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=np.array(slots),
                             expanded_local_pos=torch.zeros(len(slots), dtype=torch.long), input_ids=mapping,
                             pos=mapping, seq_lens_upper_bound_np=np.ones(len(slots), dtype=np.int32))

    x = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1)) * 2
    out = proc.apply(x.clone(), context([0, 2, 7, 5]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    for row, (temperature, alpha) in ((1, (1.5, 0.6)), (3, (0.7, 0.3))):
        expected = top_h(x[row:row + 1] / temperature, alpha)[0]
        assert torch.equal(torch.isfinite(out[row]), torch.isfinite(expected))
        kept = torch.isfinite(expected)
        torch.testing.assert_close(out[row][kept], x[row][kept])
    untouched = x[:2].clone()
    assert proc.apply(untouched, context([0, 7])) is untouched and torch.equal(untouched, x[:2])


# ---- the other built-in samplers, through the same engine ---------------------------------------------------


def _sampled_outside(hf_model, outputs, allowed_fn) -> int:
    misses = 0
    for output in outputs:
        logits, tokens = step_logits(hf_model, output)
        allowed = torch.isfinite(allowed_fn(logits.clone()))
        misses += sum(not bool(allowed[i, t]) for i, t in enumerate(tokens))
    return misses


def test_threshold_samplers_per_request(llm, hf_model):
    from llmgraft.kernels.thresholds import p_less, top_nsigma

    sigma = llm.generate(PROMPTS, [params(i, top_nsigma=0.5) for i in range(4)], use_tqdm=False)
    less = llm.generate(PROMPTS, [params(i, llmgraft_sampler="p_less") for i in range(4)], use_tqdm=False)
    # Supersets robust to float drift between the engine and HF: a wider sigma band; a lower Renyi order.
    assert _sampled_outside(hf_model, sigma, lambda x: top_nsigma(x, 0.55)) == 0
    assert _sampled_outside(hf_model, less, lambda x: p_less(x, order=1.9)) == 0
    plain = llm.generate(PROMPTS, [params(i) for i in range(4)], use_tqdm=False)
    assert _sampled_outside(hf_model, plain, lambda x: top_nsigma(x, 0.5)) > 5
    assert _sampled_outside(hf_model, plain, lambda x: p_less(x)) > 5


def test_top_w_reads_the_engines_embeddings(llm, hf_model):
    from llmgraft.kernels.top_w import top_w, unit_embeddings

    unit = unit_embeddings(hf_model.get_input_embeddings().weight)
    outputs = llm.generate(PROMPTS, [params(i, top_w=6.0, top_w_lam=1.0) for i in range(4)], use_tqdm=False)
    sizes = []
    for output in outputs:
        logits, tokens = step_logits(hf_model, output)
        allowed = torch.isfinite(top_w(logits.clone(), unit, beta=6.0, lam=1.0))
        sizes += allowed.sum(-1).tolist()
        assert all(bool(allowed[i, t]) for i, t in enumerate(tokens))
    assert max(sizes) > 1  # the rule had a choice to make at some steps


def test_engine_resources_report_a_vocabulary_mismatch(llm, tiny_llama, tmp_path, caplog):
    from safetensors.torch import save_file

    from llmgraft.hooks.resources import ResourceError
    from llmgraft.hooks.sampling import parse_server_defaults
    from llmgraft.integrations.vllm.sampling import _engine_resources

    shutil.copytree(tiny_llama, tmp_path / "m")
    save_file({"model.embed_tokens.weight": torch.zeros(7, 4)}, str(tmp_path / "m" / "model.safetensors"))
    config = copy.copy(llm.llm_engine.vllm_config)
    config.model_config = copy.copy(config.model_config)
    config.model_config.model = str(tmp_path / "m")
    with pytest.raises(ResourceError, match=r"model.embed_tokens.weight .* have shape \(7, 4\) but the logits"):
        _engine_resources(config, parse_server_defaults({"sampler": "top_w"}))
    resources = _engine_resources(config, None)  # no default needs it: a warning, and an error on use
    assert "top_w unavailable on this engine" in caplog.text
    with pytest.raises(ResourceError, match=r"shape \(7, 4\)"):
        resources.get("input_embeddings")
    # In the engine, such rows are sampled unfiltered (logged once) instead of ending every request.
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from llmgraft.integrations.vllm import GraftSampling

    proc = GraftSampling(config, torch.device("cpu"), False)
    added = [(0, SamplingParams(temperature=1.0, extra_args={"top_w": 5.0}), None, []),
             (1, SamplingParams(temperature=1.0, extra_args={"top_h": 0.2}), None, [])]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]))
    x = torch.randn(2, 500, generator=torch.Generator().manual_seed(0))
    out = proc.apply(x.clone())
    assert torch.equal(out[0], x[0]) and torch.isinf(out[1]).any()
    assert "top_w cannot run on this engine" in caplog.text
    good = _engine_resources(llm.llm_engine.vllm_config, None).get("input_embeddings")
    assert torch.equal(good, hf_model_embeddings(tiny_llama))


def hf_model_embeddings(path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return f.get_tensor("model.embed_tokens.weight").float()


def test_top_w_as_the_engines_default_sampler(llm, hf_model):
    """--additional-config '{"llmgraft": {"sampler": "top_w", ...}}': rows without fields get Top-W, read
    with the engine's own embeddings; per-row beta from a request overrides the default."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from llmgraft.integrations.vllm import GraftSampling
    from llmgraft.kernels.top_w import top_w, unit_embeddings

    config = copy.copy(llm.llm_engine.vllm_config)
    config.additional_config = {"llmgraft": {"sampler": "top_w", "top_w": 6.0, "lam": 1.0}}
    proc = GraftSampling(config, torch.device("cpu"), False)
    vocab = hf_model.get_input_embeddings().weight.shape[0]
    x = torch.randn(3, vocab, generator=torch.Generator().manual_seed(2)) * 3
    added = [(0, SamplingParams(temperature=1.0), None, []),
             (1, SamplingParams(temperature=1.0, extra_args={"top_w": 9.0}), None, []),
             (2, SamplingParams(temperature=1.0, extra_args={"llmgraft_sampler": "none"}), None, [])]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    out = proc.apply(x.clone())
    unit = unit_embeddings(hf_model.get_input_embeddings().weight)
    assert torch.equal(torch.isfinite(out[0]), torch.isfinite(top_w(x[:1].clone(), unit, beta=6.0, lam=1.0)[0]))
    assert torch.equal(torch.isfinite(out[1]), torch.isfinite(top_w(x[1:2].clone(), unit, beta=9.0, lam=1.0)[0]))
    assert torch.equal(out[2], x[2])
