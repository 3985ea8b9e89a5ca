"""Masked GRPO (clipped surrogate) loss over per-token log-probs: the per-token math in Triton, the
loss value and statistics kernel, and the plain-torch reference.

    ratio_t = exp(logp_t - logp_old_t)
    L = - sum_t m_t * min(ratio_t * A_t, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_t) / sum_t m_t

The token-level mean over every unmasked token of the batch (SRPO, arXiv 2504.14286), not a mean of
per-sequence means. A_t is given per token (N,). `mask` may hold 0/1 or weights; tokens with m_t == 0
are excluded with a select, not a multiply, so garbage there (inf/NaN logp_old on padding) cannot
leak NaN into the loss or the gradient. An all-zero mask gives loss 0 and zero gradient.

Optional KL to a reference policy (off by default, SRPO uses none): kl_coef * k3, with the k3
estimator of KL(pi_theta || pi_ref) from samples of pi_theta (DeepSeekMath's GRPO):
    k3_t = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1        (>= 0, unbiased)

Statistics (0-d fp32 tensors, masked means; read them with .item() only when logging):
    clip_frac  - fraction of tokens whose gradient the clip switched off (ratio above 1+eps_high
                 with A > 0, or below 1-eps_low with A < 0)
    ratio_mean - mean of ratio_t
    approx_kl  - k3 estimate of KL(pi_old || pi_theta): (ratio - 1) - log(ratio)

The trainer reaches this file through fused.py: its row kernel takes each token's dL/dlogp from
`_grpo_token`, so the loss and its gradient are written down exactly once, and the loss value and
statistics come from `_grpo_fwd_kernel` over the (N,) log-probs. That is one kernel that reads the
4-5 (N,) inputs once and writes 5 scalars, where eager torch runs ~15 small kernels, each reading
and writing N floats.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 1024  # tokens per loop step / per program


@dataclass
class GRPOStats:
    """What the trainer logs; 0-d tensors so that nothing here forces a GPU sync."""
    clip_frac: torch.Tensor
    ratio_mean: torch.Tensor
    approx_kl: torch.Tensor
    entropy: Optional[torch.Tensor] = None  # mean over masked tokens; only the fused path has it


def mean_denominator(msum: torch.Tensor) -> torch.Tensor:
    """sum(mask) as the divisor of a masked mean: 1 where it is 0, so that an all-masked batch gives
    0 / 1 = 0, never 0 / 0. `_mean_denominator` below is the same in Triton."""
    return torch.where(msum != 0, msum, torch.ones_like(msum))


# ----------------------------------------------------------------------------------------------
# Triton

@triton.jit
def _grpo_token(logp, logp_old, adv, m, logp_ref, eps_low, eps_high, kl_coef, HAS_KL: tl.constexpr):
    """Per-token loss and d(loss)/d(logp), both still to be divided by sum(mask).

    Works on a block of tokens or on one token (scalars). Returns
    (loss_t, dloss_t, clipped_t, ratio_t, log_ratio_t), loss and dloss already 0 where m == 0.
    """
    log_ratio = logp - logp_old
    ratio = tl.exp(log_ratio)
    s1 = ratio * adv                                                    # unclipped surrogate
    s2 = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high) * adv
    # min(s1, s2) picks s2 only when the clip is active; its derivative in logp is then 0.
    # Otherwise d(ratio * A)/d(logp) = ratio * A. (Ties s1 == s2 happen inside the clip range,
    # where both branches have the same derivative, so the choice there does not matter.)
    clipped = s2 < s1
    loss = -tl.minimum(s1, s2)
    dloss = tl.where(clipped, 0.0, -s1)
    if HAS_KL:
        d = logp_ref - logp
        e = tl.exp(d)
        loss += kl_coef * (e - d - 1.0)                                  # k3
        dloss += kl_coef * (1.0 - e)                                     # d k3 / d logp
    active = m != 0.0
    loss = tl.where(active, m * loss, 0.0)
    dloss = tl.where(active, m * dloss, 0.0)
    return loss, dloss, clipped, ratio, log_ratio


@triton.jit
def _mean_denominator(msum):
    return tl.where(msum != 0.0, msum, 1.0)  # all-masked batch: 0 / 1 = 0, never 0 / 0


@triton.jit
def _grpo_fwd_kernel(LOGP, LOGP_OLD, ADV, MASK, LOGP_REF, LOSS, STATS,
                     N, eps_low, eps_high, kl_coef,
                     HAS_KL: tl.constexpr, BLOCK: tl.constexpr):
    # One program walks the whole batch in BLOCK-sized steps: the mean needs a global sum, and
    # one program gives it deterministically with no atomics and no second kernel. Even 256k
    # tokens are 256 steps of a few vector loads (tens of microseconds), and the grid is (1,),
    # which no sequence length can overflow.
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ratio = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < N
        logp = tl.load(LOGP + offs, mask=inb, other=0.0)
        logp_old = tl.load(LOGP_OLD + offs, mask=inb, other=0.0)
        adv = tl.load(ADV + offs, mask=inb, other=0.0)
        m = tl.load(MASK + offs, mask=inb, other=0.0)
        logp_ref = logp
        if HAS_KL:
            logp_ref = tl.load(LOGP_REF + offs, mask=inb, other=0.0)
        loss, _, clipped, ratio, log_ratio = _grpo_token(logp, logp_old, adv, m, logp_ref,
                                                         eps_low, eps_high, kl_coef, HAS_KL)
        active = m != 0.0
        acc_loss += loss
        acc_clip += tl.where(active & clipped, m, 0.0)
        acc_ratio += tl.where(active, m * ratio, 0.0)
        acc_kl += tl.where(active, m * (ratio - 1.0 - log_ratio), 0.0)
        acc_m += m
    msum = tl.sum(acc_m, axis=0)
    denom = _mean_denominator(msum)
    tl.store(LOSS, tl.sum(acc_loss, axis=0) / denom)
    tl.store(STATS + 0, tl.sum(acc_clip, axis=0) / denom)
    tl.store(STATS + 1, tl.sum(acc_ratio, axis=0) / denom)
    tl.store(STATS + 2, tl.sum(acc_kl, axis=0) / denom)
    tl.store(STATS + 3, msum)  # the normaliser


# ----------------------------------------------------------------------------------------------
# Launcher

def _grpo_forward(logp, logp_old, adv, mask, logp_ref, eps_low, eps_high, kl_coef):
    """Launch the forward kernel. Returns loss (0-d) and stats (4,) = clip, ratio, kl, sum(mask)."""
    loss = torch.empty((), dtype=torch.float32, device=logp.device)
    stats = torch.empty(4, dtype=torch.float32, device=logp.device)
    _grpo_fwd_kernel[(1,)](
        logp, logp_old, adv, mask, logp_ref if logp_ref is not None else logp, loss, stats,
        logp.numel(), float(eps_low), float(eps_high), float(kl_coef),
        HAS_KL=logp_ref is not None, BLOCK=BLOCK, num_warps=4)
    return loss, stats


def prepare_token_inputs(logp_old, adv, mask, logp_ref, kl_coef, n_tokens):
    """Flatten, cast to what the kernels read (fp32 values), and check shapes."""
    if kl_coef != 0.0 and logp_ref is None:
        raise ValueError("kl_coef != 0 needs logp_ref, the reference policy's per-token log-probs")
    logp_old = logp_old.reshape(-1).to(torch.float32).contiguous()   # (N,)
    mask = mask.reshape(-1).to(torch.float32).contiguous()           # (N,)
    adv = adv.reshape(-1).to(torch.float32).contiguous()             # (N,)
    logp_ref = None if kl_coef == 0.0 else logp_ref.reshape(-1).to(torch.float32).contiguous()
    for name, t in (("adv", adv), ("logp_old", logp_old), ("mask", mask), ("logp_ref", logp_ref)):
        assert t is None or t.numel() == n_tokens, f"{name} has {t.numel()} entries, expected {n_tokens}"
    return logp_old, adv, mask, logp_ref


# ----------------------------------------------------------------------------------------------
# Plain-torch reference of the same math (autograd does the backward)

def grpo_loss_reference(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.2, kl_coef=0.0, logp_ref=None):
    """Token-level mean clipped surrogate in torch. Returns (loss 0-d tensor, GRPOStats)."""
    logp = logp.reshape(-1).float()                                     # (N,)
    logp_old, adv, mask, logp_ref = prepare_token_inputs(logp_old, adv, mask, logp_ref, kl_coef, logp.numel())
    active = mask != 0
    # Masked tokens are replaced by harmless values *before* the differentiable math: a
    # torch.where at the end alone would still send 0 * inf = NaN back through exp().
    logp_a = torch.where(active, logp, torch.zeros_like(logp))
    logp_old = torch.where(active, logp_old, torch.zeros_like(logp_old))
    adv = torch.where(active, adv, torch.zeros_like(adv))
    log_ratio = logp_a - logp_old
    ratio = torch.exp(log_ratio)
    s1 = ratio * adv
    s2 = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(s1, s2)
    if logp_ref is not None:
        d = torch.where(active, logp_ref, torch.zeros_like(logp_ref)) - logp_a
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1.0)
    denom = mean_denominator(mask.sum())
    loss = (mask * per_token).sum() / denom
    with torch.no_grad():
        stats = GRPOStats(
            clip_frac=(mask * (s2 < s1)).sum() / denom,
            ratio_mean=(mask * ratio).sum() / denom,
            approx_kl=(mask * (ratio - 1.0 - log_ratio)).sum() / denom,
        )
    return loss, stats
