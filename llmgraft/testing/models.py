"""Tiny local models for tests and the bundled code LM's architecture. No hub is ever contacted.

Every builder writes a ``save_pretrained`` directory (config, safetensors weights, tokenizer) that both
transformers and vLLM load natively. Weights are seeded, so a given builder call is reproducible.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..hooks.errors import CheckpointError
from ..io import atomic_directory

#: The bundled code LM (weights + tokenizer) shipped inside the package.
CODE_LM_DIR = Path(__file__).resolve().parent.parent / "assets" / "code-lm"


def code_lm_path() -> Path:
    """Directory of the bundled, trained code LM; a :class:`CheckpointError` if the package lacks it."""
    if not (CODE_LM_DIR / "config.json").exists() or not (CODE_LM_DIR / "model.safetensors").exists():
        raise CheckpointError(
            f"bundled code LM missing at {CODE_LM_DIR}; train it with `python -m llmgraft.testing.code_lm`")
    return CODE_LM_DIR


@functools.lru_cache(maxsize=None)
def load_tokenizer(path: Path | None = None):
    """The tokenizer saved at ``path``, else the bundled one, else a freshly trained stdlib BPE (~2 s)."""
    from transformers import AutoTokenizer

    path = path or CODE_LM_DIR
    if (Path(path) / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(path))
    from .tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer()


def llama_config(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                 max_positions: int = 1024, **extra):
    """A LlamaConfig with EOS/BOS id 0 (the BPE's ``<|endoftext|>``) and tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_theta=10000.0, **extra)


def code_lm_config(vocab_size: int):
    """Architecture of the bundled code LM: Llama, 4 layers, d=256, head_dim 64 (~3.6M parameters)."""
    return llama_config(vocab_size, hidden=256, layers=4, heads=4, kv_heads=4, intermediate=768)


def save_model_dir(model, tokenizer, out_dir: Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write a loadable model directory (safetensors, config, tokenizer, extra text files) atomically."""
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)


def _seeded(config_cls_model, config, seed: int):
    import torch

    torch.manual_seed(seed)
    model = config_cls_model(config)
    # The default std 0.02 gives near-uniform next-token distributions; 0.15 gives entropy ≈ 4 nats with
    # p_max ≈ 0.5 on the 4k vocabulary, like a real LM, so truncation samplers have something to truncate.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.15)
    return model.eval()


def build_tiny_llama(out_dir: str | Path, seed: int = 0) -> Path:
    """Random-weight 2-layer Llama (head_dim 32) on the bundled tokenizer, in about a second."""
    from transformers import LlamaForCausalLM

    tok = load_tokenizer()
    cfg = llama_config(len(tok), hidden=64, layers=2, heads=2, kv_heads=2, intermediate=128)
    return save_model_dir(_seeded(LlamaForCausalLM, cfg, seed), tok, Path(out_dir))


def build_tiny_decoder(out_dir: str | Path, model_type: str, seed: int = 0) -> Path:
    """Random-weight 4-layer Qwen2 or Mistral decoder (head_dim 32, grouped-query: 2 heads share 1 KV head)
    on the bundled tokenizer: the other architectures token retention supports beside Llama."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    if model_type not in classes:
        raise ValueError(f"build_tiny_decoder builds {sorted(classes)}, not {model_type!r}")
    config_cls, model_cls = classes[model_type]
    tok = load_tokenizer()
    cfg = config_cls(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                     num_key_value_heads=1, intermediate_size=128, max_position_embeddings=1024, sliding_window=None,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    return save_model_dir(_seeded(model_cls, cfg, seed), tok, Path(out_dir))


def build_tiny_mixtral(out_dir: str | Path, seed: int = 0) -> Path:
    """Random-weight 2-layer Mixtral with 4 experts (top-2) on the bundled tokenizer."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = load_tokenizer()
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=2, intermediate_size=128, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0, tie_word_embeddings=False)
    return save_model_dir(_seeded(MixtralForCausalLM, cfg, seed), tok, Path(out_dir))


def build_tiny_qwen2_moe(out_dir: str | Path, seed: int = 0) -> Path:
    """Random-weight 2-layer Qwen2-MoE with 4 routed experts (top-2) plus a shared expert."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    tok = load_tokenizer()
    cfg = Qwen2MoeConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=64,
                         shared_expert_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                         decoder_sparse_step=1, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0, tie_word_embeddings=False)
    return save_model_dir(_seeded(Qwen2MoeForCausalLM, cfg, seed), tok, Path(out_dir))


def build_tiny_phimoe(out_dir: str | Path, seed: int = 0) -> Path:
    """Random-weight 2-layer PhiMoE with 4 experts (top-2) on the bundled tokenizer."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    tok = load_tokenizer()
    cfg = PhimoeConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=1024, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                       tie_word_embeddings=False)
    return save_model_dir(_seeded(PhimoeForCausalLM, cfg, seed), tok, Path(out_dir))


def upcycle_to_mixtral(dense_dir: str | Path, out_dir: str | Path, experts: int = 4, top_k: int = 2,
                       noise: float = 0.02, seed: int = 0) -> Path:
    """A Mixtral MoE made from a dense Llama by sparse upcycling: every expert starts as a copy of the dense
    MLP (times 1 + ``noise``·N(0, 1) per weight, so experts differ), the router at small random weights.
    Before any training it computes nearly what the dense model does, so it is a working MoE in seconds
    (the bundled code LM upcycled is the MoE that the SlimMoE demo and benchmark slim)."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32)
    c = dense.config
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                        rms_norm_eps=c.rms_norm_eps, rope_theta=getattr(c, "rope_theta", 10000.0),
                        num_local_experts=experts, num_experts_per_tok=top_k, tie_word_embeddings=c.tie_word_embeddings,
                        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                        router_aux_loss_coef=0.0)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(cfg)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    moe.load_state_dict(state, strict=False)
    with torch.no_grad():
        for dense_layer, layer in zip(dense.model.layers, moe.model.layers):
            gate_up = torch.cat([dense_layer.mlp.gate_proj.weight, dense_layer.mlp.up_proj.weight])
            down = dense_layer.mlp.down_proj.weight
            for e in range(experts):
                layer.mlp.experts.gate_up_proj[e] = gate_up * (1 + noise * torch.randn(gate_up.shape, generator=gen))
                layer.mlp.experts.down_proj[e] = down * (1 + noise * torch.randn(down.shape, generator=gen))
            layer.mlp.gate.weight.normal_(0.0, 0.02, generator=gen)
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    return save_model_dir(moe.eval(), load_tokenizer(Path(dense_dir)), Path(out_dir))
