"""The served model's tensors for samplers that need them (Top-W's input embeddings), read from the
model's safetensors once per engine: the logits processor has no handle on vLLM's model object, and the
checkpoint on disk is what vLLM itself loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ...hooks.resources import ModelResources, ResourceError

if TYPE_CHECKING:
    from vllm.config import VllmConfig

#: Names of the input-embedding tensor in common architectures, by suffix, in order of preference.
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                       "tok_embeddings.weight", "embedding.weight")


def _model_dir(model: str, revision: str | None) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    try:  # a hub id: vLLM downloaded it into the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True,
                                      allow_patterns=["*.safetensors", "*.json"]))
    except Exception as exc:  # noqa: BLE001 - any failure means: not on disk here
        raise ResourceError(f"cannot find the files of model {model!r} on disk ({exc})") from None


def _embedding_location(directory: Path) -> tuple[Path, str]:
    """(safetensors file, tensor name) of the input embeddings in a checkpoint directory."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = dict(json.loads(index.read_text())["weight_map"])
    else:
        from safetensors import safe_open

        files = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                files.update(dict.fromkeys(handle.keys(), file.name))
    for suffix in _EMBEDDING_SUFFIXES:
        for name in sorted(files):
            if name.endswith(suffix):
                return directory / files[name], name
    raise ResourceError(f"no input-embedding tensor (a name ending in one of {', '.join(_EMBEDDING_SUFFIXES)}) "
                        f"in the safetensors of {directory}")


def _shape(file: Path, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return tuple(handle.get_slice(name).get_shape())


def _read(file: Path, name: str):
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(name).float()


def engine_resources(vllm_config: VllmConfig) -> tuple[ModelResources, str | None]:
    """The engine's :class:`ModelResources`, and why its input embeddings are unusable (None when they are).

    The check reads only the checkpoint's headers; the tensor itself is read on first use.
    """
    model_config = vllm_config.model_config
    where = f"model {model_config.model!r}"
    try:
        file, name = _embedding_location(_model_dir(model_config.model, getattr(model_config, "revision", None)))
        shape = _shape(file, name)
        vocab = model_config.get_vocab_size()
        problem = None if len(shape) == 2 and shape[0] == vocab else (
            f"the input embeddings {name} of {where} have shape {shape} but the logits have {vocab} columns")
    except ResourceError as exc:
        return ModelResources({"input_embeddings": _fail(str(exc))}, where), str(exc)
    if problem:
        return ModelResources({"input_embeddings": _fail(problem)}, where), problem
    return ModelResources({"input_embeddings": lambda: _read(file, name)}, where), None


def _fail(message: str):
    def loader():
        raise ResourceError(message)

    return loader
