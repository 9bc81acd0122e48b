"""Mergers and the full-checkpoint driver: exact results against direct in-memory merges and independent
replicas, streaming in row chunks, sharded inputs and outputs that transformers loads, TALL stores, bad
input, and atomic writes under SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmgraft.offline.merge as driver
from llmgraft.hooks import CheckpointError, ParamError, get_registry
from llmgraft.offline.checkpoints import Checkpoint, ShardWriter
from llmgraft.offline.merge import build_tall, merge_checkpoints, rebuild_tall, trainer_metrics

ROOT = Path(__file__).resolve().parent.parent


def state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_llama):
    """The tiny Llama as base and three fine-tunes (base + task-specific sparse and dense changes), bf16."""
    root = tmp_path_factory.mktemp("merge")
    base_state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state(tiny_llama).items()}
    base = root / "base"
    base.mkdir()
    save_file(base_state, str(base / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_llama / f).exists():
            (base / f).write_text((tiny_llama / f).read_text())
    tasks = []
    for t in range(3):
        gen = torch.Generator().manual_seed(100 + t)
        tuned = {}
        for name, value in base_state.items():
            if value.is_floating_point():
                delta = 0.02 * torch.randn(value.shape, generator=gen)
                delta *= torch.rand(value.shape, generator=gen) < 0.3  # task-specific sparse changes
                tuned[name] = (value.float() + delta).to(value.dtype)
            else:
                tuned[name] = value
        path = root / f"task{t}"
        path.mkdir()
        save_file(tuned, str(path / "model.safetensors"))
        (path / "config.json").write_text((base / "config.json").read_text())
        (path / "trainer_state.json").write_text(json.dumps(
            {"global_step": 100 * (t + 1), "log_history": [{"loss": 3.0 - 0.5 * t, "step": 100 * (t + 1)}]}))
        tasks.append(path)
    return base, tasks


def direct(method: str, base: Path | None, tasks: list[Path], params=None, per_input=None) -> dict:
    """The same merge in memory: the registered merger over whole tensors."""
    merger = get_registry().get("merger", method)
    parsed = merger.params_cls.from_mapping(params or {})
    states = [state(p) for p in tasks]
    anchor = state(base) if base else None
    per_input = per_input or [{} for _ in tasks]
    out = {}
    for name, reference in (anchor or states[0]).items():
        if not reference.is_floating_point():
            out[name] = reference
            continue
        inputs = [s[name] for s in states]
        b = anchor[name] if anchor else None
        stats = [merger.tensor_stats(name, b, t, parsed) for t in inputs]
        out[name] = merger.merge(name, b, inputs, [{**v, **s} for v, s in zip(per_input, stats)], parsed)
    return out


@pytest.mark.parametrize("method, params, per_input", [
    ("uniform", {}, None),
    ("mwa", {"metric": "loss", "penalty": 2.0}, [{"loss": 3.0}, {"loss": 2.5}, {"loss": 2.0}]),
    ("task_arithmetic", {"scale": 0.5}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}]),
    ("ties", {"density": 0.3, "scale": 1.0}, None),
    ("consensus", {"k": 2, "lam": 0.4}, None),
    ("consensus", {"k": 2, "base_method": "ties", "density": 0.5}, None),
])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "row-chunks"])
def test_checkpoint_merge_equals_the_direct_merge(family, tmp_path, monkeypatch, method, params, per_input, chunked):
    base, tasks = family
    if chunked:  # force row chunks of 8 rows on every matrix
        monkeypatch.setattr(driver, "WORKING_BYTES", 1)
    out = tmp_path / "out"
    report = merge_checkpoints(method, tasks, out, base=base, params=params, per_input=per_input, progress=False)
    merged = state(out)
    expected = direct(method, base if get_registry().get("merger", method).needs_base else None, tasks, params,
                      per_input)
    assert set(merged) == set(expected)
    for name, value in expected.items():
        value = value["merged"] if isinstance(value, dict) else value
        assert merged[name].dtype == value.dtype and torch.equal(merged[name], value), name
    assert report["merged_tensors"] == sum(v.is_floating_point() for v in state(base).values())
    assert json.loads((out / "llmgraft_merge.json").read_text())["method"] == method
    assert (out / "config.json").exists()


def test_mwa_reads_trainer_state_and_its_limits(family, tmp_path):
    base, tasks = family
    assert trainer_metrics(tasks[1]) == {"step": 200.0, "loss": 2.5}
    uniform = state(tmp_path / "u") if merge_checkpoints("uniform", tasks, tmp_path / "u", progress=False) else None
    flat = merge_checkpoints("mwa", tasks, tmp_path / "p0", params={"penalty": 0.0}, progress=False)
    assert flat["per_input"][0]["loss"] == 3.0  # from trainer_state.json
    name = "model.layers.0.mlp.up_proj.weight"
    p0 = state(tmp_path / "p0")[name].float()
    assert torch.allclose(p0, uniform[name].float(), atol=1e-2)  # p = 0: the uniform average (bf16 rounding)
    merge_checkpoints("mwa", tasks, tmp_path / "big", params={"penalty": 500.0}, progress=False)
    assert torch.equal(state(tmp_path / "big")[name], state(tasks[2])[name])  # the lowest loss wins
    merge_checkpoints("mwa", tasks, tmp_path / "steps", params={"metric": "step", "penalty": 500.0}, progress=False)
    assert torch.equal(state(tmp_path / "steps")[name], state(tasks[2])[name])  # the latest step wins
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((tasks[0] / "model.safetensors").read_bytes())
    with pytest.raises(ParamError, match=r"mwa: metric 'loss' missing for input\(s\) \[1\]"):
        merge_checkpoints("mwa", [tasks[0], bare], tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_sharded_inputs_and_outputs_load_in_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, tasks = family
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(str(tasks[0]), dtype=torch.bfloat16)
    model.save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists()
    out = tmp_path / "out"
    merge_checkpoints("ties", [sharded, *tasks[1:]], out, base=base, max_shard_bytes=150_000, progress=False)
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    expected = direct("ties", base, [tasks[0], *tasks[1:]])
    for name, tensor in loaded.state_dict().items():
        if name in expected:
            assert torch.equal(tensor, expected[name]["merged"]), name


def test_tall_store_rebuilds_each_task(family, tmp_path, monkeypatch):
    base, tasks = family
    manifest = build_tall(base, tasks, tmp_path / "store", lams=[0.3, 0.4, 0.5], progress=False)
    assert manifest["lams"] == [0.3, 0.4, 0.5] and all(0 < k < 1 for k in manifest["kept_fraction"])
    monkeypatch.setattr(driver, "WORKING_BYTES", 1)  # the chunked store must be the same bytes
    build_tall(base, tasks, tmp_path / "store2", lams=[0.3, 0.4, 0.5], progress=False)
    for f in ("task_vector.safetensors", "mask-0.safetensors", "mask-2.safetensors"):
        assert (tmp_path / "store" / f).read_bytes() == (tmp_path / "store2" / f).read_bytes()
    merger = get_registry().get("merger", "tall")
    theta0, states = state(base), [state(t) for t in tasks]
    for t in range(3):
        rebuild_tall(tmp_path / "store", t, tmp_path / f"task{t}", progress=False)
        rebuilt = state(tmp_path / f"task{t}")
        for name, value in theta0.items():
            if not value.is_floating_point():
                assert torch.equal(rebuilt[name], value)
                continue
            out = merger.merge(name, value, [s[name] for s in states], [{"lam": lam} for lam in (0.3, 0.4, 0.5)],
                               merger.params_cls())
            tau = out["merged"].float()  # τ_MTL as stored (bf16)
            want = (value.float() + torch.where(out[f"mask/{t}"], tau, 0.0)).to(value.dtype)
            assert torch.equal(rebuilt[name], want), name
    store = sum(f.stat().st_size for f in (tmp_path / "store").glob("*.safetensors"))
    inputs = sum((t / "model.safetensors").stat().st_size for t in tasks)
    assert store < 0.5 * inputs  # one vector plus 1 bit per parameter and task, against three checkpoints
    with pytest.raises(ParamError, match=r"task must be an index in \[0, 3\)"):
        rebuild_tall(tmp_path / "store", 3, tmp_path / "bad", progress=False)


# ---- bad input: a clear error and nothing written ----------------------------------------------------------


def _variant(tasks, tmp_path, edit) -> Path:
    tensors = state(tasks[0])
    edit(tensors)
    path = tmp_path / "variant"
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"model.norm.weight": torch.ones(3, dtype=torch.bfloat16)}),
     r"tensor 'model.norm.weight': shape \(3,\) in .* but \(\d+,\)"),
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].float()}),
     r"tensor 'model.norm.weight': dtype torch.float32 in .* but torch.bfloat16"),
    (lambda t: t.pop("model.norm.weight"), r"does not match .*: it lacks \['model.norm.weight'\]"),
])
def test_mismatched_inputs_name_the_tensor(family, tmp_path, edit, message):
    base, tasks = family
    variant = _variant(tasks, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        merge_checkpoints("ties", [tasks[0], variant], tmp_path / "out", base=base, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_corrupt_pickled_and_existing_outputs(family, tmp_path):
    base, tasks = family
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (tasks[0] / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        merge_checkpoints("uniform", [tasks[0], broken], tmp_path / "out", progress=False)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"no safetensors weights \(found pytorch_model.bin: pickled weights "
                                              "are never loaded\\)"):
        merge_checkpoints("uniform", [tasks[0], pickled], tmp_path / "out", progress=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="exists; pass force=True"):
        merge_checkpoints("uniform", tasks, tmp_path / "out", progress=False)
    merge_checkpoints("uniform", tasks, tmp_path / "out", force=True, progress=False)
    assert (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(ParamError, match="ties merges task vectors: it needs the base model"):
        merge_checkpoints("ties", tasks, tmp_path / "t", progress=False)
    with pytest.raises(ParamError, match="consensus: k=5 exceeds the number of inputs"):
        merge_checkpoints("consensus", tasks, tmp_path / "t", base=base, params={"k": 5}, progress=False)


def test_sigkill_mid_merge_leaves_no_output(family, tmp_path):
    base, tasks = family
    out = tmp_path / "out"
    code = f"""
import time
from llmgraft.hooks import get_registry
from llmgraft.offline.merge import merge_checkpoints
merger = get_registry().get("merger", "uniform")
slow = type(merger).merge
type(merger).merge = lambda self, *a: (time.sleep(0.2), slow(self, *a))[1]
merge_checkpoints("uniform", {[str(t) for t in tasks]!r}, {str(out)!r}, progress=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.*/model.safetensors")):
        assert proc.poll() is None and time.time() < deadline, "the merge ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.3)  # mid-merge: the shard is being written
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    orphans = list(tmp_path.glob(".out.*"))
    assert orphans and all(f".out.tmp-{proc.pid}-" in p.name for p in orphans)  # the dead process's temp dir
    merge_checkpoints("uniform", tasks, out, progress=False)  # the next write of the target clears it away
    assert out.is_dir() and not list(tmp_path.glob(".out.*"))


def test_shard_writer_refuses_out_of_order_and_incomplete(tmp_path):
    plan = [("a", torch.float32, (2, 2)), ("b", torch.float32, (3,))]
    writer = ShardWriter(tmp_path, plan)
    with pytest.raises(RuntimeError, match="'b' written out of the planned order"):
        writer.write("b", torch.zeros(3))
    writer.write("a", torch.ones(1, 2))
    writer.write("a", torch.ones(1, 2))  # two row chunks
    with pytest.raises(RuntimeError, match=r"tensors never written: \['b'\]"):
        writer.close()
    writer = ShardWriter(tmp_path, plan)
    writer.write("a", torch.arange(4.0).view(2, 2))
    writer.write("b", torch.ones(3))
    writer.close()
    assert torch.equal(Checkpoint(tmp_path).read("a", (1, 2)), torch.tensor([[2.0, 3.0]]))


def test_cli_merge_and_tall(family, tmp_path):
    base, tasks = family

    def cli(*args, ok=True):
        result = subprocess.run([sys.executable, "-m", "llmgraft.cli", *map(str, args)], capture_output=True,
                                text=True, cwd=ROOT, timeout=300)
        assert (result.returncode == 0) == ok, result.stderr[-2000:]
        return result

    cli("merge", "--method", "ties", "--base", base, *tasks, "--out", tmp_path / "ties", "--set", "density=0.3")
    assert torch.equal(state(tmp_path / "ties")["model.norm.weight"],
                       direct("ties", base, tasks, {"density": 0.3})["model.norm.weight"]["merged"])
    cli("merge", "--method", "mwa", *tasks, "--out", tmp_path / "mwa", "--losses", "3", "2", "1")
    error = cli("merge", "--method", "mwa", *tasks, "--out", tmp_path / "mwa", ok=False).stderr.strip()
    assert error == f"llmgraft: error: {tmp_path / 'mwa'} exists; pass force=True (--force) to replace it"
    error = cli("merge", "--method", "ties", "--base", base, *tasks, "--out", tmp_path / "x", "--set", "densty=0.3",
                ok=False).stderr.strip()
    assert error == ("llmgraft: error: ties: unknown parameter(s) 'densty' (did you mean 'density'?); valid: "
                     "density, scale")
    cli("tall", "build", "--base", base, *tasks, "--out", tmp_path / "store", "--lams", "0.3", "0.4", "0.5")
    cli("tall", "rebuild", tmp_path / "store", "--task", "1", "--out", tmp_path / "t1")
    assert json.loads((tmp_path / "t1" / "llmgraft_merge.json").read_text())["lam"] == 0.4
    # --eval-data picks each task's lambda by the rebuilt model's loss on that task's text
    texts = []
    for t, module in enumerate((json, subprocess, signal)):
        texts.append(tmp_path / f"val{t}.txt")
        texts[-1].write_text(Path(module.__file__).read_text()[:4000])
    out = cli("tall", "build", "--base", base, *tasks, "--out", tmp_path / "store3", "--eval-data", *texts,
              "--candidates", "0.3", "0.5").stdout
    assert "lambda 0.3: validation loss per task" in out and "lambda 0.5: validation loss per task" in out
    assert set(json.loads((tmp_path / "store3" / "tall.json").read_text())["lams"]) <= {0.3, 0.5}
    # `merge --method tall` builds the same store (one lam for all): task 1's mask is the one built at 0.4
    out = cli("merge", "--method", "tall", "--base", base, *tasks, "--out", tmp_path / "store2", "--set", "lam=0.4")
    assert "llmgraft tall rebuild" in out.stdout
    for name in ("task_vector.safetensors", "mask-1.safetensors"):
        assert (tmp_path / "store" / name).read_bytes() == (tmp_path / "store2" / name).read_bytes()
    error = cli("merge", "--method", "tall", "--base", base, *tasks, "--out", tmp_path / "x", "--set", "lamb=1",
                ok=False).stderr.strip()
    assert error.startswith("llmgraft: error: tall: unknown parameter(s) 'lamb' (did you mean 'lam'?)")


# ---- each method against the independent float64 replica of its official code ------------------------------


def _tensors(seed: int, rows: int = 64, cols: int = 48, tasks: int = 4):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=gen)
    inputs = []
    for _ in range(tasks):
        delta = 0.05 * torch.randn(rows, cols, generator=gen) * (torch.rand(rows, cols, generator=gen) < 0.5)
        inputs.append(base + delta)
    return base, inputs


def _ours(method: str, base, inputs, params: dict, per_input=None) -> dict:
    return direct_tensors(method, base, inputs, params, per_input)


def direct_tensors(method, base, inputs, params, per_input=None):
    merger = get_registry().get("merger", method)
    parsed = merger.params_cls.from_mapping(params)
    per_input = per_input or [{} for _ in inputs]
    stats = [merger.tensor_stats("w", base, t, parsed) for t in inputs]
    return merger.merge("w", base, inputs, [{**v, **s} for v, s in zip(per_input, stats)], parsed)


def _np(t):
    return t.double().numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_methods_match_the_replicas(seed):
    import numpy as np

    from replicas import merging as replica

    base, inputs = _tensors(seed)
    b, xs = _np(base), [_np(t) for t in inputs]

    def close(ours, theirs):
        np.testing.assert_allclose(ours["merged"].double().numpy(), theirs, rtol=1e-5, atol=1e-6)

    close(_ours("task_arithmetic", base, inputs, {"scale": 0.7}, [{"weight": w} for w in (1, 0.5, 2, 1)]),
          replica.task_arithmetic(b, xs, 0.7, [1, 0.5, 2, 1]))
    for density in (0.1, 0.2, 0.5, 1.0):
        close(_ours("ties", base, inputs, {"density": density, "scale": 1.3}),
              replica.ties(b, xs, density, 1.3))
    close(_ours("mwa", None, inputs, {"metric": "loss", "penalty": 3.0}, [{"loss": v} for v in (2.0, 1.5, 3.0, 2.2)]),
          replica.mwa(xs, [2.0, 1.5, 3.0, 2.2], 3.0, "loss"))
    close(_ours("mwa", None, inputs, {"metric": "step", "penalty": 1.0}, [{"step": v} for v in (10, 20, 30, 40)]),
          replica.mwa(xs, [10, 20, 30, 40], 1.0, "step"))
    for k, method in ((2, "task_arithmetic"), (3, "task_arithmetic"), (2, "ties")):
        close(_ours("consensus", base, inputs, {"k": k, "lam": 0.4, "base_method": method, "density": 0.2,
                                                "scale": 0.9}),
              replica.consensus(b, xs, k, 0.4, 0.9, method, 0.2))
    lams = [0.2, 0.4, 0.5, 0.6]
    ours = _ours("tall", base, inputs, {}, [{"lam": v} for v in lams])
    theirs = replica.tall_masks(b, xs, lams)
    for t, mask in enumerate(theirs):
        assert np.array_equal(ours[f"mask/{t}"].numpy(), mask), t
    np.testing.assert_allclose(ours["merged"].double().numpy(), sum(x - b for x in xs), rtol=1e-5, atol=1e-6)


def test_bit_packing_round_trips_and_is_documented_order():
    from llmgraft.kernels.merging import pack_bits, unpack_bits

    mask = torch.rand(13, 7, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-91 // 8)
    assert torch.equal(unpack_bits(packed, (13, 7)), mask)
    first = mask.flatten()[:8].tolist()
    assert int(packed[0]) == sum(1 << i for i, bit in enumerate(first) if bit)  # entry i is bit i of byte 0


def test_readme_merge_commands(family, tmp_path):
    """The README's merge block as written, with its placeholders replaced by real checkpoints."""
    from readme_blocks import block, commands

    base, tasks = family
    texts = []
    for t in range(3):
        text = tmp_path / f"val{t + 1}.txt"
        text.write_text("def f(x):\n    return x + %d\n" % t * 60)
        texts.append(text)
    names = {"BASE": base, "FT1": tasks[0], "FT2": tasks[1], "FT3": tasks[2], "RUN/checkpoint-100": tasks[0],
             "RUN/checkpoint-200": tasks[1], "RUN/checkpoint-300": tasks[2], "val1.txt": texts[0],
             "val2.txt": texts[1], "val3.txt": texts[2], "merged": tmp_path / "merged", "mwa-merged": tmp_path / "mwa",
             "store": tmp_path / "store", "task1": tmp_path / "task1"}
    for command in commands(block("merge").code):
        argv = [str(names.get(word, word)) for word in command.split()]
        assert argv[0] == "llmgraft"
        result = subprocess.run([sys.executable, "-m", "llmgraft.cli", *argv[1:]], capture_output=True, text=True,
                                cwd=ROOT, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "task1" / "model.safetensors").exists()
    assert len(json.loads((tmp_path / "store" / "tall.json").read_text())["lams"]) == 3


def test_outputs_never_replace_inputs_and_carry_no_training_state(family, tmp_path):
    base, tasks = family
    with pytest.raises(CheckpointError, match="is or contains the input"):
        merge_checkpoints("uniform", tasks, tasks[0], force=True, progress=False)
    with pytest.raises(CheckpointError, match="is or contains the input"):
        merge_checkpoints("uniform", tasks, tasks[0].parent, force=True, progress=False)
    assert (tasks[0] / "model.safetensors").exists()
    merge_checkpoints("mwa", tasks, tmp_path / "m", progress=False)
    assert not (tmp_path / "m" / "trainer_state.json").exists()  # a later MWA must not read it as a metric
    with pytest.raises(ParamError, match="mwa reads no per-input 'weight'"):
        merge_checkpoints("mwa", tasks, tmp_path / "w", per_input=[{"weight": 1.0}] * 3, progress=False)


def test_negative_weights_negate_a_task(family, tmp_path):
    base, tasks = family
    merge_checkpoints("task_arithmetic", tasks[:1], tmp_path / "neg", base=base, per_input=[{"weight": -1.0}],
                      progress=False)
    name = "model.layers.0.mlp.up_proj.weight"
    theta0, theta1 = state(base)[name].float(), state(tasks[0])[name].float()
    torch.testing.assert_close(state(tmp_path / "neg")[name].float(), (2 * theta0 - theta1).bfloat16().float())


def test_tall_rebuild_refuses_another_base(family, tmp_path, tiny_llama):
    base, tasks = family
    build_tall(base, tasks, tmp_path / "store", progress=False)
    with pytest.raises(CheckpointError, match="is not the base the store was built on"):
        rebuild_tall(tmp_path / "store", 0, tmp_path / "t0", base=tasks[1], progress=False)
