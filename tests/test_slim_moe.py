"""SlimMoE on real transformers MoE models (Mixtral, Qwen2-MoE, PhiMoE): the pruned checkpoint removes exactly
the neurons it should, the importance ranks neurons by their effect, the losses are what they say, stages
resume, bad input is refused, and the output loads in transformers and in vLLM with no plugin."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmgraft.hooks import CheckpointError, ParamError
from llmgraft.integrations.transformers.host import TransformersHost
from llmgraft.plugins.slim_moe import (ARCHITECTURES, SlimMoE, SlimMoEParams, importance_loss, kd_loss,
                                       moe_parameters, prune_checkpoint)
from llmgraft.testing import models

FAST = {"tokens": 2048, "calib_tokens": 1024, "seq_len": 64, "batch_size": 4}
BUILDERS = {"mixtral": models.build_tiny_mixtral, "qwen2_moe": models.build_tiny_qwen2_moe,
            "phimoe": models.build_tiny_phimoe}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def moe(request, tmp_path_factory) -> Path:
    return BUILDERS[request.param](tmp_path_factory.mktemp("moe") / request.param)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


IDS = torch.tensor([[5, 17, 300, 42, 9, 1000, 7, 88]])


def test_pruning_removes_exactly_the_chosen_neurons(moe, tmp_path):
    """Dropping neurons from the checkpoint equals zeroing them in the transformers model (gate and up rows,
    down columns; the shared expert too), which pins the fused-layout mapping and the streaming writer."""
    config = json.loads((moe / "config.json").read_text())
    arch = ARCHITECTURES[config["model_type"]]
    size = config[arch.size_key]
    gen = torch.Generator().manual_seed(0)
    keep, zeroed = {}, load(moe)
    for index, layer in enumerate(zeroed.model.layers):
        experts = layer.mlp.experts
        for e in range(experts.gate_up_proj.shape[0]):
            kept = torch.randperm(size, generator=gen)[: size // 2].sort().values
            keep[(index, e)] = kept
            drop = torch.ones(size, dtype=torch.bool)
            drop[kept] = False
            with torch.no_grad():
                experts.gate_up_proj[e, :size][drop] = 0
                experts.gate_up_proj[e, size:][drop] = 0
                experts.down_proj[e][:, drop] = 0
        shared = getattr(layer.mlp, "shared_expert", None)
        if shared is not None:
            shared_size = config[arch.shared_size_key]
            kept = torch.arange(0, shared_size, 2)
            keep[(index, None)] = kept
            drop = torch.ones(shared_size, dtype=torch.bool)
            drop[kept] = False
            with torch.no_grad():
                shared.gate_proj.weight[drop] = 0
                shared.up_proj.weight[drop] = 0
                shared.down_proj.weight[:, drop] = 0
    new_config = {**config, arch.size_key: size // 2}
    if arch.shared_size_key:
        new_config[arch.shared_size_key] = config[arch.shared_size_key] // 2
    prune_checkpoint(moe, tmp_path / "pruned", arch, keep, new_config)
    pruned = load(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.allclose(pruned(IDS).logits, zeroed(IDS).logits, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in zeroed.parameters())


@pytest.mark.parametrize("builder", ["build_tiny_mixtral", "build_tiny_phimoe"])
def test_head_pruning_removes_exactly_the_chosen_groups(builder, tmp_path):
    """Dropping a KV-head group (its q, k, v rows and o columns) equals zeroing its heads' columns of o."""
    from llmgraft.plugins.slim_moe import group_rows

    moe = getattr(models, builder)(tmp_path / "moe")
    config = json.loads((moe / "config.json").read_text())
    heads, kv, d = config["num_attention_heads"], config["num_key_value_heads"], 64 // config["num_attention_heads"]
    zeroed, kept_groups = load(moe), {}
    for index, layer in enumerate(zeroed.model.layers):
        kept = torch.tensor([index % kv])  # a different group per layer
        kept_groups[index] = group_rows(kept, heads, kv, d)
        drop = torch.ones(heads * d, dtype=torch.bool)
        drop[kept_groups[index]["q"]] = False
        with torch.no_grad():
            layer.self_attn.o_proj.weight[:, drop] = 0
    new = {**config, "num_attention_heads": heads // kv, "num_key_value_heads": 1, "head_dim": d}
    prune_checkpoint(moe, tmp_path / "pruned", ARCHITECTURES[config["model_type"]], {}, new, kept_groups)
    with torch.no_grad():
        assert torch.allclose(load(tmp_path / "pruned")(IDS).logits, zeroed(IDS).logits, atol=1e-5)


def test_losses_are_what_they_say():
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 3, 50, generator=gen), torch.randn(2, 3, 50, generator=gen)
    assert float(kd_loss(teacher, teacher, 8)) == pytest.approx(0.0, abs=1e-6)
    assert float(importance_loss(teacher, teacher, 8)) > 0.1  # the student's mass outside the top 8
    p, q = teacher.double().softmax(-1), student.double().softmax(-1)
    top = teacher.topk(8, dim=-1).indices
    pk, qk = p.gather(-1, top), q.gather(-1, top)
    coarse_p = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    coarse_q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    expected = (coarse_p * (coarse_p / coarse_q).log()).sum(-1).mean()
    assert float(kd_loss(student, teacher, 8)) == pytest.approx(float(expected), rel=1e-4)
    renorm = pk / pk.sum(-1, keepdim=True)
    expected = (renorm * (renorm.log() - qk.log())).sum(-1).mean()
    assert float(importance_loss(student, teacher, 8)) == pytest.approx(float(expected), rel=1e-4)


def test_sensitivity_ranks_neurons_by_their_effect(tmp_path):
    """Pruning (no distillation) by sensitivity loses less than random neurons, and much less than the
    least important ones kept (anti-sensitivity), on an MoE upcycled from the trained code LM."""
    teacher = models.upcycle_to_mixtral(models.code_lm_path(), tmp_path / "teacher")
    host = TransformersHost()
    windows = host.token_windows(teacher, "stdlib", 4096, 128)[-16:]
    losses = {}
    for importance in ("sensitivity", "random"):
        out = tmp_path / importance
        SlimMoE().run(teacher, out, SlimMoEParams(stages=(0.5,), tokens=0, calib_tokens=4096,
                                                  importance=importance), host)
        losses[importance] = host.evaluate(out, windows, 8)
    assert losses["sensitivity"] + 0.02 < losses["random"], losses


def test_slim_stages_config_and_resume(moe, tmp_path):
    class CountingHost(TransformersHost):
        distils = 0

        def distil(self, *args, **kwargs):
            CountingHost.distils += 1
            return super().distil(*args, **kwargs)

    class Interrupt(Exception):
        pass

    def stop_after_first(report):
        raise Interrupt

    params = SlimMoEParams(stages=(0.75, 0.5), shared_expert="qwen2" in moe.name, **FAST)
    with pytest.raises(Interrupt):
        SlimMoE().run(moe, tmp_path / "out", params, CountingHost(), progress=stop_after_first)
    assert CountingHost.distils == 1 and not (tmp_path / "out").exists()
    report = SlimMoE().run(moe, tmp_path / "out", params, CountingHost())
    assert CountingHost.distils == 2, "the finished stage was run again"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    arch = ARCHITECTURES[config["model_type"]]
    source = json.loads((moe / "config.json").read_text())
    assert config[arch.size_key] == round(0.5 * source[arch.size_key]) == report["to"]
    assert [s["size"] for s in config["llmgraft_slim_moe"]["stages"]] == [round(0.75 * source[arch.size_key]),
                                                                        report["to"]]
    if params.shared_expert:
        assert config[arch.shared_size_key] == source[arch.shared_size_key] // 2
    assert not list(tmp_path.glob(".*")), "work directories left behind"
    counts, before = moe_parameters(tmp_path / "out"), moe_parameters(moe)
    assert counts["experts"] == before["experts"] // 2 and counts["active"] < before["active"]
    with torch.no_grad():
        assert torch.isfinite(load(tmp_path / "out")(IDS).logits).all()


def test_bad_input_is_refused(tiny_llama, tmp_path):
    mixtral = models.build_tiny_mixtral(tmp_path / "mixtral")
    host = TransformersHost()
    with pytest.raises(CheckpointError, match="not an MoE model: model_type 'llama'"):
        SlimMoE().run(tiny_llama, tmp_path / "x", SlimMoEParams(**FAST), host)
    other = tmp_path / "olmoe"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "olmoe", "num_experts": 8}))
    with pytest.raises(CheckpointError, match="MoE model_type 'olmoe' is not supported"):
        SlimMoE().run(other, tmp_path / "x", SlimMoEParams(**FAST), host)
    with pytest.raises(ParamError, match="stages must decrease"):
        SlimMoEParams(stages=(0.5, 0.75))
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    with pytest.raises(ParamError, match="calibration data too short"):
        SlimMoE().run(mixtral, tmp_path / "x", SlimMoEParams(**{**FAST, "calib": str(short)}), host)
    qwen = models.build_tiny_qwen2_moe(tmp_path / "qwen")
    with pytest.raises(ParamError, match="attention pruning is for Mixtral and PhiMoE only"):
        SlimMoE().run(qwen, tmp_path / "x", SlimMoEParams(**FAST, attention=(1.0, 0.5)), host)
    with pytest.raises(ParamError, match="has no shared expert"):
        SlimMoE().run(mixtral, tmp_path / "x", SlimMoEParams(**FAST, shared_expert=True), host)
    SlimMoE().run(mixtral, tmp_path / "half", SlimMoEParams(stages=(0.5,), tokens=0, calib_tokens=512), host)
    with pytest.raises(ParamError, match="larger than the model's current intermediate_size 64"):
        SlimMoE().run(tmp_path / "half", tmp_path / "x", SlimMoEParams(stages=(0.75,), tokens=0), host)


@pytest.mark.slow
def test_distillation_stage_runs_under_accelerate_ddp(tmp_path):
    """One distillation stage under accelerate with 2 processes on the CPU (DDP over gloo). accelerate 1.15's
    `--cpu --num_processes 2` starts a single process unless mpirun is set up; `--multi_gpu` on a machine
    without GPUs launches 2 processes through torchrun, and Trainer (use_cpu) runs DDP over gloo."""
    teacher = models.build_tiny_mixtral(tmp_path / "teacher")
    SlimMoE().run(teacher, tmp_path / "pruned", SlimMoEParams(stages=(0.5,), tokens=0, calib_tokens=512),
                  TransformersHost())
    accelerate = Path(sys.executable).parent / "accelerate"
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", "-m", "llmgraft.integrations.transformers.host", "distil",
         "--student", str(tmp_path / "pruned"), "--teacher", str(teacher), "--steps", "3", "--batch-size", "2",
         "--seq-len", "32", "--out", str(tmp_path / "distilled")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # each rank prints one JSON report; ranks share stdout, so read the objects, not the lines
    reports = [json.loads(found) for found in re.findall(r"\{[^{}]*\}", result.stdout)]
    assert len(reports) == 2 and all(r["processes"] == 2 for r in reports)  # both ranks, one world of 2
    config = json.loads((tmp_path / "distilled" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["intermediate_size"] == 64
    before, after = load(tmp_path / "pruned"), load(tmp_path / "distilled")
    changed = [n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert changed, "training changed nothing"


@pytest.mark.engine
@pytest.mark.parametrize("kind, options", [("mixtral", {"attention": (0.5,)}), ("qwen2_moe", {"shared_expert": True})])
def test_output_loads_in_vllm_with_no_plugin(kind, options, tmp_path):
    """The slimmed checkpoint (experts halved; KV-head groups or the shared expert too) is an ordinary
    checkpoint of its architecture: vLLM, with plugins disabled, serves it (head_dim from the config) and its
    greedy tokens equal transformers'. (PhiMoE is left out: vLLM 0.32's CPU build runs it through its
    transformers backend, which fails on any PhiMoE checkpoint here, slimmed or not.)"""
    teacher = BUILDERS[kind](tmp_path / "teacher")
    SlimMoE().run(teacher, tmp_path / "slim", SlimMoEParams(stages=(0.5,), **options, **FAST), TransformersHost())
    config = json.loads((tmp_path / "slim" / "config.json").read_text())
    if "attention" in options:
        assert (config["num_key_value_heads"], config["num_attention_heads"], config["head_dim"]) == (1, 1, 32)
    code = f"""
from vllm import SamplingParams
from llmgraft.testing.engine import cpu_engine
llm = cpu_engine({str(tmp_path / 'slim')!r}, max_model_len=256)
out = llm.generate({{"prompt_token_ids": {IDS[0].tolist()}}}, SamplingParams(temperature=0, max_tokens=8))
print("TOKENS", list(out[0].outputs[0].token_ids))
"""
    env = {**os.environ, "VLLM_PLUGINS": "none-at-all", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("TOKENS"))[7:])
    with torch.no_grad():
        expected = load(tmp_path / "slim").generate(IDS, max_new_tokens=8, do_sample=False)[0, IDS.shape[1]:]
    assert served == expected.tolist()


def test_cli_slims_with_progress_and_refuses_to_overwrite(tmp_path):
    model = models.build_tiny_phimoe(tmp_path / "phimoe")
    argv = [sys.executable, "-m", "llmgraft.cli", "slim-moe", "--model", str(model), "--calib", "stdlib",
            "--stages", "0.75,0.5", "--stage-tokens", "1024,2048", "--out", str(tmp_path / "out")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "slimmed phimoe intermediate_size 128 -> 64 in 2 stage(s)" in result.stdout
    assert "SlimMoE stages: 100%" in result.stderr
    stages = json.loads((tmp_path / "out" / "config.json").read_text())["llmgraft_slim_moe"]["stages"]
    assert [s["tokens"] for s in stages] == [1024, 2048]
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "exists; pass force=True (--force)" in again.stderr
