"""SlimMoE (arXiv 2506.18349): slim every expert of an MoE model to a uniform smaller intermediate size, in
stages, each a pruning step followed by knowledge distillation from the original model.

No official code exists; these are our choices, each documented here and in the README:

- **What is pruned.** Every expert is kept; each expert's GLU loses intermediate neurons (gate and up rows,
  down columns) down to one size for all experts, chosen per expert. Optionally the shared expert of
  Qwen2-MoE too (to the same fraction of its own size), and, for Mixtral and PhiMoE, attention by whole
  KV-head groups (a key/value head and the query heads that share it), the same count in every layer,
  chosen per layer; the config then states ``head_dim``, which no longer equals hidden / heads.
- **Importance.** A neuron's score is Σ|θ ⊙ ∇θ L| over its gate row, up row and down column, with the
  gradient of the mean loss over the calibration windows (accumulated, then multiplied by θ): the
  first-order estimate of the loss change when the neuron is removed. L is the KL from the teacher's top-k
  logits renormalised (p̃) to the student's full-vocabulary log-probabilities at those tokens,
  Σ p̃ (log p̃ − log q) (``importance_loss``): the distillation loss below is exactly zero, with a zero
  gradient, when the student is the teacher, which is what the first stage scores.
- **The distillation loss L_KD** (``kd_loss``). Per position, the KL between teacher and student over the
  teacher's top-k tokens (k = 8) plus one bucket for the rest of the vocabulary, both from full softmaxes:
  its minimum is the teacher. (Distilling with ``importance_loss`` instead teaches the student to put all
  its mass on the teacher's top k, which raised the held-out loss in our runs.)
- **The schedule.** Stages of decreasing target sizes (fractions of the source's intermediate size); each
  stage scores the current model, prunes it, then distils it for its share of the token budget (evenly
  split unless given per stage). The teacher is always the source model.
- **The output** is an ordinary checkpoint of the same architecture with a smaller
  ``intermediate_size`` (Mixtral, PhiMoE) or ``moe_intermediate_size`` (Qwen2-MoE), and its config records
  ``llmgraft_slim_moe`` (the stages, sizes and tokens). Intermediate stages are kept beside the output, so
  an interrupted run resumes at its first unfinished stage.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hooks import CheckpointError, Optimizer, ParamError, Params, choice, hookimpl, param
from ..io import atomic_directory
from ..offline.checkpoints import Checkpoint, write_checkpoint


@dataclass(frozen=True)
class MoEArchitecture:
    """Where an MoE architecture keeps its experts, in checkpoint tensor names and config keys."""

    size_key: str                      # config key of the routed experts' intermediate size
    expert: str                        # regex over tensor names: groups layer, expert, projection
    rows: tuple[str, str]              # (gate, up) projections: a neuron is a row
    column: str                        # down projection: a neuron is a column
    shared_size_key: str | None = None
    shared: str | None = None          # regex: groups layer, projection
    attention: str | None = None       # regex: groups layer, projection (q, k, v, o), kind; None: no head pruning


_ATTENTION = r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.(weight|bias)$"


ARCHITECTURES = {
    "mixtral": MoEArchitecture("intermediate_size",
                               r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$",
                               ("w1", "w3"), "w2", attention=_ATTENTION),
    "phimoe": MoEArchitecture("intermediate_size",
                              r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$",
                              ("w1", "w3"), "w2", attention=_ATTENTION),
    "qwen2_moe": MoEArchitecture("moe_intermediate_size",
                                 r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$",
                                 ("gate_proj", "up_proj"), "down_proj", "shared_expert_intermediate_size",
                                 r"model\.layers\.(\d+)\.mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight$"),
}


@dataclass(frozen=True)
class SlimMoEParams(Params):
    stages: tuple[float, ...] = param((0.75, 0.5), range="(0, 1]", help="target expert sizes as fractions of "
                                      "the source's intermediate size, one per stage, decreasing")
    tokens: int = param(32768, range="[0, inf)", help="total distillation tokens, split evenly across stages")
    stage_tokens: tuple[int, ...] | None = param(None, help="distillation tokens per stage (overrides tokens)")
    top_k: int = param(8, range="[1, inf)", help="teacher logits per position that the distillation KL uses")
    calib: str = param("stdlib", help="calibration text file ('stdlib': Python's standard-library sources, "
                                      "the code LM's domain)")
    calib_tokens: int = param(8192, range="[1, inf)", help="calibration tokens for each importance pass")
    seq_len: int = param(128, range="[8, inf)", help="tokens per calibration and training window")
    batch_size: int = param(8, range="[1, inf)", help="windows per importance and training batch")
    lr: float = param(5e-4, range="(0, 1)", help="distillation learning rate (AdamW, constant)")
    shared_expert: bool = param(False, help="also slim Qwen2-MoE's shared expert, to the same fractions")
    attention: tuple[float, ...] | None = param(None, range="(0, 1]", help="fractions of KV-head groups kept "
                                                "per stage (Mixtral, PhiMoE); None keeps attention whole")
    importance: str = choice("sensitivity", ("sensitivity", "random"),
                             help="sensitivity |θ·∇L| per neuron or KV-head group, or random (a baseline)")
    seed: int = param(0, range="[0, inf)", help="seed of the distillation data order and of random pruning")

    def validate(self) -> None:
        if any(b >= a for a, b in zip(self.stages, self.stages[1:])):
            raise ParamError(f"slim_moe: stages must decrease, got {self.stages}")
        if self.stage_tokens is not None and len(self.stage_tokens) != len(self.stages):
            raise ParamError(f"slim_moe: stage_tokens has {len(self.stage_tokens)} values for "
                             f"{len(self.stages)} stages")
        if self.attention is not None and len(self.attention) != len(self.stages):
            raise ParamError(f"slim_moe: attention has {len(self.attention)} fractions for {len(self.stages)} stages")
        if self.attention is not None and any(b > a for a, b in zip(self.attention, self.attention[1:])):
            raise ParamError(f"slim_moe: attention fractions must not increase, got {self.attention}")
        if self.stage_tokens is not None and any(t < 0 for t in self.stage_tokens):
            raise ParamError("slim_moe: stage_tokens must not be negative")

    def tokens_per_stage(self) -> tuple[int, ...]:
        if self.stage_tokens is not None:
            return self.stage_tokens
        return tuple(self.tokens // len(self.stages) for _ in self.stages)


def architecture(config: dict) -> MoEArchitecture:
    """The supported architecture of a model config, or a clear error."""
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        moe = any(k in config for k in ("num_local_experts", "num_experts", "n_routed_experts"))
        raise CheckpointError(f"slim_moe: {'MoE ' if moe else 'not an MoE model: '}model_type {kind!r} "
                              f"{'is not supported' if moe else ''}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[kind]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The distillation loss: mean over positions of the KL between teacher and student on the teacher's
    top-k tokens plus one bucket for the rest, KL((p_1..p_k, 1 − Σp) ‖ (q_1..q_k, 1 − Σq)) with p and q the
    full softmaxes. Its minimum is the teacher itself."""
    values, indices = teacher_logits.float().topk(top_k, dim=-1)
    teacher_all = teacher_logits.float().log_softmax(-1)
    student_all = student_logits.float().log_softmax(-1)
    teacher, student = teacher_all.gather(-1, indices), student_all.gather(-1, indices)
    teacher_rest = torch.log1p(-teacher.exp().sum(-1).clamp(max=1 - 1e-6))
    student_rest = torch.log1p(-student.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (teacher.exp() * (teacher - student)).sum(-1) + teacher_rest.exp() * (teacher_rest - student_rest)
    return kl.mean()


def importance_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The loss whose gradient scores neurons: KL from the teacher's top-k logits renormalised (p̃) to the
    student's full-vocabulary log-probabilities at those tokens, Σ p̃ (log p̃ − log q). Unlike ``kd_loss`` it
    is not zero when the student is the teacher (the student's mass outside the top-k counts), so the first
    stage, which scores the teacher itself, gets a gradient."""
    values, indices = teacher_logits.float().topk(top_k, dim=-1)
    teacher = values.log_softmax(-1)
    student = student_logits.float().log_softmax(-1).gather(-1, indices)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def neuron_scores(glu, importance: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-neuron importance [I] of one gated MLP (``hosts.GLUWeights``)."""
    if importance == "random":
        return torch.rand(glu.gate.shape[0], generator=generator)
    return ((glu.gate * glu.gate_grad).abs().sum(1) + (glu.up * glu.up_grad).abs().sum(1)
            + (glu.down * glu.down_grad).abs().sum(0)).float()


def group_scores(attention, importance: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-KV-head-group importance [kv_heads] of one attention layer (``hosts.AttentionWeights``): a group is
    one key/value head and the query heads that share it, with their rows of q, k, v and columns of o."""
    if importance == "random":
        return torch.rand(attention.kv_heads, generator=generator)
    d, per = attention.head_dim, attention.heads // attention.kv_heads
    rows = [(w * g).abs().sum(1) for w, g in ((attention.q, attention.q_grad), (attention.k, attention.k_grad),
                                              (attention.v, attention.v_grad))]
    out = (attention.o * attention.o_grad).abs().sum(0)
    q = (rows[0] + out).view(attention.kv_heads, per * d).sum(1)
    return (q + rows[1].view(attention.kv_heads, d).sum(1) + rows[2].view(attention.kv_heads, d).sum(1)).float()


def group_rows(groups: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Rows of q (and columns of o) and rows of k and v that the kept KV-head ``groups`` own."""
    per = heads // kv_heads
    q_heads = (groups[:, None] * per + torch.arange(per)).flatten()
    blocks = lambda h: (h[:, None] * head_dim + torch.arange(head_dim)).flatten()  # noqa: E731
    return {"q": blocks(q_heads), "kv": blocks(groups)}


def keep_indices(scores: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` highest-scoring neurons, in their original order (ties: the lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:size]
    return order.sort().values


def prune_checkpoint(src: Path, dst: Path, arch: MoEArchitecture, keep: dict[tuple[int, int | None], torch.Tensor],
                     config: dict, heads: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
    """Write ``src`` with each expert's neurons cut to ``keep[(layer, expert)]`` (``expert`` None: the shared
    expert), and each attention layer's heads to ``heads[layer]`` (``group_rows``), into ``dst``, one tensor at
    a time, with ``config`` as its config.json."""
    checkpoint = Checkpoint(src)
    try:
        plan, cut = [], {}
        for name in checkpoint.names:
            info = checkpoint.tensors[name]
            shape = list(info.shape)
            for pattern, key_of in ((arch.expert, lambda m: (int(m[1]), int(m[2]), m[3])),
                                    (arch.shared, lambda m: (int(m[1]), None, m[2]))):
                match = re.match(pattern, name) if pattern else None
                if match:
                    layer, expert, projection = key_of(match)
                    if (layer, expert) in keep:
                        axis = 1 if projection == arch.column else 0
                        cut[name] = (keep[(layer, expert)], axis)
                        shape[axis] = len(keep[(layer, expert)])
                    break
            match = re.match(arch.attention, name) if arch.attention and heads else None
            if match and int(match[1]) in heads:
                rows = heads[int(match[1])]["q" if match[2] in "qo" else "kv"]
                axis = 1 if match[2] == "o" and match[3] == "weight" else 0
                if not (match[2] == "o" and match[3] == "bias"):  # o's bias is per output feature: kept
                    cut[name] = (rows, axis)
                    shape[axis] = len(rows)
            plan.append((name, info.dtype, tuple(shape)))
        def pruned():
            for name, _, _ in plan:
                tensor = checkpoint.read(name)
                if name in cut:
                    index, axis = cut[name]
                    tensor = tensor.index_select(axis, index)
                yield name, tensor

        write_checkpoint(checkpoint, dst, plan, pruned(), config)
    finally:
        checkpoint.close()


def moe_parameters(model_dir: str | Path) -> dict[str, int]:
    """Parameters of an MoE checkpoint: ``total``, ``experts`` (routed) and ``active`` per token (everything
    but the routed experts, plus top-k of them), from its config and tensor headers."""
    import math

    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = architecture(config)
    checkpoint = Checkpoint(model_dir)
    try:
        sizes = {name: math.prod(info.shape) for name, info in checkpoint.tensors.items()}
    finally:
        checkpoint.close()
    total = sum(sizes.values())
    experts = sum(n for name, n in sizes.items() if re.match(arch.expert, name))
    count = config.get("num_local_experts") or config.get("num_experts")
    return {"total": total, "experts": experts, "active": total - experts + experts * config["num_experts_per_tok"] // count}


def _fingerprint(src: Path, params: SlimMoEParams, stage: int) -> str:
    weights = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in src.glob("*.safetensors"))
    text = json.dumps([str(src.resolve()), weights, params.to_dict(), stage], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SlimMoE(Optimizer):
    name = "slim_moe"
    description = "SlimMoE: slim every expert's GLU by KD sensitivity, in stages of pruning and distillation"
    params_cls = SlimMoEParams

    def run(self, src: Path, dst: Path, params: SlimMoEParams, host, progress=None) -> dict:
        src, dst = Path(src), Path(dst)
        config = json.loads((src / "config.json").read_text())
        arch = architecture(config)
        original = config.get("llmgraft_slim_moe", {}).get("source_size", config[arch.size_key])
        shared_original = config.get(arch.shared_size_key) if arch.shared_size_key else None
        sizes = [max(1, round(f * original)) for f in params.stages]
        if sizes[0] > config[arch.size_key]:
            raise ParamError(f"slim_moe: the first target size {sizes[0]} is larger than the model's current "
                             f"{arch.size_key} {config[arch.size_key]}")
        if params.attention is not None and arch.attention is None:
            raise ParamError(f"slim_moe: attention pruning is for Mixtral and PhiMoE only; stock vLLM derives "
                             f"{config['model_type']}'s head size from hidden_size / heads and ignores head_dim")
        kv_original = config.get("llmgraft_slim_moe", {}).get("source_kv_heads", config.get("num_key_value_heads"))
        if params.shared_expert and shared_original is None:
            raise ParamError(f"slim_moe: model_type {config['model_type']!r} has no shared expert to slim")
        work = dst.parent / f".{dst.name}.stages"
        work.mkdir(parents=True, exist_ok=True)
        windows = host.token_windows(src, params.calib, params.calib_tokens + max(params.tokens_per_stage()),
                                     params.seq_len)
        calib = windows[: max(1, params.calib_tokens // params.seq_len)]
        gen = torch.Generator().manual_seed(params.seed)

        def loss(student_logits, teacher_logits):
            return kd_loss(student_logits, teacher_logits, params.top_k)

        def score_loss(student_logits, teacher_logits):
            return importance_loss(student_logits, teacher_logits, params.top_k)

        current, stages = src, []
        for i, (fraction, size, tokens) in enumerate(zip(params.stages, sizes, params.tokens_per_stage())):
            stage_dir, marker = work / f"stage-{i}", work / f"stage-{i}.done"
            fingerprint = _fingerprint(src, params, i)
            if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
                stages.append(json.loads(marker.read_text())["report"])
                current = stage_dir
                continue
            stage_config = json.loads((current / "config.json").read_text())
            groups = max(1, round(params.attention[i] * kv_original)) if params.attention else None
            if groups is not None and groups > stage_config["num_key_value_heads"]:
                raise ParamError(f"slim_moe: stage {i} keeps {groups} KV-head groups, more than the model's "
                                 f"current {stage_config['num_key_value_heads']}")
            keep, heads = {}, {}
            for part in host.gradients(current, src, calib, score_loss, params.batch_size):
                if hasattr(part, "kv_heads"):  # an attention layer
                    if groups is not None and groups < part.kv_heads:
                        kept = keep_indices(group_scores(part, params.importance, gen), groups)
                        heads[part.layer] = group_rows(kept, part.heads, part.kv_heads, part.head_dim)
                        stage_config.update(num_key_value_heads=groups, head_dim=part.head_dim,
                                            num_attention_heads=groups * (part.heads // part.kv_heads))
                    continue
                if part.expert is None and not params.shared_expert:
                    continue
                target = size if part.expert is not None else max(1, round(fraction * shared_original))
                keep[(part.layer, part.expert)] = keep_indices(neuron_scores(part, params.importance, gen), target)
            stage_config[arch.size_key] = size
            if params.shared_expert:
                stage_config[arch.shared_size_key] = max(1, round(fraction * shared_original))
            pruned = work / f"stage-{i}-pruned"
            prune_checkpoint(current, pruned, arch, keep, stage_config, heads)
            steps = tokens // (params.batch_size * params.seq_len)
            train = windows[len(calib):] if len(windows) > len(calib) else windows
            if steps:
                metrics = host.distil(pruned, src, train, loss, steps, params.lr, params.batch_size, stage_dir,
                                      params.seed + i)
                shutil.rmtree(pruned, ignore_errors=True)
            else:  # no distillation: the pruned checkpoint is the stage's result
                shutil.rmtree(stage_dir, ignore_errors=True)
                pruned.rename(stage_dir)
                metrics = {}
            report = {"stage": i, "size": size, "tokens": steps * params.batch_size * params.seq_len,
                      "steps": steps, **metrics}
            marker.write_text(json.dumps({"fingerprint": fingerprint, "report": report}))
            stages.append(report)
            current = stage_dir
            if progress:
                progress(report)
        final = json.loads((current / "config.json").read_text())
        final["llmgraft_slim_moe"] = {"source": str(src.resolve()), "source_size": original,
                                      "source_kv_heads": kv_original,
                                      "size_key": arch.size_key, "stages": stages,
                                      "params": {k: v for k, v in params.to_dict().items()}}
        with atomic_directory(dst) as tmp:
            for path in current.iterdir():
                if path.is_file() and path.name != "config.json":
                    shutil.copy2(path, tmp / path.name)
            (tmp / "config.json").write_text(json.dumps(final, indent=2, default=list) + "\n")
        shutil.rmtree(work, ignore_errors=True)
        return {"architecture": config["model_type"], "size_key": arch.size_key, "from": original,
                "to": sizes[-1], "kv_heads": final.get("num_key_value_heads"), "stages": stages}


@hookimpl
def llmgraft_register_optimizers(register):
    register(SlimMoE())

