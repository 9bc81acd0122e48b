"""Merging real PEFT LoRA adapters: exact concatenated-rank merges for linear methods (checked against the
deltas and against PEFT's own add_weighted_adapter), SVD re-factorisation with its reported error, full
merged models for masked methods, and the errors for adapters that cannot be merged."""

from __future__ import annotations

import pytest
import torch

from llmgraft.hooks import CheckpointError, ParamError, get_registry
from llmgraft.integrations.peft import merge_adapter_dirs, merge_adapters, merge_adapters_into_base

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture()
def peft_model(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                           adapter_name="x")
    for i, name in enumerate(("y", "z")):
        torch.manual_seed(i + 1)
        model.add_adapter(name, LoraConfig(r=2 + 2 * i, lora_alpha=4, target_modules=TARGETS,
                                           init_lora_weights=False))
    return model.eval()


def deltas(model, adapter):
    from peft.tuners.lora import LoraLayer

    return {n: m.scaling[adapter] * (m.lora_B[adapter].weight.detach() @ m.lora_A[adapter].weight.detach())
            for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


@pytest.mark.parametrize("method, params, per_input, coefficients", [
    ("uniform", {}, None, [1 / 3, 1 / 3, 1 / 3]),
    ("task_arithmetic", {"scale": 0.5}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}], [0.5, 1.0, 0.25]),
    ("mwa", {"metric": "loss", "penalty": 1.0}, [{"loss": 1.0}, {"loss": 2.0}, {"loss": 4.0}], [4 / 7, 2 / 7, 1 / 7]),
])
def test_linear_methods_merge_exactly_at_concatenated_rank(peft_model, method, params, per_input, coefficients):
    report = merge_adapters(peft_model, ["x", "y", "z"], method, "m", params=params, per_input=per_input)
    assert report["exact"] and report["rank"] == 4 + 2 + 4 and report["relative_error"] == 0.0
    inputs = [deltas(peft_model, x) for x in "xyz"]
    merged = deltas(peft_model, "m")
    for name, value in merged.items():
        expected = sum(c * d[name] for c, d in zip(coefficients, inputs))
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    # The merged adapter changes the model's outputs as the weighted deltas do.
    ids = torch.tensor([[1, 5, 9, 14, 2, 7]])
    peft_model.set_adapter("m")
    with torch.no_grad():
        out = peft_model(ids).logits
    assert torch.isfinite(out).all()


def test_cat_merge_equals_peft_add_weighted_adapter(peft_model):
    weights = [0.7, 1.3, 0.4]
    merge_adapters(peft_model, ["x", "y", "z"], "task_arithmetic", "ours", per_input=[{"weight": w} for w in weights])
    peft_model.add_weighted_adapter(["x", "y", "z"], weights, "theirs", combination_type="cat")
    ours, theirs = deltas(peft_model, "ours"), deltas(peft_model, "theirs")
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_svd_refactorisation_reports_its_error(peft_model):
    with pytest.raises(ParamError, match="ties gives full-rank deltas: pass rank=r"):
        merge_adapters(peft_model, ["x", "y", "z"], "ties", "t")
    report = merge_adapters(peft_model, ["x", "y", "z"], "ties", "t", params={"density": 0.5}, rank=3)
    merger = get_registry().get("merger", "ties")
    params = merger.params_cls(density=0.5)
    inputs = [deltas(peft_model, x) for x in "xyz"]
    total = residual = 0.0
    for name, value in deltas(peft_model, "t").items():
        zero = torch.zeros_like(value)
        stats = [merger.tensor_stats(name, zero, d[name], params) for d in inputs]
        dense = merger.merge(name, zero, [d[name] for d in inputs], stats, params)["merged"]
        singular = torch.linalg.svdvals(dense.double())
        best = singular[3:].square().sum()  # Eckart-Young: the rank-3 truncation's error
        torch.testing.assert_close(float((dense - value).double().square().sum()), float(best), rtol=1e-4, atol=1e-9)
        assert report["module_errors"][name] == pytest.approx(float(best.sqrt() / dense.double().norm()), rel=1e-6)
        total += float(dense.double().square().sum())
        residual += float(best)
    assert report["relative_error"] == pytest.approx((residual / total) ** 0.5, rel=1e-6) and report["relative_error"] > 0
    full = merge_adapters(peft_model, ["x", "y", "z"], "uniform", "u", rank=64)
    assert full["relative_error"] < 1e-6  # a rank at least the true rank loses nothing


def test_masked_merge_into_a_full_model(peft_model, tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    merge_adapters_into_base(peft_model, ["x", "y", "z"], "consensus", tmp_path / "m", params={"k": 2})
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).state_dict()
    merger = get_registry().get("merger", "consensus")
    params = merger.params_cls(k=2)
    inputs = [deltas(peft_model, x) for x in "xyz"]
    for module, delta in inputs[0].items():
        key = module.removeprefix("base_model.model.") + ".weight"
        dense = merger.merge(module, torch.zeros_like(delta), [d[module] for d in inputs], [{}] * 3, params)["merged"]
        torch.testing.assert_close(merged[key], base[key] + dense, rtol=1e-5, atol=1e-6)
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    with pytest.raises(CheckpointError, match="exists; pass force=True"):
        merge_adapters_into_base(peft_model, ["x", "y"], "ties", tmp_path / "m")


def test_adapters_that_cannot_merge(peft_model):
    from peft import LoraConfig

    peft_model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    with pytest.raises(ParamError, match="adapters 'x' and 'other' target different modules"):
        merge_adapters(peft_model, ["x", "other"], "uniform", "m")
    with pytest.raises(ParamError, match="no adapter named 'zz'"):
        merge_adapters(peft_model, ["x", "zz"], "uniform", "m")
    with pytest.raises(ParamError, match=r"mwa: metric 'loss' missing for input\(s\) \[0, 1\]"):
        merge_adapters(peft_model, ["x", "y"], "mwa", "m")
    with pytest.raises(ParamError, match="an adapter named 'y' already exists"):
        merge_adapters(peft_model, ["x", "z"], "uniform", "y")
    with pytest.raises(ParamError, match=r"adapter name 'ta_0.5' must be a non-empty string without '\.'"):
        merge_adapters(peft_model, ["x", "z"], "uniform", "ta_0.5")
    peft_model.peft_config["z"].base_model_name_or_path = "some/other-model"
    with pytest.raises(ParamError, match="come from different base models"):
        merge_adapters(peft_model, ["x", "z"], "uniform", "m")


def test_saved_adapter_directories_merge_on_their_deltas(peft_model, tiny_llama, tmp_path):
    """A PEFT run's saved checkpoints: the CLI routes adapter directories to the delta merge (exact for MWA,
    with trainer_state.json's losses), and the plain checkpoint driver refuses to average A and B apart."""
    import json
    import subprocess
    import sys

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmgraft.offline.merge import merge_checkpoints

    dirs = []
    for i, name in enumerate("xyz"):
        path = tmp_path / f"checkpoint-{i}"
        peft_model.save_pretrained(str(tmp_path / "saved"), selected_adapters=[name])
        (tmp_path / "saved" / name).rename(path)  # PEFT saves a non-default adapter in a folder of its name
        config = json.loads((path / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tiny_llama)
        (path / "adapter_config.json").write_text(json.dumps(config))
        (path / "trainer_state.json").write_text(json.dumps({"global_step": 10 * (i + 1),
                                                             "log_history": [{"loss": 3.0 - i}]}))
        dirs.append(path)
    out = tmp_path / "mwa"
    result = subprocess.run([sys.executable, "-m", "llmgraft.cli", "merge", "--method", "mwa", *map(str, dirs),
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "into a rank-10 adapter" in result.stdout
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(out), adapter_name="m")
    weights = [1 / 3.0, 1 / 2.0, 1 / 1.0]
    weights = [w / sum(weights) for w in weights]  # p = 1: w ~ 1/loss
    inputs = [deltas(peft_model, x) for x in "xyz"]
    for name, value in deltas(merged, "m").items():
        expected = sum(w * d[name] for w, d in zip(weights, inputs))
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(CheckpointError, match="is a PEFT adapter: merge adapters on their deltas"):
        merge_checkpoints("uniform", dirs, tmp_path / "wrong", progress=False)
    # TALL over adapters: each written into a full model (base + exact ΔW), then the store as for checkpoints.
    store = tmp_path / "tall"
    result = subprocess.run([sys.executable, "-m", "llmgraft.cli", "tall", "build", "--base", str(tiny_llama),
                             *map(str, dirs), "--out", str(store), "--lam", "0.4"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((store / "tall.json").read_text())["tasks"] == [str(d.resolve()) for d in dirs]
    result = subprocess.run([sys.executable, "-m", "llmgraft.cli", "tall", "rebuild", str(store), "--task", "1",
                             "--out", str(tmp_path / "t1")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    from safetensors.torch import load_file

    base_state = load_file(str(tiny_llama / "model.safetensors"))
    rebuilt = load_file(str(tmp_path / "t1" / "model.safetensors"))
    taus = {name.removeprefix("base_model.model.") + ".weight": [d[name] for d in (deltas(peft_model, x) for x in "xyz")]
            for name in deltas(peft_model, "x")}
    for name, value in base_state.items():
        if name not in taus:
            assert torch.equal(rebuilt[name], value), name  # not adapted: the base's own weights
            continue
        total = sum(taus[name])
        mask = taus[name][1].abs() > 0.4 * (total - taus[name][1]).abs()
        expected = value.float() + torch.where(mask, total, 0.0)
        close = torch.isclose(rebuilt[name].float(), expected, rtol=1e-4, atol=1e-6)
        assert mask.any() and not mask.all() and close.float().mean() > 0.999, name  # boundary rounding aside

    weights_file = dirs[1] / "adapter_model.safetensors"  # truncated: one line, no traceback, nothing written
    weights_file.write_bytes(weights_file.read_bytes()[:-100])
    result = subprocess.run([sys.executable, "-m", "llmgraft.cli", "merge", "--method", "uniform", *map(str, dirs),
                             "--out", str(tmp_path / "broken")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"llmgraft: error: {weights_file}: tensor ")
    assert "the file is truncated or corrupted" in result.stderr and not (tmp_path / "broken").exists()
    weights_file.unlink()
    (dirs[1] / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"no safetensors weights \(found adapter_model.bin: pickled"):
        merge_adapter_dirs(dirs, "uniform", tmp_path / "pickled")


def test_adapter_merges_refuse_what_they_cannot_do(peft_model, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ParamError, match="tall produces a task_vector, not merged weights"):
        merge_adapters(peft_model, ["x", "y"], "tall", "t", rank=4)
    with pytest.raises(ParamError, match="1 sets of per-input values for 2 adapters"):
        merge_adapters_into_base(peft_model, ["x", "y"], "mwa", tmp_path / "m", per_input=[{"loss": 1.0}])
    peft_model.add_adapter("dora", LoraConfig(r=2, target_modules=TARGETS, use_dora=True))
    with pytest.raises(ParamError, match=r"adapter 'dora' uses DoRA \(use_dora\)"):
        merge_adapters(peft_model, ["x", "dora"], "uniform", "m")
    peft_model.add_adapter("saved", LoraConfig(r=2, target_modules=TARGETS, modules_to_save=["lm_head"]))
    with pytest.raises(ParamError, match="adapter 'saved' uses modules_to_save"):
        merge_adapters(peft_model, ["x", "saved"], "uniform", "m")
