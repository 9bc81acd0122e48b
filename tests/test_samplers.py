"""Top-W, top-nσ and p-less against independent float64 replicas (tests/replicas), on random rows, peaked
rows and the bundled code LM's own logits; plus their parameters, resources and the HF processor.

The seeds hold no boundary ties within a relative 1e-5 (the exactness clause of every truncation sampler),
so the kept sets must be equal.
"""

from __future__ import annotations

import pytest
import torch

from llmgraft.hooks import ParamError, get_registry
from llmgraft.hooks.resources import ModelResources, ResourceError
from llmgraft.kernels.thresholds import p_less, top_nsigma
from llmgraft.kernels.top_w import TopWStats, top_w, unit_embeddings
from replicas.thresholds import p_less_keep, top_nsigma_keep
from replicas.top_w import top_w_iterations


def kept_ids(row: torch.Tensor) -> list[int]:
    return torch.isfinite(row).nonzero().flatten().tolist()


def rows_of(kind: str, batch: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=gen)
    if kind == "random":
        return x * torch.linspace(0.3, 4.0, batch).unsqueeze(1)
    if kind == "peaked":  # one token far ahead of a noisy tail, or the mass in ~20 tokens
        x = x * 2
        x[0::2, 5] += 25
        x[1::2] = -60.0
        x[1::2, 0] = 0.0
        x[1::2, 1:21] = -8 + torch.randn(len(x[1::2]), 20, generator=gen)
        return x
    if kind == "masked":  # earlier processors masked part of the row
        x = x * 2
        x[:, ::3] = float("-inf")
        return x
    raise ValueError(kind)


@pytest.fixture(scope="module")
def code_lm():
    from transformers import AutoModelForCausalLM

    from llmgraft.testing.models import code_lm_path, load_tokenizer

    path = code_lm_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, load_tokenizer()


@pytest.fixture(scope="module")
def code_lm_logits(code_lm):
    """The code LM's logits at 24 positions of real Python source."""
    model, tok = code_lm
    text = "import os\n\n\ndef list_files(root):\n    out = []\n    for name in os.listdir(root):\n"
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        return model(ids).logits[0, -24:]


# ---- Top-W ------------------------------------------------------------------------------------------------


def embeddings(vocab: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, width, generator=gen) * torch.rand(width, generator=gen) * 3 + torch.randn(width)


def assert_top_w_matches(x: torch.Tensor, table: torch.Tensor, top_m: int, potential: str = "nearest",
                         **per_row) -> TopWStats:
    stats = TopWStats()
    out = top_w(x.clone(), unit_embeddings(table), top_m=top_m, potential=potential, stats=stats,
                **{k: torch.tensor(v) for k, v in per_row.items()})
    for b in range(len(x)):
        args = {k: v[b] for k, v in per_row.items()}
        ref, passes, converged, _ = top_w_iterations(x[b].double().numpy(), table.double().numpy(),
                                                     top_m=top_m, potential=potential, **args)
        assert kept_ids(out[b]) == ref.tolist(), f"row {b} ({args}): kept {len(kept_ids(out[b]))}, replica {len(ref)}"
        assert int(stats.passes[b]) == passes and bool(stats.converged[b]) == converged
    return stats


@pytest.fixture(params=["shortcut", "exact"])
def settle(request, monkeypatch):
    """Run Top-W with its exact shortcut (``_settled``) and, separately, with the whole pool's potential."""
    if request.param == "exact":
        import llmgraft.kernels.top_w as module

        monkeypatch.setattr(module, "_settled", lambda p, *args: torch.zeros(len(p), dtype=torch.bool))
    return request.param


@pytest.mark.parametrize("kind", ["random", "peaked", "masked"])
@pytest.mark.parametrize("potential", ["nearest", "matching"])
def test_top_w_matches_replica(kind, potential, settle, kernel_path):
    x = rows_of(kind, 8, 2000, seed=3)
    table = embeddings(2000, 24, seed=4)
    betas = [2.8, 2.0, 3.5, 2.8, 5.0, 2.8, 1.0, 2.8]
    lams = [2.2, 2.2, 1.0, 3.0, 2.2, 2.2, 2.2, 0.5]
    assert_top_w_matches(x, table, 300, potential, beta=betas, lam=lams)


def test_top_w_matches_replica_on_the_code_lm(code_lm, code_lm_logits, settle, kernel_path):
    model, _ = code_lm
    table = model.get_input_embeddings().weight.detach()
    for temperature in (0.7, 1.5, 3.0):
        stats = assert_top_w_matches(code_lm_logits[:12] / temperature, table, 1200)
        assert int(stats.kept.max()) > 1  # real rows, not all one-token


def test_top_w_per_row_parameters_and_limits():
    x = rows_of("random", 6, 1000, seed=5)
    unit = unit_embeddings(embeddings(1000, 16, seed=6))
    betas = torch.tensor([0.5, 1.5, 2.8, 4.0, 8.0, 30.0])
    out = top_w(x.clone(), unit, beta=betas, lam=2.2, top_m=200)
    single = torch.cat([top_w(x[i:i + 1].clone(), unit, beta=float(b), top_m=200) for i, b in enumerate(betas)])
    assert torch.equal(torch.isfinite(out), torch.isfinite(single))
    kept = [len(kept_ids(r)) for r in top_w(x[:1].repeat(6, 1).clone(), unit, beta=betas, top_m=200)]
    assert kept == sorted(kept) and kept[0] < kept[-1]  # a larger mass reward keeps more
    assert max(len(kept_ids(r)) for r in out) <= 200    # never beyond the pool
    with pytest.raises(ValueError, match="1000 rows but the logits have 999 columns"):
        top_w(x[:, :999].clone(), unit)


def test_top_w_sampler_needs_the_model():
    sampler = get_registry().get("sampler", "top_w")
    assert sampler.needs == ("input_embeddings",) and sampler.primary == "beta"
    x = rows_of("random", 2, 300, seed=7)
    params = sampler.params_cls().stack([sampler.params_cls()] * 2)
    with pytest.raises(ResourceError, match="top_w needs the model"):
        sampler.apply(x.clone(), params, None)
    table = embeddings(301, 8, seed=1)
    model = ModelResources({"input_embeddings": lambda: table}, where="model X")
    with pytest.raises(ResourceError, match=r"input embeddings of model X have shape \(301, 8\) but the logits "
                                            "have 300 columns"):
        sampler.apply(x.clone(), params, model)
    loads = []
    model = ModelResources({"input_embeddings": lambda: loads.append(1) or table[:300]})
    for _ in range(3):
        out = sampler.apply(x.clone(), params, model)
    assert loads == [1] and torch.isfinite(out).any(-1).all()  # loaded and standardised once per model


# ---- top-nσ and p-less --------------------------------------------------------------------------------------


@pytest.fixture(params=["numpy", "torch"])
def rule_path(request, monkeypatch):
    """Threshold rules run on numpy views for small CPU inputs and in torch otherwise: test both."""
    if request.param == "torch":
        import llmgraft.kernels.truncation as module

        monkeypatch.setattr(module, "_NUMPY_MAX_LOGITS", 0)
    return request.param


@pytest.mark.parametrize("kind", ["random", "peaked", "masked"])
@pytest.mark.parametrize("ddof", [1, 0])
def test_top_nsigma_matches_replica(kind, ddof, rule_path):
    x = rows_of(kind, 8, 4096, seed=11)
    ns = torch.tensor([0.0, 0.3, 0.5, 1.0, 1.0, 1.5, 2.0, 3.0])
    out = top_nsigma(x.clone(), ns, ddof)
    for b in range(len(x)):
        assert kept_ids(out[b]) == top_nsigma_keep(x[b].double().numpy(), float(ns[b]), ddof=ddof), f"row {b}"


@pytest.mark.parametrize("kind", ["random", "peaked", "masked"])
@pytest.mark.parametrize("variant, order", [("p_less", 2.0), ("p_less", 3.0), ("p_less", 1.5), ("p_less_norm", 2.0)])
def test_p_less_matches_replica(kind, variant, order, rule_path):
    x = rows_of(kind, 8, 4096, seed=13)
    out = p_less(x.clone(), variant, order)
    for b in range(len(x)):
        assert kept_ids(out[b]) == p_less_keep(x[b].double().numpy(), variant, order=order), f"row {b}"


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_thresholds_match_replicas_on_the_code_lm(code_lm_logits, temperature, rule_path):
    x = code_lm_logits / temperature
    sigma, less = top_nsigma(x.clone(), 1.0), p_less(x.clone())
    for b in range(len(x)):
        row = x[b].double().numpy()
        assert kept_ids(sigma[b]) == top_nsigma_keep(row, 1.0)
        assert kept_ids(less[b]) == p_less_keep(row)
    # top-nσ's set does not depend on the temperature; p-less's grows with it.
    assert torch.equal(torch.isfinite(top_nsigma(code_lm_logits.clone(), 1.0)), torch.isfinite(sigma))


def test_threshold_samplers_can_keep_more_than_any_top_n():
    x = torch.zeros(1, 5000)
    x[0, :3000] = 1.0
    assert len(kept_ids(p_less(x.clone())[0])) == 3000
    assert len(kept_ids(top_nsigma(x.clone(), 1.0)[0])) == 3000


def test_p_less_norm_is_order_two_only():
    cls = get_registry().get("sampler", "p_less").params_cls
    with pytest.raises(ParamError, match="p_less_norm' is defined for order 2 only"):
        cls(order=3.0, variant="p_less_norm")
    with pytest.raises(ParamError, match=r"order must be in \(1, 100\]"):
        cls(order=1.0)


# ---- the transformers processor -------------------------------------------------------------------------------


def test_hf_processor_runs_top_w_with_the_model(code_lm, code_lm_logits):
    from llmgraft.integrations.transformers import GraftLogitsProcessor

    model, tok = code_lm
    with pytest.raises(ParamError, match="pass model=<your PreTrainedModel>"):
        GraftLogitsProcessor("top_w", temperature=1.0)
    proc = GraftLogitsProcessor("top_w", model=model, temperature=1.5, top_w=3.0, top_w_alt_iters=4)
    scores = code_lm_logits[:4].clone()
    out = proc(None, scores.clone())
    unit = unit_embeddings(model.get_input_embeddings().weight)
    expected = top_w(scores / 1.5, unit, beta=3.0, alt_iters=4)
    assert torch.equal(torch.isfinite(out), torch.isfinite(expected))
    assert torch.allclose(out[torch.isfinite(out)], scores[torch.isfinite(out)])  # kept logits unchanged

    ids = torch.tensor([tok.encode("def main():\n    ")])
    torch.manual_seed(0)
    generated = model.generate(ids, do_sample=True, temperature=1.5, top_k=0, max_new_tokens=8,
                               logits_processor=[proc], pad_token_id=0)
    assert generated.shape[1] == ids.shape[1] + 8


@pytest.mark.parametrize("name, kwargs", [("top_nsigma", {"top_nsigma": 0.8}), ("p_less", {}),
                                          ("p_less", {"p_less_variant": "p_less_norm"})])
def test_hf_processor_threshold_samplers(code_lm_logits, name, kwargs):
    from llmgraft.integrations.transformers import GraftLogitsProcessor

    proc = GraftLogitsProcessor(name, temperature=0.8, **kwargs)
    out = proc(None, code_lm_logits.clone())
    x = (code_lm_logits / 0.8).double().numpy()
    for b in range(len(x)):
        if name == "top_nsigma":
            assert kept_ids(out[b]) == top_nsigma_keep(x[b], 0.8)
        else:
            assert kept_ids(out[b]) == p_less_keep(x[b], kwargs.get("p_less_variant", "p_less"))


def test_the_two_potentials_differ():
    """So that the matching-potential tests test something of their own."""
    x = rows_of("random", 8, 2000, seed=3)
    unit = unit_embeddings(embeddings(2000, 24, seed=4))
    lam = torch.tensor([2.2, 2.2, 1.0, 3.0, 2.2, 2.2, 2.2, 0.5])
    nearest = torch.isfinite(top_w(x.clone(), unit, lam=lam, top_m=300, potential="nearest"))
    matching = torch.isfinite(top_w(x.clone(), unit, lam=lam, top_m=300, potential="matching"))
    assert not torch.equal(nearest, matching)


def test_workspaces_serve_inference_mode_and_normal_calls_alike():
    """Hosts call samplers under torch.inference_mode (vLLM), tools and tests outside it: the reused
    workspaces must work in both orders (an inference tensor cannot be written outside the mode)."""
    from llmgraft.kernels.top_h import top_h

    x = rows_of("random", 4, 3000, seed=17)
    unit = unit_embeddings(embeddings(3000, 8, seed=1))
    runs = []
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            runs.append([torch.isfinite(f(x.clone())) for f in (lambda y: top_w(y, unit, top_m=300),
                                                                lambda y: p_less(y),
                                                                lambda y: top_h(y, 0.4, variant="paper"))])
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


def test_p_less_in_row_chunks_equals_one_pass(monkeypatch):
    import llmgraft.kernels.thresholds as module

    x = rows_of("random", 7, 3000, seed=19)
    whole = torch.isfinite(p_less(x.clone(), order=3.0))
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 2 * 3000)  # two rows per chunk, the last one alone
    assert torch.equal(torch.isfinite(p_less(x.clone(), order=3.0)), whole)


def test_other_spellings_and_the_p_less_switch():
    from llmgraft.hooks.sampling import parse_sampler_fields

    assert parse_sampler_fields({"top_w": 5, "lambda": 1.5}).params.lam == 1.5
    assert parse_sampler_fields({"top_w": 5, "top_w_lambda": 1.5}).params.lam == 1.5
    assert parse_sampler_fields({"llmgraft_sampler": "top_nsigma", "nsigma": 0.7}).params.n == 0.7
    with pytest.raises(ParamError, match="'lam' given twice"):
        parse_sampler_fields({"top_w": 5, "lambda": 1.5, "lam": 2})
    for switch in (True, 1):
        with pytest.raises(ParamError, match='send {"llmgraft_sampler": "p_less"}'):
            parse_sampler_fields({"p_less": switch})
