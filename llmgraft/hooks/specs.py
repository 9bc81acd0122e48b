"""pluggy hook specifications: one register-callback hook per family.

A plugin implements any of these with ``@hookimpl`` and calls ``register(obj)`` once per method object it
provides, e.g.::

    @hookimpl
    def llmgraft_register_samplers(register):
        register(MySampler())
"""

import pluggy

PROJECT = "llmgraft"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def llmgraft_register_samplers(register):
    """Register decoding samplers (logits → truncated logits), e.g. Top-H."""


@hookspec
def llmgraft_register_mergers(register):
    """Register weight-merging methods, e.g. MWA, TALL masks / Consensus."""


@hookspec
def llmgraft_register_attention(register):
    """Register token-retention methods that score prompt tokens at a layer, e.g. PromptDistill, GemFilter."""


@hookspec
def llmgraft_register_kv_managers(register):
    """Register KV-cache managers: what happens to the cached KV of kept and dropped tokens."""


@hookspec
def llmgraft_register_optimizers(register):
    """Register model-optimization passes, e.g. SlimMoE slimming, W4A16 or ternary quantization."""


@hookspec
def llmgraft_register_adapters(register):
    """Register adapter types (PEFT tuners), e.g. MoS."""


@hookspec
def llmgraft_register_quant_schemes(register):
    """Register weight-quantization formats (pack, packed shapes, matmul), e.g. W4A16, Sherry ternary."""
