"""One minimal method per family whose real methods have not landed (attention, kv_manager, optimizer,
adapter) plus a third-party merger, registered by a third-party plugin: fixtures for the contract test, not
methods anyone should use."""
import json
import shutil
from dataclasses import dataclass

import torch

from llmgraft import Adapter, Attention, KVManager, Merger, Optimizer, Params, hookimpl, param
from llmgraft.io import atomic_directory


@dataclass(frozen=True)
class NoParams(Params):
    pass


@dataclass(frozen=True)
class Window(Params):
    owner = "window"
    k: int = param(4, range="[1, inf)", help="how many of the most recent tokens to keep")


class MedianMerger(Merger):
    name, description, params_cls = "median", "entrywise median of the inputs", NoParams

    def merge(self, name, base, inputs, per_input, params):
        return {"merged": torch.stack(inputs).median(0).values}


class LastK(Attention):
    name, description, params_cls = "last_k", "keep the last k prompt tokens", Window

    def select(self, query, keys, params):
        length = keys.shape[1]
        return torch.arange(max(0, length - params.k), length)


class Recent(KVManager):
    name, description, params_cls = "recent", "keep the k most recent cached positions", Window

    def keep(self, keys, values, params):
        length = keys.shape[1]
        return torch.arange(max(0, length - params.k), length)


class Copy(Optimizer):
    name, description, params_cls = "copy", "copy a checkpoint unchanged (atomically)", NoParams

    def run(self, src, dst, params):
        with atomic_directory(dst) as tmp:
            for path in src.iterdir():
                shutil.copy2(path, tmp / path.name)
        return {"files": sorted(p.name for p in dst.iterdir()), "config": json.loads((dst / "config.json").read_text())["model_type"]}


class Dense(Adapter):
    name, description, params_cls = "dense", "a full-rank trainable delta per module", NoParams

    def init_state(self, shapes, params):
        return {module: torch.zeros(shape) for module, shape in shapes.items()}

    def delta_weight(self, state, module, params):
        return state[module]


@hookimpl
def llmgraft_register_mergers(register):
    register(MedianMerger())


@hookimpl
def llmgraft_register_attention(register):
    register(LastK())


@hookimpl
def llmgraft_register_kv_managers(register):
    register(Recent())


@hookimpl
def llmgraft_register_optimizers(register):
    register(Copy())


@hookimpl
def llmgraft_register_adapters(register):
    register(Dense())
