"""Offline tools over checkpoints on disk (merging today; slimming and quantization reuse the same reader and
writer). No host framework: safetensors in, safetensors out, written atomically."""
