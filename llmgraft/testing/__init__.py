"""Offline fixtures: the stdlib corpus, a byte-level BPE trained on it, tiny random models (Llama,
Mixtral, Qwen2-MoE) and the training script of the bundled code LM. Nothing here contacts a model hub."""
