"""Offline tools over checkpoints on disk: a streaming safetensors reader and shard writer (used by merging,
SlimMoE pruning and quantization) and the merge driver. No host framework: safetensors in, safetensors
out, written atomically."""
