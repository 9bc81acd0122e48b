"""The compiled top-N kernel (llmgraft/kernels/native): exact against torch.topk and float64 sums, in its
AVX-512, AVX2 and scalar builds; cached, atomic builds; and a clear fallback where it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from llmgraft.kernels import native

AVX512 = native.load()
BUILDS = {"avx512": (), "avx2": ("-mno-avx512f",), "scalar": ("-mno-avx512f", "-mno-avx2", "-mno-fma")}
needs_compiler = pytest.mark.skipif(AVX512 is None, reason="no C++ compiler here")


def rows(kind: str, batch: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=gen)
    if kind == "lm":  # a few hundred plausible tokens and one favourite
        x = x * 2.5
        x[:, : max(1, vocab // 64)] += 4.0
        x[torch.arange(batch), torch.randint(vocab, (batch,), generator=gen)] += 8.0
    elif kind == "few_tail":  # logit 0, twenty near -25, the rest near -60
        x = x * 0.5 - 60
        x[:, :20] = -25 + torch.randn(batch, min(20, vocab), generator=gen)
        x[:, 7] = 0.0
    elif kind == "far_tail":  # tail terms exp(-120): below float32's normal range unless scaled
        x = x * 0.1 - 120
        x[:, 3] = 0.0
    elif kind == "ties":
        x = torch.randint(-5, 5, (batch, vocab), generator=gen).float()
    elif kind == "masked":  # an earlier processor masked two thirds of the vocabulary
        x[:, ::3] = float("-inf")
        x[:, 1::3] = float("-inf")
    elif kind == "few_finite":  # fewer finite tokens than n
        x.fill_(float("-inf"))
        x[:, 5], x[:, 9] = 1.0, 2.0
    elif kind == "ascending":  # every token raises the running threshold
        x = torch.arange(vocab, dtype=torch.float32).repeat(batch, 1) * 1e-3
    return x


def float64_tail(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x64 = x.double()
    t = x64 - x64.max(dim=1, keepdim=True).values
    outside = torch.ones_like(x, dtype=torch.bool).scatter_(1, index, False)
    e = torch.where(outside, t.exp(), 0.0)
    return e.sum(1), torch.where(e > 0, e * t, 0.0).sum(1)


KINDS = ["lm", "randn", "few_tail", "far_tail", "ties", "masked", "few_finite", "ascending"]


def built(name: str):
    """The kernel built with ``name``'s flags; skipped where this CPU lacks what that build needs."""
    function = native.load(BUILDS[name])
    if function is None:
        pytest.skip("no C++ compiler here")
    if name != "scalar" and not function.vectorized:
        pytest.skip(f"this CPU has no {name}")
    return function


@needs_compiler
@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch, vocab", [(3, 8192), (2, 32771), (4, 130), (1, 17)])
def test_values_indices_and_tail_sums_are_exact(build, kind, batch, vocab):
    function = built(build)
    x = rows(kind, batch, vocab, seed=vocab)
    for n in sorted({1, 7, 100, 1200, vocab} & set(range(1, vocab + 1))):
        values, index, tail = native.top_n(x, n, "mass+entropy", function=function)
        assert torch.equal(values, torch.topk(x, n).values), (kind, n)
        assert torch.equal(x.gather(1, index), values)
        assert all(len(set(r.tolist())) == n for r in index)
        # Equal values come lowest index first, whatever the thread split.
        same = values[:, 1:] == values[:, :-1]
        assert bool((index[:, 1:] > index[:, :-1])[same].all())
        mass, weighted = float64_tail(x, index)
        torch.testing.assert_close(tail[:, 0], mass, rtol=1e-6, atol=0)
        torch.testing.assert_close(tail[:, 1], weighted, rtol=1e-6, atol=0)
        if kind in ("few_tail", "far_tail") and n < vocab:
            assert bool((mass > 0).all()) and bool((tail[:, 0] > 0).all())


@needs_compiler
def test_one_token_vocabulary():
    values, index, tail = native.top_n(torch.tensor([[3.0], [-1.0]]), 1, "mass+entropy", function=AVX512)
    assert values.flatten().tolist() == [3.0, -1.0] and index.flatten().tolist() == [0, 0]
    assert bool((tail == 0).all())


@needs_compiler
def test_mass_only_leaves_the_weighted_sum_zero():
    x = rows("lm", 2, 4096, seed=1)
    _, _, tail = native.top_n(x, 100, "mass", function=AVX512)
    assert bool((tail[:, 0] > 0).all()) and bool((tail[:, 1] == 0).all())


@needs_compiler
@pytest.mark.parametrize("build", list(BUILDS))
def test_bad_rows_come_back_non_finite(build):
    function = built(build)
    x = torch.randn(4, 1000)
    x[0, 500] = float("nan")
    x[1, 999] = float("nan")  # in the scalar remainder past the last 16-wide block
    x[2, 17] = float("inf")
    x[3] = float("-inf")
    values, _, _ = native.top_n(x, 10, "mass+entropy", function=function)
    assert not bool(torch.isfinite(values[:, 0]).any())


@needs_compiler
def test_strided_rows_and_bad_arguments():
    base = torch.randn(3, 5000)
    view = base[:, :4096]  # rows of 4096 with a row stride of 5000
    values, index, _ = native.top_n(view, 50, "mass", function=AVX512)
    assert torch.equal(values, torch.topk(view, 50).values)
    assert native.applies(view) and not native.applies(base.t()) and not native.applies(base.double())
    with pytest.raises(ValueError, match="rejected"):
        native.top_n(base, 5001, function=AVX512)


@needs_compiler
def test_builds_are_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMGRAFT_CACHE_DIR", str(tmp_path))
    first = native.build(native.compiler())
    stamp = first.stat().st_mtime_ns
    assert native.build(native.compiler()) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind
    other = native.build(native.compiler(), ("-DLLMGRAFT_TEST_VARIANT",))
    assert other != first  # flags are part of the key


def test_a_failed_build_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LLMGRAFT_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="llmgraft.kernels.native"):
        assert native.load(("-fno-such-flag-for-llmgraft",)) is None
        assert native.load(("-fno-such-flag-for-llmgraft",)) is None  # not retried, not logged again
    assert len(caplog.records) == 1 and "using torch" in caplog.text
    assert not any(tmp_path.rglob("*.so"))


def test_no_compiler_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert native.compiler() is None
    assert native.load(("-DLLMGRAFT_TEST_NO_COMPILER",)) is None


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LLMGRAFT_NATIVE", "0")
    assert native.top_n(torch.randn(2, 300), 10) is None
    assert native.describe() == "torch"


@needs_compiler
def test_extra_flags_choose_the_build(monkeypatch):
    if not AVX512.vectorized:
        pytest.skip("no vector build on this CPU")
    monkeypatch.setenv("LLMGRAFT_NATIVE_FLAGS", "-mno-avx512f -mno-avx2 -mno-fma")
    assert native.extra_flags() == ("-mno-avx512f", "-mno-avx2", "-mno-fma")
    assert native.describe() == "torch"  # a scalar build is slower than torch: not used
    assert native.top_n(torch.randn(2, 300), 10) is None
    monkeypatch.setenv("LLMGRAFT_NATIVE_FLAGS", "")
    assert native.describe() == f"compiled, {AVX512.isa}"
