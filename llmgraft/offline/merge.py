"""The full-checkpoint merge driver: any registered merger over Hugging Face safetensors directories, streamed
tensor by tensor (and row chunk by row chunk for large tensors), written atomically. It knows no method.

Also the TALL store: ``build_tall`` writes the multi-task vector τ_MTL and one bit-packed mask per task, and
``rebuild_tall`` reconstructs any task's model θ_t = θ₀ + m_t ⊙ τ_MTL from it and the base.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..hooks import get_registry
from ..hooks.errors import CheckpointError, ParamError
from ..io import atomic_directory
from ..kernels.merging import pack_bits, unpack_bits
from .checkpoints import Checkpoint, ShardWriter, copy_side_files

#: Working memory one merge step may use (inputs, float32 copies and intermediates of one row chunk).
WORKING_BYTES = 96 << 20
#: Bytes per element a merge step needs per input (its tensor, float32 task vector, stacked copies, masks).
_BYTES_PER_ELEMENT = 14
STORE_FORMAT = "llmgraft-tall/1"
REPORT = "llmgraft_merge.json"
#: Files of an input that describe its training, not the merged result (MWA would read them back wrongly).
NOT_CARRIED = {REPORT, "trainer_state.json", "tall.json"}


def trainer_metrics(checkpoint: str | Path) -> dict[str, float]:
    """``step`` and ``loss`` from the ``trainer_state.json`` HF Trainer writes into each checkpoint: the step
    is ``global_step``; the loss is the last evaluation loss logged, else the last training loss."""
    path = Path(checkpoint) / "trainer_state.json"
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    out: dict[str, float] = {}
    if state.get("global_step"):
        out["step"] = float(state["global_step"])
    history = state.get("log_history") or []
    for key in ("eval_loss", "loss"):
        values = [entry[key] for entry in history if isinstance(entry.get(key), (int, float))]
        if values:
            out["loss"] = float(values[-1])
            break
    return out


def linear_coefficients(merger, params, per_input: list[dict]) -> tuple[float, list[float]]:
    """(c₀, [c_i]) with merge(θ₀, θ_i) = c₀θ₀ + Σ c_i θ_i for a ``linear`` merger, read by merging
    one-element probes (c₀ = 0 for mergers without a base)."""
    count = len(per_input)
    zero = torch.zeros(1, dtype=torch.float64)
    probe = [zero.clone() for _ in range(count)]

    def run(base, inputs):
        return float(merger.merge("probe", base, inputs, per_input, params)["merged"])

    c0 = run(torch.ones(1, dtype=torch.float64), probe) if merger.needs_base else 0.0
    cs = []
    for i in range(count):
        inputs = [zero.clone() for _ in range(count)]
        inputs[i] = torch.ones(1, dtype=torch.float64)
        cs.append(run(zero.clone() if merger.needs_base else None, inputs))
    return c0, cs


def merge_whole(merger, name: str, base: torch.Tensor | None, inputs: Sequence[torch.Tensor],
                per_input: Sequence[Mapping[str, Any]], params) -> dict[str, torch.Tensor]:
    """One whole tensor merged as every driver does it: each input's ``tensor_stats``, then ``merge``."""
    stats = [merger.tensor_stats(name, base, t, params) for t in inputs]
    return merger.merge(name, base, list(inputs), [{**v, **s} for v, s in zip(per_input, stats)], params)


def _open(paths: Sequence[str | Path]) -> list[Checkpoint]:
    return [Checkpoint(p) for p in paths]


def _check_compatible(reference: Checkpoint, others: Sequence[Checkpoint]) -> None:
    """Every checkpoint holds the reference's tensors, with the same shapes and dtypes (errors name them)."""
    for other in others:
        missing = [n for n in reference.names if n not in other.tensors]
        extra = [n for n in other.names if n not in reference.tensors]
        if missing or extra:
            what = f"lacks {missing[:3]}" if missing else f"has extra tensors {extra[:3]}"
            raise CheckpointError(f"{other.path} does not match {reference.path}: it {what}")
        for name, info in reference.tensors.items():
            theirs = other.tensors[name]
            if theirs.shape != info.shape:
                raise CheckpointError(f"tensor {name!r}: shape {theirs.shape} in {other.path} but {info.shape} in "
                                      f"{reference.path}")
            if theirs.dtype != info.dtype:
                raise CheckpointError(f"tensor {name!r}: dtype {theirs.dtype} in {other.path} but {info.dtype} in "
                                      f"{reference.path}")


def _chunks(rows: int, row_elements: int, inputs: int) -> list[tuple[int, int]]:
    """Row ranges whose working memory stays under ``WORKING_BYTES``; each a multiple of 8 rows (so bit
    masks of consecutive chunks concatenate), except the last."""
    per_row = max(1, row_elements * _BYTES_PER_ELEMENT * (inputs + 2))
    step = max(8, (WORKING_BYTES // per_row) // 8 * 8)
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def fingerprint(checkpoint: Checkpoint) -> str:
    """A digest of a checkpoint's tensor names, shapes and first and last bytes of each: cheap, and enough to
    tell a store's base from another model of the same shapes."""
    import hashlib

    digest = hashlib.sha256()
    for name, info in checkpoint.tensors.items():
        digest.update(f"{name}{info.shape}{info.dtype}".encode())
        edge = min(64, info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            digest.update(f.read(edge))
            f.seek(info.end - edge)
            digest.update(f.read(edge))
    return digest.hexdigest()


class _FileRows:
    """Row ranges of one tensor of a checkpoint, read on demand (``kernels.merging.Rows``'s interface)."""

    def __init__(self, checkpoint: Checkpoint, name: str) -> None:
        self.checkpoint, self.name = checkpoint, name
        self.shape = checkpoint.tensors[name].shape

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.checkpoint.read(self.name, (start, stop))


def _per_input(merger, count: int, values: Sequence[Mapping[str, Any]] | None, paths: Sequence[Path]) -> list[dict]:
    """Per-input values: given ones, completed from trainer_state.json when the method reads them."""
    given = [dict(v) for v in values] if values is not None else [{} for _ in range(count)]
    if len(given) != count:
        raise ParamError(f"{len(given)} sets of per-input values for {count} inputs")
    unread = sorted({k for v in given for k in v} - set(merger.input_values))
    if unread:
        raise ParamError(f"{merger.name} reads no per-input {', '.join(map(repr, unread))} (it reads: "
                         f"{', '.join(merger.input_values) or 'nothing'})")
    if merger.input_values:
        for values_i, path in zip(given, paths):
            for key, value in trainer_metrics(path).items():
                if key in merger.input_values:
                    values_i.setdefault(key, value)
    return given


def _stream(merger, params, reference: Checkpoint, base: Checkpoint | None, inputs: list[Checkpoint],
            per_input: list[dict], write: Callable[[str, dict[str, torch.Tensor], tuple[int, int] | None], None],
            progress: bool, desc: str) -> int:
    """Merge every tensor, calling ``write(name, outputs, rows)`` per whole tensor or row chunk."""
    merged = 0
    with _progress(len(reference.names), desc, progress) as bar:
        for name in reference.names:
            info = reference.tensors[name]
            if not info.dtype.is_floating_point:  # integer buffers are copied, never merged
                write(name, {"merged": reference.read(name)}, None)
                bar.update(1)
                continue
            rows = info.shape[0] if info.shape else 1
            row_elements = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
            ranges = _chunks(rows, row_elements, len(inputs)) if merger.elementwise and info.shape else [(0, rows)]
            if len(ranges) == 1:
                anchor = base.read(name) if base is not None else None
                write(name, merge_whole(merger, name, anchor, [c.read(name) for c in inputs], per_input, params),
                      None)
            else:  # whole-tensor statistics one input at a time (if any), then row chunks of all inputs
                values = per_input
                if merger.needs_tensor_stats(params):  # read through row readers, never whole
                    anchor = _FileRows(base, name) if base is not None else None
                    stats = [merger.tensor_stats(name, anchor, _FileRows(c, name), params) for c in inputs]
                    values = [{**v, **s} for v, s in zip(per_input, stats)]
                for a, b in ranges:
                    tensors = [c.read(name, (a, b)) for c in inputs]
                    anchor = base.read(name, (a, b)) if base is not None else None
                    write(name, merger.merge(name, anchor, tensors, values, params), (a, b))
            merged += 1
            bar.update(1)
    return merged


def merge_checkpoints(method: str, inputs: Sequence[str | Path], out: str | Path, *, base: str | Path | None = None,
                      params: Mapping[str, Any] | None = None, per_input: Sequence[Mapping[str, Any]] | None = None,
                      force: bool = False, max_shard_bytes: int = 2 << 30, progress: bool = True) -> dict[str, Any]:
    """Merge full checkpoints with the registered merger ``method`` into ``out`` (a model directory).

    ``per_input`` gives each input's values (MWA: ``{"loss": ...}``); missing ones are read from a
    ``trainer_state.json`` in the input's directory. The output carries the reference's config and tokenizer
    files (the base's, else the first input's) and ``llmgraft_merge.json``, a record of the merge."""
    merger = get_registry().get("merger", method)
    if merger.merged_is != "model":
        raise ParamError(f"{method} does not produce a model (it produces a {merger.merged_is}): use its own "
                         "command (llmgraft tall build)")
    return _merge(merger, inputs, out, base, params, per_input, force, max_shard_bytes, progress)


def check_output(out: str | Path, force: bool, sources: Sequence[str | Path | None]) -> Path:
    """The output path, refused when it exists without ``force`` or when it is, or holds, one of the sources
    (replacing it would delete an input)."""
    out = Path(out)
    target = out.resolve()
    for source in sources:
        if source is None:
            continue
        path = Path(source).resolve()
        if path == target or target in path.parents:
            raise CheckpointError(f"the output {out} is or contains the input {source}: choose another --out")
    if out.exists() and not force:
        raise CheckpointError(f"{out} exists; pass force=True (--force) to replace it")
    return out


def _prepare(merger, inputs, out, base, params, per_input, force):
    if len(inputs) < 1:
        raise ParamError("merging needs at least one input")
    out = check_output(out, force, [*inputs, base])
    if merger.needs_base and base is None:
        raise ParamError(f"{merger.name} merges task vectors: it needs the base model (--base)")
    parsed = merger.params_cls.from_mapping(params or {})
    paths = [Path(p) for p in inputs]
    adapters = [p for p in paths if (p / "adapter_config.json").is_file()]
    if adapters:  # averaging lora_A and lora_B apart is not averaging the deltas B·A
        raise CheckpointError(f"{adapters[0]} is a PEFT adapter: merge adapters on their deltas with "
                              "llmgraft.integrations.peft.merge_adapter_dirs (the CLI does so by itself)")
    values = _per_input(merger, len(paths), per_input, paths)
    merger.check_inputs(values, parsed)
    checkpoints = _open(paths)
    anchor = Checkpoint(base) if base is not None else None
    reference = anchor or checkpoints[0]
    _check_compatible(reference, [c for c in checkpoints if c is not reference])
    return out, parsed, values, checkpoints, anchor, reference


def _merge(merger, inputs, out, base, params, per_input, force, max_shard_bytes, progress) -> dict[str, Any]:
    out, parsed, values, checkpoints, anchor, reference = _prepare(merger, inputs, out, base, params, per_input,
                                                                  force)
    start = time.perf_counter()
    plan = [(n, i.dtype, i.shape) for n, i in reference.tensors.items()]
    try:
        with atomic_directory(out) as tmp:
            writer = ShardWriter(tmp, plan, max_shard_bytes, metadata={"llmgraft_merge": merger.name})
            count = _stream(merger, parsed, reference, anchor, checkpoints, values,
                            lambda name, outputs, rows: writer.write(name, outputs["merged"]), progress,
                            f"merge {merger.name}")
            files = writer.close()
            copy_side_files(reference, tmp, skip=NOT_CARRIED)
            report = {"method": merger.name, "params": parsed.to_dict(), "base": str(base) if base else None,
                      "inputs": [str(p) for p in inputs], "per_input": values, "tensors": len(plan),
                      "merged_tensors": count, "bytes": sum(f.stat().st_size for f in files),
                      "seconds": round(time.perf_counter() - start, 3)}
            (tmp / REPORT).write_text(json.dumps(report, indent=2))
    finally:
        _close(checkpoints, anchor)
    return report


def _close(checkpoints: Sequence[Checkpoint], anchor: Checkpoint | None) -> None:
    for checkpoint in (*checkpoints, *([anchor] if anchor is not None else [])):
        checkpoint.close()


# ---- TALL: a compressed multi-task store -----------------------------------------------------------------


def build_tall(base: str | Path, inputs: Sequence[str | Path], out: str | Path, *, lam: float = 0.4,
               lams: Sequence[float] | None = None, force: bool = False, progress: bool = True,
               sources: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Write a TALL store: τ_MTL (``task_vector.safetensors``), each task's bit-packed masks
    (``mask-<t>.safetensors``: one uint8 tensor per weight, 8 entries per byte), and ``tall.json``.
    ``lams`` sets λ per task (default ``lam`` for all). ``sources`` names the tasks in ``tall.json`` when
    ``inputs`` are stand-ins (full models written from PEFT adapters)."""
    merger = get_registry().get("merger", "tall")
    per_input = None if lams is None else [{"lam": float(v)} for v in lams]
    out, parsed, values, checkpoints, anchor, reference = _prepare(merger, inputs, out, base, {"lam": lam},
                                                                  per_input, force)
    start = time.perf_counter()
    floating = [(n, i) for n, i in reference.tensors.items() if i.dtype.is_floating_point]
    vector_plan = [(n, i.dtype, i.shape) for n, i in reference.tensors.items()]
    mask_plan = [(n, torch.uint8, (math.ceil(math.prod(i.shape) / 8),)) for n, i in floating]
    try:
        with atomic_directory(out) as tmp:
            vectors = ShardWriter(tmp, vector_plan, metadata={"llmgraft": STORE_FORMAT}, stem="task_vector")
            masks = [ShardWriter(tmp, mask_plan, metadata={"llmgraft": STORE_FORMAT, "task": str(t)}, stem=f"mask-{t}")
                     for t in range(len(checkpoints))]
            kept = [0] * len(checkpoints)

            def write(name, outputs, rows):
                vectors.write(name, outputs["merged"])  # τ_MTL (integer buffers: the base's own values)
                for t, writer in enumerate(masks):
                    mask = outputs.get(f"mask/{t}")
                    if mask is not None:
                        kept[t] += int(mask.sum())
                        writer.write(name, pack_bits(mask))

            _stream(merger, parsed, reference, anchor, checkpoints, values, write, progress, "tall build")
            vectors.close()
            for writer in masks:
                writer.close()
            total = sum(math.prod(i.shape) for _, i in floating)
            manifest = {"format": STORE_FORMAT, "base": str(Path(base).resolve()),
                        "base_fingerprint": fingerprint(anchor),
                        "tasks": [str(Path(p).resolve()) for p in (sources or inputs)],
                        "lams": [float(v.get("lam", lam)) for v in values], "parameters": total,
                        "kept_fraction": [k / max(total, 1) for k in kept],
                        "shapes": {n: list(i.shape) for n, i in floating},
                        "seconds": round(time.perf_counter() - start, 3)}
            (tmp / "tall.json").write_text(json.dumps(manifest, indent=2))
        return manifest
    finally:
        _close(checkpoints, anchor)


def rebuild_tall(store: str | Path, task: int, out: str | Path, *, base: str | Path | None = None,
                 force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write task ``task``'s model θ_t = θ₀ + m_t ⊙ τ_MTL from a TALL store (and the base it was built on)."""
    store = Path(store)
    try:
        manifest = json.loads((store / "tall.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{store}: not a TALL store ({exc})") from None
    if manifest.get("format") != STORE_FORMAT:
        raise CheckpointError(f"{store}: unknown store format {manifest.get('format')!r}")
    tasks = len(manifest["tasks"])
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < tasks:
        raise ParamError(f"task must be an index in [0, {tasks}) (the store holds {tasks} tasks), got {task!r}")
    out = check_output(out, force, [store, base or manifest["base"]])
    anchor = Checkpoint(base or manifest["base"])
    if manifest.get("base_fingerprint") and fingerprint(anchor) != manifest["base_fingerprint"]:
        raise CheckpointError(f"{anchor.path} is not the base the store was built on ({manifest['base']}): its "
                              "tensors differ")
    vectors = _store_part(store, "task_vector")
    masks = _store_part(store, f"mask-{task}")
    _check_compatible(anchor, [vectors])
    plan = [(n, i.dtype, i.shape) for n, i in anchor.tensors.items()]
    try:
        with atomic_directory(out) as tmp:
            writer = ShardWriter(tmp, plan, metadata={"llmgraft_tall_task": str(task)})
            with _progress(len(plan), f"tall rebuild {task}", progress) as bar:
                for name, info in anchor.tensors.items():
                    if info.dtype.is_floating_point:
                        size = math.ceil(math.prod(info.shape) / 8)
                        if masks.tensors[name].shape != (size,):
                            raise CheckpointError(f"{store}: the mask of {name!r} for task {task} has "
                                                  f"{masks.tensors[name].shape} bytes, not {size}")
                    if not info.dtype.is_floating_point or not info.shape:
                        writer.write(name, _rebuild_rows(anchor, vectors, masks, name, info, None))
                    else:  # row chunks of 8k rows (k ≥ 1), so each chunk's mask starts on a byte
                        for rows in _chunks(info.shape[0], math.prod(info.shape[1:]), 2):
                            writer.write(name, _rebuild_rows(anchor, vectors, masks, name, info, rows))
                    bar.update(1)
            writer.close()
            copy_side_files(anchor, tmp, skip=NOT_CARRIED)
            record = {"tall_store": str(store.resolve()), "task": task, "source": manifest["tasks"][task],
                      "lam": manifest["lams"][task]}
            (tmp / REPORT).write_text(json.dumps(record, indent=2))
        return record
    finally:
        _close([vectors, masks], anchor)


def _rebuild_rows(anchor: Checkpoint, vectors: Checkpoint, masks: Checkpoint, name: str, info,
                  rows: tuple[int, int] | None) -> torch.Tensor:
    """θ₀ + m_t ⊙ τ_MTL for rows [a, b) of one tensor (the whole tensor when ``rows`` is None)."""
    theta = anchor.read(name, rows)
    if not info.dtype.is_floating_point:
        return theta
    size = math.ceil(math.prod(info.shape) / 8)
    per_row = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
    a, b = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
    packed = masks.read(name, (a * per_row // 8, min(size, math.ceil(b * per_row / 8))))
    mask = unpack_bits(packed, theta.shape)
    return (theta.float() + torch.where(mask, vectors.read(name, rows).float(), 0.0)).to(info.dtype)


def _store_part(store: Path, stem: str) -> Checkpoint:
    files = sorted(store.glob(f"{stem}.safetensors")) or sorted(store.glob(f"{stem}-0*-of-*.safetensors"))
    if not files:
        raise CheckpointError(f"{store}: no {stem} tensors")
    if len(files) == 1:
        return Checkpoint(files[0])
    part = Checkpoint(files[0])
    for extra in files[1:]:
        more = Checkpoint(extra)
        part.files += more.files
        part.tensors.update(more.tensors)
        part._owner.update(more._owner)
    return part


def choose_tall_lams(base: str | Path, inputs: Sequence[str | Path], score: Callable[[int, Path], float],
                     candidates: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.6), progress: bool = True
                     ) -> tuple[list[float], dict[float, list[float]]]:
    """Pick each task's λ: rebuild task t's model with the masks of every candidate λ, and keep the λ whose
    model ``score(t, model_dir)`` rates lowest (a validation loss; the official code picks per task on
    validation accuracy over 0.2..0.6). Returns the chosen λs and every score, by λ."""
    import tempfile

    from tqdm import tqdm

    scores: dict[float, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="llmgraft-tall-") as scratch:
        for lam in tqdm(candidates, desc="tall lambda", unit="lambda", disable=not progress):
            store = Path(scratch) / f"store-{lam}"
            build_tall(base, inputs, store, lam=float(lam), progress=False)
            scores[lam] = []
            for t in range(len(inputs)):
                model = Path(scratch) / f"task-{t}"
                rebuild_tall(store, t, model, force=True, progress=False)
                scores[lam].append(float(score(t, model)))
                shutil.rmtree(model)
            shutil.rmtree(store)  # one candidate on disk at a time
    chosen = [min(candidates, key=lambda lam: (scores[lam][t], lam)) for t in range(len(inputs))]
    return [float(c) for c in chosen], scores
