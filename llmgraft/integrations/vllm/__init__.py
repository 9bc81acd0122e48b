"""vLLM integration: entry points ``vllm.general_plugins`` (:func:`register`) and ``vllm.logits_processors``
(:class:`GraftSampling`).

vLLM imports this module in every engine of the environment and an import error there is fatal, so it
imports only what the logits-processor interface needs; samplers load lazily on first use.
"""

from .models import RETENTION_ARCHITECTURES, register_models
from .sampling import GraftSampling


def register() -> None:
    """vLLM general-plugin hook, run in every vLLM process (front end and workers).

    Loads the llmgraft registry, so that a broken third-party plugin is reported (once, by the registry's
    warning) in each process's log at start-up rather than on the first request that names it.
    """
    import logging

    from ...hooks import get_registry
    from .startup import install

    install()
    register_models()
    from .quantization import register_schemes

    register_schemes()
    registry = get_registry()
    logging.getLogger("llmgraft").info(
        "llmgraft plugins: %s", ", ".join(f"{e.family}:{e.name}" for e in registry.all_entries()))


__all__ = ["RETENTION_ARCHITECTURES", "GraftSampling", "register", "register_models"]
