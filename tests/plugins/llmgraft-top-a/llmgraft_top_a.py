"""Top-A sampling as a third-party llmgraft plugin: keep tokens with p >= a * p_max**2."""
from dataclasses import dataclass

from llmgraft import Params, Sampler, hookimpl, per_row, sanitize_logits_


@dataclass(frozen=True)
class TopAParams(Params):
    owner = "top_a"
    a: float = per_row(0.2, range="[0, 1]", help="keep tokens with p >= a * p_max^2")


class TopA(Sampler):
    name, primary, params_cls = "top_a", "a", TopAParams
    description = "Top-A: keep tokens with p >= a * p_max^2"

    def apply(self, logits, params):  # logits [B, V], already temperature-scaled; params.a is [B]
        logits = sanitize_logits_(logits)  # NaN -> -inf; a row with +inf keeps those, as 0
        probs = logits.softmax(dim=-1)
        threshold = params.a.unsqueeze(1) * probs.amax(dim=-1, keepdim=True) ** 2
        return logits.masked_fill_(probs < threshold, float("-inf"))


@hookimpl
def llmgraft_register_samplers(register):
    register(TopA())
