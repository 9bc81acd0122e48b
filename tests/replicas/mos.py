"""Independent replica of MoS (Mixture of Shards, ICLR 2025) for tests.

Replicates the official code in GitHub repo Forence1999/MoS, file
``modules/Tied_LoRA.py`` (``transform_chunks``, ``LoraLayer_reset_lora_parameters``,
``LoraLinear4bit_Tied_LoRA_forward``, ``share_lora_tiedly``), rewritten in plain
torch float64 without peft/bitsandbytes.  Used only to check another implementation.

Notation: L layers, r rank per layer, r_v = valid_param_lora_r (pool rank per layer),
r_p = valid_param_private_r, c = num_chunk_per_vec.  Per module type (q, k, ...) the
official pools are ``lora_A.weight`` (L*r_v*c, d_in/c) and ``lora_B.weight``
(d_out/c, L*r_v*c); each layer owns index vectors of length r*c into the pool rows
(``lora_pair_mask`` for A, ``lora_pair_mask_B`` for B).
"""
import torch


def _transform_chunks(mat, idx, c):
    # Official: mat = mat[mask]; cat([mat[i::c] for i in range(c)], dim=1).
    # So row j of the result is pool[idx[j*c]] | pool[idx[j*c+1]] | ... | pool[idx[j*c+c-1]].
    picked = mat[torch.as_tensor(idx).long()]
    assert picked.shape[0] % c == 0
    return torch.cat([picked[i::c] for i in range(c)], dim=1)


def layer_factors(pool_a, pool_b, index_a, index_b, c):
    """(A (r, d_in), B (d_out, r)) in float64, exactly as the official forward builds them."""
    pool_a = torch.as_tensor(pool_a).to(torch.float64)
    pool_b = torch.as_tensor(pool_b).to(torch.float64)
    assert len(index_a) == len(index_b) and len(index_a) % c == 0
    assert pool_a.shape[0] == pool_b.shape[1], "pools must have the same L*r_v*c"
    A = _transform_chunks(pool_a, index_a, c)
    B = _transform_chunks(pool_b.t(), index_b, c).t()
    return A, B


def layer_output(x, pool_a, pool_b, index_a, index_b, c, alpha, r):
    """Adapter term added to the base output: (x @ (A.T * vec*anti_vec)) @ B.T * alpha/r.

    The official vec / anti_vec are constant 1 (init_lora_A_vec_value must be 1 and they
    are frozen), dropout is omitted here; scaling = lora_alpha / r (the per-layer rank).
    """
    A, B = layer_factors(pool_a, pool_b, index_a, index_b, c)
    assert A.shape[0] == r
    x = torch.as_tensor(x).to(torch.float64)
    vec = torch.ones(r, dtype=torch.float64)  # lora_A_vec * lora_A_anti_vec == 1 * (1/1)
    return torch.matmul(torch.matmul(x, A.t() * vec), B.t()) * (alpha / r)


def _one_index(layer_idx, L, r, r_v, r_p, c, generator):
    private_start = (r_v - r_p) * L * c
    private = private_start + torch.arange(layer_idx * r_p * c, (layer_idx + 1) * r_p * c).int()
    if private_start == 0:
        assert r_p == r_v, "private_start_idx==0 but r_p != r_v"
        shared = torch.tensor([]).int()  # no RNG draw in this branch
    else:
        # chunk-level draw over the whole shared region, then truncated
        shared = torch.randperm(private_start, generator=generator)[: (r - r_p) * c].int()
    idx = torch.cat([shared, private])
    assert len(idx) == r * c, f"len(indices)={len(idx)} != r*c={r * c}"
    return idx


def layer_indices(layer_idx, L, r, r_v, r_p, c, generator):
    """(index_a, index_b) for one module of layer ``layer_idx``: A drawn first, then B."""
    assert 0 <= layer_idx < L and c >= 1
    assert r >= 1 and 0 <= r_p <= min(r, r_v), "bad rank settings"
    if r_p == r_v:  # official gen_tied_lora_config constraint
        assert r_v == r, "r_v must equal r when r_p == r_v"
    index_a = _one_index(layer_idx, L, r, r_v, r_p, c, generator)
    index_b = _one_index(layer_idx, L, r, r_v, r_p, c, generator)
    return index_a, index_b


def pool_parameter_count(L, r_v, d_in, d_out):
    """Trainable params of one module type's pools: A (L*r_v*c, d_in/c) + B (d_out/c, L*r_v*c).

    Independent of c (given d_in, d_out divisible by c): L*r_v*(d_in + d_out).
    """
    return L * r_v * d_in + d_out * L * r_v


def llama2_7b_mos_parameter_count(r_v):
    """MoS trainable params on q,k,v,o,gate,up,down of Llama-2-7B (official pool shapes)."""
    L, h, inter, heads, kv_heads = 32, 4096, 11008, 32, 32
    kv = h // (heads // kv_heads)
    dims = {
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }
    return sum(pool_parameter_count(L, r_v, di, do) for di, do in dims.values())
