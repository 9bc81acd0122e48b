"""Offline fixtures: corpus split, tokenizer, tiny models, the bundled code LM, metrics, writers, tables."""

from __future__ import annotations

import json

import pytest
import torch

from llmgraft.io import atomic_directory
from llmgraft.metrics import distinct_n, first_logical_line, statement_is_valid
from llmgraft.report import format_table
from llmgraft.testing.corpus import HELDOUT_PACKAGES, package_of, stdlib_files
from llmgraft.testing.tokenizer import train_bpe_tokenizer


def test_corpus_split_is_disjoint_by_package():
    train, held = stdlib_files("train"), stdlib_files("heldout")
    assert len(train) > 500 and len(held) > 10
    assert {package_of(p) for p in held} <= set(HELDOUT_PACKAGES)
    assert not {package_of(p) for p in train} & set(HELDOUT_PACKAGES)
    with pytest.raises(ValueError, match="split"):
        stdlib_files("test")


def test_tokenizer_is_deterministic_and_round_trips():
    files = stdlib_files("all", packages=("json", "csv.py"))
    a, b = train_bpe_tokenizer(512, files), train_bpe_tokenizer(512, files)
    assert a.get_vocab() == b.get_vocab() and len(a) == 512
    code = "def f(x):\n    return {'a': x ** 2}  # ünïcode\n"
    assert a.decode(a(code)["input_ids"]) == code
    assert a.eos_token_id == 0


@pytest.mark.parametrize("builder, arch", [("build_tiny_llama", "LlamaForCausalLM"),
                                           ("build_tiny_mixtral", "MixtralForCausalLM"),
                                           ("build_tiny_qwen2_moe", "Qwen2MoeForCausalLM")])
def test_tiny_models_build_deterministically_and_run(tmp_path, builder, arch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llmgraft.testing import models

    first = getattr(models, builder)(tmp_path / "a")
    second = getattr(models, builder)(tmp_path / "b")
    config = json.loads((first / "config.json").read_text())
    assert config["architectures"] == [arch]
    wa, wb = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    model = AutoModelForCausalLM.from_pretrained(str(first)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, config["vocab_size"]) and torch.isfinite(logits).all()


def test_bundled_code_lm_matches_its_recorded_heldout_loss():
    from transformers import AutoModelForCausalLM

    from llmgraft.testing.code_lm import encode_corpus, heldout_loss
    from llmgraft.testing.models import code_lm_path, load_tokenizer

    path = code_lm_path()
    meta = json.loads((path / "train_meta.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    stream = encode_corpus(load_tokenizer(path), "heldout")
    loss = heldout_loss(model, stream, seq_len=256, max_windows=32)
    # bf16 storage and 32 of the 256 windows: close to, not equal to, the recorded figure.
    assert abs(loss - meta["heldout_loss"]) < 0.25, (loss, meta)
    assert meta["heldout_perplexity"] < 60  # far below a uniform 4096-token guess


def test_metrics():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 0.75 and distinct_n([[1]], 2) == 0.0
    assert first_logical_line("x = ", "f(1,\n  2)\ny = 3") == "f(1,\n  2)\n"
    assert first_logical_line("x = ", "f(1,") is None
    assert statement_is_valid("def f(a):\n    for item in ", "a:\n        g()")
    assert statement_is_valid("def f(a):\n    r = ", "a + 1\n")
    assert not statement_is_valid("def f(a):\n    r = ", "a +\n")
    assert not statement_is_valid("x = ", "'unterminated")


def test_atomic_directory(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("crash mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "v1").write_text("1")
    with atomic_directory(target) as tmp:
        (tmp / "v2").write_text("2")
    assert [p.name for p in target.iterdir()] == ["v2"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_format_table_aligns_columns():
    text = format_table(["name", "ms"], [["a", 1.5], ["long name", 12.25]], title="t")
    lines = text.splitlines()
    assert lines[0] == "t" and lines[1].startswith("name") and lines[-1].endswith("12.25")
    assert len({len(line) for line in lines[1:]}) == 1
