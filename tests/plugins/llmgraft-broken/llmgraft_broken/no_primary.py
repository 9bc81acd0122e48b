"""A sampler that forgets `primary`: rejected when it registers, not with HTTP 500 at request time."""
from dataclasses import dataclass

from llmgraft import Params, Sampler, hookimpl, param


@dataclass(frozen=True)
class Knob(Params):
    k: float = param(1.0, help="a knob")


class NoPrimary(Sampler):
    name, description, params_cls = "no_primary", "forgets its primary parameter", Knob

    def apply(self, logits, params):
        return logits


@hookimpl
def llmgraft_register_samplers(register):
    register(NoPrimary())
