"""Model FLOPs per trained token, for the MFU figures of bench/update.py and bench/cpu.py."""


def flops_per_token(cfg, seq_len: int) -> float:
    """Forward+backward matmul FLOPs per trained token (6N plus attention) of a model.ModelConfig."""
    H, L = cfg.hidden_size, cfg.n_layers
    attn = 2 * H * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + 2 * cfg.n_heads * cfg.head_dim * H
    mlp = 3 * 2 * H * cfg.intermediate_size
    head = 2 * H * cfg.vocab_size
    attn_scores = 2 * 2 * cfg.n_heads * cfg.head_dim * seq_len / 2  # QK^T and AV, causal half
    return 3 * (L * (attn + mlp + attn_scores) + head)
