"""llmgraft adapters as PEFT methods, through PEFT's own generic operations, the way PEFT tests its own methods:
every registered adapter type (MoS, and the third-party per-layer LoRA of the examples plugin) runs the same
suite on a real transformers Llama: init, save/load round trips, merge/unmerge in three dtypes, unload,
delete, disable, set_adapter, gradients, Trainer, generate, and LoRA export."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

TARGETS = ["q_proj", "v_proj", "down_proj"]
#: Per-type settings that fit the 2-layer tiny Llama (MoS needs (r - r_p)·c ≤ (r_v - r_p)·L·c).
SETTINGS = {"mos": {"r": 6, "r_v": 4, "r_p": 1, "c": 2, "dropout": 0.0}, "plain_lora": {"r": 4}}


@pytest.fixture(params=sorted(SETTINGS))
def kind(request):
    if request.param == "plain_lora":
        request.getfixturevalue("examples_site")  # the third-party plugin, installed and discovered
    return request.param


def make_config(kind: str, **overrides):
    from llmgraft.integrations.peft import config_class

    return config_class(kind)(**{**SETTINGS[kind], "target_modules": TARGETS, **overrides})


def load_base(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def distinct(kind: str, seed: int) -> dict:
    """Settings that make adapters differ: MoS's seed; the fixture LoRA has none, so its alpha."""
    return {"seed": seed} if kind == "mos" else {"alpha": 4.0 * seed}


def adapted(kind, tiny_llama, dtype=torch.float32, seeds=(1,), **overrides):
    """A PeftModel with one adapter per seed ("default", then "other"), each with a random non-identity start."""
    from peft import get_peft_model

    model = None
    for i, seed in enumerate(seeds):
        config = make_config(kind, init_weights=False, **distinct(kind, seed), **overrides)
        name = NAMES[i]
        if model is None:
            model = get_peft_model(load_base(tiny_llama, dtype), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return perturb(model, kind, sum(seeds))


def perturb(model, kind: str, seed: int):
    """Add seeded noise to every adapter tensor, as training would: values no config could regenerate."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in (p for n, p in model.named_parameters() if f"{kind}_" in n):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=gen).to(parameter.dtype))
    return model.eval()


NAMES = ("default", "other")
IDS = torch.tensor([[5, 17, 300, 42, 9, 1000, 7], [8, 8, 120, 3, 77, 51, 2]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_identity_init_starts_at_the_base(kind, tiny_llama):
    from peft import get_peft_model

    base = logits(load_base(tiny_llama))
    model = get_peft_model(load_base(tiny_llama), make_config(kind))
    assert torch.equal(logits(model), base)
    assert not torch.equal(logits(adapted(kind, tiny_llama)), base)


def test_save_load_round_trips_several_adapters_and_a_subfolder(kind, tiny_llama, tmp_path):
    from peft import PeftModel

    model = adapted(kind, tiny_llama, seeds=(1, 2))
    expected = {}
    for name in NAMES:
        model.set_adapter(name)
        expected[name] = logits(model)
    assert not torch.equal(*expected.values())
    model.save_pretrained(tmp_path / "out")
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "adapter_model.safetensors" in saved and not any(s.endswith(".bin") for s in saved)
    assert (tmp_path / "out" / "other" / "adapter_model.safetensors").is_file()
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"mos": "MOS", "plain_lora": "PLAINLORA"}[kind]
    if kind == "mos":  # the saved indices are used, not ones regenerated from the config's seed
        config["seed"] = 99
        (tmp_path / "out" / "adapter_config.json").write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(load_base(tiny_llama), tmp_path / "out")
    loaded.load_adapter(tmp_path / "out" / "other", adapter_name="other")
    for name in NAMES:
        loaded.set_adapter(name)
        assert torch.equal(logits(loaded), expected[name]), name
    # a sub-folder of a larger directory, as on the Hub
    (tmp_path / "repo").mkdir()
    (tmp_path / "out").rename(tmp_path / "repo" / "adapter")
    again = PeftModel.from_pretrained(load_base(tiny_llama), tmp_path / "repo", subfolder="adapter")
    assert torch.equal(logits(again), expected["default"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_unmerge_and_merge_and_unload(kind, tiny_llama, dtype):
    model = adapted(kind, tiny_llama, dtype=dtype)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    before = logits(model)
    tolerance = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 2e-1}[dtype]
    model.merge_adapter()
    merged = logits(model)
    assert (merged - before).abs().max() < tolerance
    merged_weights = {n: p.detach().clone() for n, p in model.named_parameters() if n in weights}
    with warnings.catch_warnings(record=True):
        model.merge_adapter()  # merging twice is idempotent
    assert torch.equal(logits(model), merged)
    model.unmerge_adapter()
    eps = torch.finfo(dtype).eps
    for name, parameter in model.named_parameters():
        if name in weights:  # unmerging restores the weights up to the rounding of W + ΔW and back
            bound = 2 * eps * (merged_weights[name].abs().max() + weights[name].abs().max())
            assert (parameter - weights[name]).abs().max() <= bound, name
    assert (logits(model) - before).abs().max() < tolerance
    plain = model.merge_and_unload()
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    assert (logits(plain) - before).abs().max() < tolerance


def test_safe_merge_detects_nans(kind, tiny_llama):
    model = adapted(kind, tiny_llama)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)


def test_unload_disable_delete_and_set_adapter(kind, tiny_llama):
    base = logits(load_base(tiny_llama))
    model = adapted(kind, tiny_llama, seeds=(1, 2))
    model.set_adapter("other")
    with_other = logits(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), with_other)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n or n.endswith(".other") for n in trainable), trainable
    model.set_adapter("default")
    assert not torch.equal(logits(model), with_other)
    trainable_default = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_default and all(".default." in n or n.endswith(".default") for n in trainable_default)
    model.delete_adapter("other")
    assert not any(".other." in k or k.endswith(".other") for k in model.state_dict()), "deleted tensors remain"
    assert list(model.peft_config) == ["default"]
    model.add_adapter("other", make_config(kind))
    model.set_adapter("other")
    model.delete_adapter("other")  # the active one: "default" becomes active and trainable again
    assert model.active_adapters == ["default"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_default
    assert torch.equal(logits(model.unload()), base)


def test_gradients_reach_adapter_parameters_only(kind, tiny_llama):
    model = adapted(kind, tiny_llama)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    adapter = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all(grads[n] is not None and grads[n].any() for n in adapter)
    assert all(g is None for n, g in grads.items() if n not in adapter)


def test_trainable_parameter_counts(kind, tiny_llama, capsys):
    model = adapted(kind, tiny_llama)
    trainable, total = model.get_nb_trainable_parameters()
    d = {"q_proj": (64, 64), "v_proj": (64, 64), "down_proj": (128, 64)}  # (d_in, d_out)
    # MoS's pools hold L·r_v·(d_in + d_out) per module type (L=2, r_v=4), as LoRA at rank 4 (the fixture's r)
    expected = sum(2 * 4 * (i + o) for i, o in d.values())
    assert trainable == expected
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,d}" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(kind, tiny_llama, dtype):
    reference = logits(adapted(kind, tiny_llama))
    autocast = adapted(kind, tiny_llama, dtype=dtype)  # adapter tensors upcast to float32 (PEFT's default)
    assert {p.dtype for p in autocast.parameters() if p.requires_grad} == {torch.float32}
    assert (logits(autocast) - reference).abs().max() < 0.3
    from peft import get_peft_model

    config = make_config(kind, init_weights=False, **distinct(kind, 1))
    kept = perturb(get_peft_model(load_base(tiny_llama, dtype), config, autocast_adapter_dtype=False), kind, 1)
    assert {p.dtype for p in kept.parameters() if p.requires_grad} == {dtype}
    out = logits(kept)
    assert torch.isfinite(out).all() and (out - reference).abs().max() < 0.3


def test_add_weighted_adapter_is_a_clear_error(kind, tiny_llama):
    model = adapted(kind, tiny_llama, seeds=(1, 2))
    with pytest.raises(NotImplementedError, match="export-lora"):
        model.add_weighted_adapter(list(NAMES), [0.5, 0.5], "mix")


def test_trainer_trains_and_generate_runs(kind, tiny_llama, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = adapted(kind, tiny_llama)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [{"input_ids": row, "labels": row} for row in IDS.repeat(4, 1)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=data).train()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    out = model.eval().generate(input_ids=IDS[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)


def test_export_lora_adds_the_same_delta(kind, tiny_llama, tmp_path):
    from peft import PeftModel

    from llmgraft.integrations.peft import export_lora

    model = adapted(kind, tiny_llama)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    report = export_lora(tmp_path / "adapter", tmp_path / "lora")
    assert report["rank"] == SETTINGS[kind]["r"] and report["layers"] == 6
    lora = PeftModel.from_pretrained(load_base(tiny_llama), tmp_path / "lora")
    assert lora.peft_config["default"].peft_type == "LORA"
    assert (logits(lora) - expected).abs().max() < 1e-5


def test_a_second_adapter_finds_wrapped_layers(kind, tiny_llama):
    """PEFT's "all-linear" and regex targets see layers an earlier adapter wrapped, not their insides."""
    model = adapted(kind, tiny_llama)
    model.add_adapter("wide", make_config(kind, target_modules="all-linear"))
    model.add_adapter("regex", make_config(kind, target_modules=r".*\.q_proj"))
    layers = {n for n, m in model.named_modules() if "wide" in getattr(m, f"{kind}_params", {})}
    assert len(layers) == 2 * 7 and any(n.endswith("q_proj") for n in layers)
    assert sum("regex" in getattr(m, f"{kind}_params", {}) for m in model.modules()) == 2


def test_mixed_adapter_batches_are_a_clear_error(kind, tiny_llama):
    model = adapted(kind, tiny_llama, seeds=(1, 2))
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(IDS, adapter_names=list(NAMES))


def test_sequence_classification_trains_and_saves_its_head(kind, tiny_llama, tmp_path):
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    def base():
        return AutoModelForSequenceClassification.from_pretrained(str(tiny_llama), num_labels=3).eval()

    model = get_peft_model(base(), make_config(kind, task_type="SEQ_CLS", init_weights=False))
    assert any("score" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.add_(1.0)
        expected = model(IDS).logits
    model.save_pretrained(tmp_path / "cls")
    loaded = PeftModel.from_pretrained(base(), tmp_path / "cls").eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)
