"""Token retention in transformers: PromptDistill, GemFilter, last-k, against independent references.

The reference for mode "continue" recomputes the whole sequence at every step with no cache, through the
model's own layers called one by one, each with its own 4-D mask: a layer after a selection masks the
prompt tokens it dropped as keys (so nothing reads their states, which is the same computation as never
computing them), and a layer whose KV a kv_manager truncated masks them for the generated tokens only.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from llmgraft import ParamError
from llmgraft.integrations.transformers.retention import prompt_distill
from llmgraft.testing.corpus import read_texts, stdlib_files
from llmgraft.testing.models import code_lm_path, load_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer()
    tok.padding_side = "left"
    return tok


def _load(path, impl="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def code_lm():
    return _load(code_lm_path())


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = read_texts(stdlib_files("heldout")[:4])
    ids = [tokenizer(t)["input_ids"] for t in texts]
    # Two rows of different lengths (so the shorter is left-padded), from held-out stdlib files.
    return [tokenizer.decode(ids[0][:160]), tokenizer.decode(ids[1][:97])]


def _batch(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True)


# ----------------------------------------------------------------------------------------- the reference
def reference_logits(model, ids, valid, prompt_len, kept, truncated=()):
    """Logits [B, N, V] of the whole sequence ``ids`` (prompt of ``prompt_len`` then generated tokens),
    computed with no cache and a per-layer mask. ``kept``: [(stage_layer, indices [B, K])]; ``truncated``:
    layers whose prompt KV was cut to the last stage at or after them."""
    base = model.model
    batch, length = ids.shape
    hidden = base.embed_tokens(ids)
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    rotary = base.rotary_emb(hidden, positions)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    generated = torch.arange(length) >= prompt_len
    for index, layer in enumerate(base.layers):
        allowed = causal[None] & valid[:, None, :]
        for stage_layer, indices in kept:
            dropped = torch.ones(batch, length, dtype=torch.bool)
            dropped[:, prompt_len:] = False
            dropped.scatter_(1, indices, False)
            if index > stage_layer:  # the layer never saw the dropped tokens
                allowed &= ~dropped[:, None, :]
            elif index in truncated:  # cut after the prefill: the generated tokens no longer see them
                allowed &= ~(dropped[:, None, :] & generated[None, :, None])
        allowed |= torch.eye(length, dtype=torch.bool)[None]  # padding rows attend to themselves (unused)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None]
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
    return model.lm_head(base.norm(hidden))


def reference_generate(model, enc, kept, steps, truncated=()):
    ids, valid = enc["input_ids"], enc["attention_mask"].bool()
    prompt_len = ids.shape[1]
    first = None
    for _ in range(steps):
        logits = reference_logits(model, ids, valid, prompt_len, kept, truncated)
        first = logits[:, -1] if first is None else first
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        valid = torch.cat([valid, torch.ones(len(ids), 1, dtype=torch.bool)], 1)
    return ids, first


def _generate(model, enc, steps):
    out = model.generate(**enc, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, out.logits[0], out.past_key_values


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded"])
def test_keeping_every_token_is_bit_identical(impl, padded, tokenizer, prompts):
    model = _load(code_lm_path(), impl)
    enc = _batch(tokenizer, prompts if padded else prompts[:1])
    plain = model.generate(**enc, max_new_tokens=12, do_sample=False)
    with prompt_distill(model, stages=[(1, 1.0)]) as retention:
        kept = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert retention.kept[0].shape[1] == enc["input_ids"].shape[1]  # the machinery ran, keeping all
    assert torch.equal(plain, kept)
    assert model.config._attn_implementation == impl  # restored on exit


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("stages, kv", [
    ([(1, 0.3)], "keep_kv"),
    ([(0, 0.5), (2, 24)], "keep_kv"),
    ([(1, 0.25)], "truncate_kv"),
], ids=["one-stage", "two-stages", "truncate-earlier-kv"])
def test_continue_mode_matches_per_layer_mask_reference(impl, stages, kv, tokenizer, prompts):
    model = _load(code_lm_path(), impl)
    enc = _batch(tokenizer, prompts)
    with prompt_distill(model, stages=stages, kv_manager=kv) as retention:
        seqs, first, cache = _generate(model, enc, 8)
    kept = list(zip([s[0] for s in stages], retention.kept))
    valid = enc["attention_mask"].bool()
    for indices in retention.kept:  # every kept position of a row is a token, bar its padding slots
        assert indices.shape[1] < enc["input_ids"].shape[1]
        assert bool(valid.gather(1, indices)[:, -1].all())
    truncated = tuple(range(stages[0][0] + 1)) if kv == "truncate_kv" else ()
    with torch.no_grad():
        ref, ref_first = reference_generate(model, enc, kept, 8, truncated)
    torch.testing.assert_close(first, ref_first, atol=2e-4, rtol=1e-4)
    assert torch.equal(seqs, ref)
    # The caches: layers after the last stage hold its kept tokens plus the generated ones.
    tokens = retention.cached_tokens(cache)
    width = retention.kept[-1].shape[1] + 7
    assert tokens[-1] == width
    assert tokens[0] == (width if kv == "truncate_kv" else enc["input_ids"].shape[1] + 7)


def test_gemfilter_reruns_the_model_on_its_kept_tokens(code_lm, tokenizer, prompts):
    enc = _batch(tokenizer, prompts[:1])
    with prompt_distill(code_lm, stages=[(1, 40)], method="gemfilter") as retention:
        seqs, _, cache = _generate(code_lm, enc, 8)
    kept = retention.kept[0]
    assert kept.shape == (1, 40)  # GemFilter's k counts every kept token; the last one is not forced
    short = code_lm.generate(input_ids=enc["input_ids"][:, kept[0]], attention_mask=torch.ones_like(kept),
                             max_new_tokens=8, do_sample=False)
    assert torch.equal(seqs[:, -8:], short[:, -8:])
    assert retention.cached_tokens(cache) == [40 + 7] * 4


def test_gemfilter_batch_matches_each_row_alone(code_lm, tokenizer, prompts):
    enc = _batch(tokenizer, prompts)
    with prompt_distill(code_lm, stages=[(1, 0.3)], method="gemfilter"):
        together = code_lm.generate(**enc, max_new_tokens=6, do_sample=False)[:, -6:]
        alone = [code_lm.generate(**_batch(tokenizer, [p]), max_new_tokens=6, do_sample=False)[0, -6:] for p in prompts]
    assert torch.equal(together, torch.stack(alone))


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_other_supported_architectures(model_type, tokenizer, prompts, tmp_path):
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    config_cls = {"qwen2": Qwen2Config, "mistral": MistralConfig}[model_type]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        pad_token_id=0, bos_token_id=0, eos_token_id=0, sliding_window=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 0.5)
    enc = _batch(tokenizer, prompts)
    with prompt_distill(model, stages=[(1, 0.3)]) as retention:
        seqs, first, _ = _generate(model, enc, 5)
    with torch.no_grad():
        ref, ref_first = reference_generate(model, enc, [(1, retention.kept[0])], 5)
    torch.testing.assert_close(first, ref_first, atol=2e-4, rtol=1e-4)
    assert torch.equal(seqs, ref)


def test_every_registered_method_runs_through_transformers(code_lm, tokenizer, prompts):
    """The retention contract end to end: each registered attention method selects ceil(ratio * n) tokens
    per row (the last one included), never a padding position as a token, and generation proceeds."""
    from llmgraft import get_registry

    enc = _batch(tokenizer, prompts)
    valid = enc["attention_mask"].bool()
    lengths = valid.sum(1)
    for name in get_registry().names("attention"):
        with prompt_distill(code_lm, stages=[(1, 0.25)], method=name) as retention:
            out = code_lm.generate(**enc, max_new_tokens=3, do_sample=False)
        indices = retention.kept[0]
        real = valid.gather(1, indices)
        assert torch.equal(real.sum(1), torch.ceil(lengths * 0.25).long()), name
        assert bool((indices[:, 1:] > indices[:, :-1]).all()), name
        assert out.shape[1] == enc["input_ids"].shape[1] + 3, name


def test_last_k_keeps_the_window(code_lm, tokenizer, prompts):
    enc = _batch(tokenizer, prompts[:1])
    with prompt_distill(code_lm, stages=[(1, 10)], method="last_k") as retention:
        code_lm(**enc)
    length = enc["input_ids"].shape[1]
    assert retention.kept[0].tolist() == [list(range(length - 11, length))]


# ------------------------------------------------- the selection against the replica of the official code
def _rope_qk(model, enc, layer_index):
    """RoPE'd queries [B, H, T, D] and keys [B, Hkv, T, D] of one layer, computed by hand from its input."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer_index]
        attention = model.model.layers[layer_index].self_attn
        x = model.model.layers[layer_index].input_layernorm(hidden)
        batch, length, _ = x.shape
        q = attention.q_proj(x).view(batch, length, -1, attention.head_dim).transpose(1, 2)
        k = attention.k_proj(x).view(batch, length, -1, attention.head_dim).transpose(1, 2)
        positions = (enc["attention_mask"].long().cumsum(1) - 1).clamp_min(0)
        cos, sin = model.model.rotary_emb(x, positions)
        return apply_rotary_pos_emb(q, k, cos, sin)


def _same_up_to_ties(got, want, scores, rel=1e-5):
    """Kept sets equal, or differing only among tokens scored within ``rel`` of the boundary score."""
    got, want = set(got.tolist()), set(want.tolist())
    if got == want:
        return True
    boundary = min(float(scores[i]) for i in want if float(scores[i]) != float("-inf"))
    return all(abs(float(scores[i]) - boundary) <= rel * max(abs(boundary), 1e-12) for i in got ^ want)


@pytest.mark.parametrize("method", ["prompt_distill", "gemfilter"])
def test_scores_match_the_replica_with_and_without_padding(method):
    from llmgraft import get_registry
    from replicas import prompt_distill as replica

    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, lengths = 8, 2, 16, (23, 9)
    scorer = get_registry().get("attention", method)
    keys = torch.randn(2, kv_heads, 23, dim, generator=gen)
    query = torch.randn(2, heads, 1, dim, generator=gen)
    valid = torch.arange(23)[None] >= torch.tensor([23 - n for n in lengths])[:, None]
    scores = scorer.score(query, keys, valid, scorer.params_cls())
    want_fn = {"prompt_distill": replica.promptdistill_scores, "gemfilter": replica.gemfilter_scores}[method]
    for row, n in enumerate(lengths):
        want = want_fn(query[row, :, 0], keys[row, :, -n:])
        finite = torch.isfinite(want)
        torch.testing.assert_close(scores[row, -n:][finite].double(), want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, keep", [("prompt_distill", 30), ("prompt_distill", 0.4), ("gemfilter", 30)])
def test_selection_matches_the_official_rule_replica(method, keep, code_lm, tokenizer, prompts):
    from replicas import prompt_distill as replica

    enc = _batch(tokenizer, prompts)  # row 1 is left-padded: it must select what it selects alone
    with prompt_distill(code_lm, stages=[(2, keep)], method=method) as retention:
        with torch.no_grad():
            code_lm(**enc)
    q, k = _rope_qk(code_lm, enc, 2)
    valid = enc["attention_mask"].bool()
    for row in range(2):
        n = int(valid[row].sum())
        count = keep if isinstance(keep, int) else math.ceil(keep * n) - (method == "prompt_distill")
        args = (q[row, :, -1], k[row, :, -n:])
        select, scores = {"prompt_distill": (replica.promptdistill_select, replica.promptdistill_scores),
                          "gemfilter": (replica.gemfilter_select, replica.gemfilter_scores)}[method]
        want = select(*args, count)
        indices = retention.kept[0][row]
        got = indices[valid[row, indices]] - (valid.shape[1] - n)
        assert _same_up_to_ties(got, want, scores(*args)), (row, sorted(set(got.tolist()) ^ set(want.tolist())))


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("stages, message", [
    ([(3, 10)], "out of range"),
    ([(-1, 10)], "out of range"),
    ([(1, 0)], ">= 1"),
    ([(1, -3)], ">= 1"),
    ([(1, 0.0)], r"\(0, 1\]"),
    ([(1, 1.5)], r"\(0, 1\]"),
    ([(1, True)], "int count or a float ratio"),
    ([(2, 10), (1, 5)], "must increase"),
    ([], "empty"),
    ("1:10", "list of"),
])
def test_bad_stages_are_clear_errors(code_lm, stages, message):
    with pytest.raises(ParamError, match=message):
        prompt_distill(code_lm, stages=stages)


def test_unknown_method_and_parameters(code_lm):
    with pytest.raises(ValueError, match="prompt_distil"):
        prompt_distill(code_lm, stages=[(1, 10)], method="prompt_distil")
    with pytest.raises(ParamError, match="pool"):
        prompt_distill(code_lm, stages=[(1, 10)], pool=4)
    with pytest.raises(ParamError, match="one stage"):
        prompt_distill(code_lm, stages=[(0, 10), (1, 5)], method="gemfilter")


@pytest.mark.parametrize("method", ["prompt_distill", "gemfilter", "last_k"])
def test_k_covering_the_prompt_is_a_no_op_with_a_warning(code_lm, tokenizer, prompts, method):
    enc = _batch(tokenizer, prompts[:1])
    length = enc["input_ids"].shape[1]
    plain = code_lm.generate(**enc, max_new_tokens=5, do_sample=False)
    for k in (length, 10_000):
        with prompt_distill(code_lm, stages=[(1, k)], method=method) as retention, \
                pytest.warns(UserWarning, match="every token"):
            out = code_lm.generate(**enc, max_new_tokens=5, do_sample=False)
        assert torch.equal(plain, out)
        assert retention.kept[0].tolist() == [list(range(length))]  # one entry per stage


def test_right_padding_and_unsupported_architectures(code_lm, tokenizer, prompts, tmp_path):
    tokenizer_right = load_tokenizer()
    right = tokenizer_right(prompts, return_tensors="pt", padding=True, padding_side="right")
    with prompt_distill(code_lm, stages=[(1, 10)]), pytest.raises(ParamError, match="left padding"):
        code_lm(**right)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ParamError, match="supports llama, mistral, qwen2.*'gpt2'"):
        prompt_distill(gpt2, stages=[(0, 4)])


def test_the_model_is_restored_after_the_block(code_lm, tokenizer, prompts):
    enc = _batch(tokenizer, prompts[:1])
    before = code_lm(**enc).logits

    def hooks():
        modules = [code_lm, code_lm.model, *code_lm.model.layers]
        return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]

    installed = hooks()
    with warnings.catch_warnings(), prompt_distill(code_lm, stages=[(1, 0.2)]):
        shorter = code_lm(**enc).logits
        assert hooks() != installed
    assert shorter.shape[1] < before.shape[1]
    assert torch.equal(code_lm(**enc).logits, before)
    assert hooks() == installed
    assert not any(hasattr(layer.self_attn, "_llmgraft_retention") for layer in code_lm.model.layers)


# ------------------------------------------------------------------------------ the cases a user runs into
def test_interleaved_prompts_keep_their_own_state(code_lm, tokenizer, prompts):
    """Two prompts prefilled one after the other in one block, then decoded alternately: each gets what it
    gets alone (the state follows the cache, not the last call)."""
    a, b = (_batch(tokenizer, [p]) for p in prompts)
    with prompt_distill(code_lm, stages=[(1, 0.3)], kv_manager="truncate_kv"):
        alone = [code_lm.generate(**x, max_new_tokens=4, do_sample=False)[0, -4:].tolist() for x in (a, b)]
        states = []
        with torch.no_grad():
            for x in (a, b):
                out = code_lm(**x, use_cache=True)
                states.append([out.past_key_values, [int(out.logits[0, -1].argmax())]])
            for _ in range(3):
                for cache_tokens in states:
                    cache, tokens = cache_tokens
                    out = code_lm(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
                    tokens.append(int(out.logits[0, -1].argmax()))
    assert [tokens for _, tokens in states] == alone


def test_sliding_window_beyond_the_window_is_refused(tokenizer, prompts):
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=64, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    short = tokenizer(prompts[1][:60], return_tensors="pt")
    assert short["input_ids"].shape[1] < 60
    with prompt_distill(model, stages=[(1, 0.5)]):
        model.generate(**short, max_new_tokens=2, do_sample=False)
        with pytest.raises(ParamError, match="sliding-window"):
            model.generate(**_batch(tokenizer, prompts[:1]), max_new_tokens=2, do_sample=False)


def test_unsupported_calls_are_clear(code_lm, tokenizer, prompts):
    enc = _batch(tokenizer, prompts[:1])
    with prompt_distill(code_lm, stages=[(1, 0.3)]):
        with pytest.raises(ParamError, match="labels"):
            code_lm(**enc, labels=enc["input_ids"])
        with pytest.raises(ParamError, match="dynamic cache"):
            code_lm.generate(**enc, max_new_tokens=2, cache_implementation="static")
        with pytest.raises(ParamError, match="already inside"), prompt_distill(code_lm, stages=[(1, 0.5)]):
            pass
        with pytest.warns(UserWarning, match="use_cache=False"):
            code_lm(**enc, use_cache=False)


def test_stage_spellings(code_lm):
    import numpy as np

    plan = prompt_distill(code_lm, stages=[{"layer": np.int64(0), "ratio": 1}, {"layer": 2, "count": 8.0}]).plan
    assert [(s.layer, s.keep) for s in plan.stages] == [(0, 1.0), (2, 8)]
    assert isinstance(plan.stages[0].layer, int) and isinstance(plan.stages[0].keep, float)
    with pytest.raises(ParamError, match="one of 'count', 'ratio'"):
        prompt_distill(code_lm, stages=[{"layer": 1, "count": 8, "ratio": 0.5}])
    with pytest.raises(ParamError, match="nothing to cut"):
        prompt_distill(code_lm, stages=[(1, 8)], method="gemfilter", kv_manager="truncate_kv")
    assert prompt_distill(code_lm, stages=[(1, 8)], params={"pool": 3}).plan.params.pool == 3


def test_a_continue_method_must_keep_the_last_token():
    from llmgraft.hooks.families import FAMILIES
    from llmgraft.plugins.prompt_distill import GemFilter

    class Dropper(GemFilter):
        name, mode = "dropper", "continue"

    with pytest.raises(TypeError, match="must keep the last prompt token"):
        FAMILIES["attention"].check(Dropper())
