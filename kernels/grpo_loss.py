"""Masked GRPO (clipped surrogate) loss over per-token log-probs, in Triton.

    ratio_t = exp(logp_t - logp_old_t)
    L = - sum_t m_t * min(ratio_t * A_t, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_t) / sum_t m_t

The token-level mean over every unmasked token of the batch (SRPO, arXiv 2504.14286), not a mean of
per-sequence means. A_t is given per token (N,), or per sequence (B,) with `seq_idx` (N,) saying
which sequence each token belongs to. `mask` may hold 0/1 or weights; tokens with m_t == 0 are
excluded with a select, not a multiply, so garbage there (inf/NaN logp_old on padding) cannot
leak NaN into the loss or the gradient. An all-zero mask gives loss 0 and zero gradient.

Optional KL to a reference policy (off by default, SRPO uses none): kl_coef * k3, with the k3
estimator of KL(pi_theta || pi_ref) from samples of pi_theta (DeepSeekMath's GRPO):
    k3_t = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1        (>= 0, unbiased)

Statistics (0-d fp32 tensors, masked means; read them with .item() only when logging):
    clip_frac  - fraction of tokens whose gradient the clip switched off (ratio above 1+eps_high
                 with A > 0, or below 1-eps_low with A < 0)
    ratio_mean - mean of ratio_t
    approx_kl  - k3 estimate of KL(pi_old || pi_theta): (ratio - 1) - log(ratio)

Why a kernel for (N,)-vectors? Not speed: the eager torch version is ~15 small kernels, each
reading and writing N floats (~60 N-float passes for forward+backward). Here the forward is one
kernel that reads the 4-5 inputs once and writes 5 scalars, and the backward one kernel that
reads them once and writes dlogp: ~6 N-float passes. The per-token math also lives in one
@triton.jit helper, `_grpo_token`, that the fused hidden->loss kernel (fused.py) reuses, so the
loss and its gradient are written down exactly once.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import use_triton

BLOCK = 1024  # tokens per loop step / per program


@dataclass
class GRPOStats:
    """What the trainer logs; 0-d tensors so that nothing here forces a GPU sync."""
    clip_frac: torch.Tensor
    ratio_mean: torch.Tensor
    approx_kl: torch.Tensor
    entropy: Optional[torch.Tensor] = None  # mean over masked tokens; only the fused path has it

    def floats(self) -> dict:
        """One dict of Python floats for the status line (this is where the sync happens)."""
        out = {"clip_frac": self.clip_frac, "ratio_mean": self.ratio_mean, "approx_kl": self.approx_kl}
        if self.entropy is not None:
            out["entropy"] = self.entropy
        return {k: float(v) for k, v in out.items()}


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
def _load_token_inputs(offs, inb, LOGP_OLD, ADV, SEQ_IDX, MASK, LOGP_REF, logp,
                       HAS_SEQ_IDX: tl.constexpr, HAS_KL: tl.constexpr):
    """Load logp_old, A, mask and logp_ref for tokens `offs` (A through seq_idx if given)."""
    logp_old = tl.load(LOGP_OLD + offs, mask=inb, other=0.0)
    m = tl.load(MASK + offs, mask=inb, other=0.0)
    if HAS_SEQ_IDX:
        seq = tl.load(SEQ_IDX + offs, mask=inb, other=0)
        adv = tl.load(ADV + seq, mask=inb, other=0.0)
    else:
        adv = tl.load(ADV + offs, mask=inb, other=0.0)
    if HAS_KL:
        logp_ref = tl.load(LOGP_REF + offs, mask=inb, other=0.0)
    else:
        logp_ref = logp
    return logp_old, adv, m, logp_ref


@triton.jit
def _grpo_fwd_kernel(LOGP, LOGP_OLD, ADV, SEQ_IDX, MASK, LOGP_REF, LOSS, STATS,
                     N, eps_low, eps_high, kl_coef,
                     HAS_SEQ_IDX: tl.constexpr, HAS_KL: tl.constexpr, BLOCK: tl.constexpr):
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
        logp_old, adv, m, logp_ref = _load_token_inputs(offs, inb, LOGP_OLD, ADV, SEQ_IDX, MASK,
                                                        LOGP_REF, logp, HAS_SEQ_IDX, HAS_KL)
        loss, _, clipped, ratio, log_ratio = _grpo_token(logp, logp_old, adv, m, logp_ref,
                                                         eps_low, eps_high, kl_coef, HAS_KL)
        active = m != 0.0
        acc_loss += loss
        acc_clip += tl.where(active & clipped, m, 0.0)
        acc_ratio += tl.where(active, m * ratio, 0.0)
        acc_kl += tl.where(active, m * (ratio - 1.0 - log_ratio), 0.0)
        acc_m += m
    msum = tl.sum(acc_m, axis=0)
    denom = tl.where(msum != 0.0, msum, 1.0)  # all-masked batch: 0 / 1 = 0, never 0 / 0
    tl.store(LOSS, tl.sum(acc_loss, axis=0) / denom)
    tl.store(STATS + 0, tl.sum(acc_clip, axis=0) / denom)
    tl.store(STATS + 1, tl.sum(acc_ratio, axis=0) / denom)
    tl.store(STATS + 2, tl.sum(acc_kl, axis=0) / denom)
    tl.store(STATS + 3, msum)  # the normaliser, kept for the backward


@triton.jit
def _grpo_bwd_kernel(LOGP, LOGP_OLD, ADV, SEQ_IDX, MASK, LOGP_REF, STATS, GRAD_LOSS, DLOGP,
                     N, eps_low, eps_high, kl_coef,
                     HAS_SEQ_IDX: tl.constexpr, HAS_KL: tl.constexpr, BLOCK: tl.constexpr):
    # Tokens are independent given the saved normaliser: a 1-D grid of BLOCK-token programs
    # (grid x may reach 2^31 - 1, so no batch length overflows it).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    logp = tl.load(LOGP + offs, mask=inb, other=0.0)
    logp_old, adv, m, logp_ref = _load_token_inputs(offs, inb, LOGP_OLD, ADV, SEQ_IDX, MASK,
                                                    LOGP_REF, logp, HAS_SEQ_IDX, HAS_KL)
    _, dloss, _, _, _ = _grpo_token(logp, logp_old, adv, m, logp_ref,
                                    eps_low, eps_high, kl_coef, HAS_KL)
    msum = tl.load(STATS + 3)
    scale = tl.load(GRAD_LOSS) / tl.where(msum != 0.0, msum, 1.0)
    tl.store(DLOGP + offs, dloss * scale, mask=inb)


# ----------------------------------------------------------------------------------------------
# Launchers and autograd

def _grpo_forward(logp, logp_old, adv, mask, seq_idx, logp_ref, eps_low, eps_high, kl_coef):
    """Launch the forward kernel. Returns loss (0-d) and stats (4,) = clip, ratio, kl, sum(mask)."""
    loss = torch.empty((), dtype=torch.float32, device=logp.device)
    stats = torch.empty(4, dtype=torch.float32, device=logp.device)
    _grpo_fwd_kernel[(1,)](
        logp, logp_old, adv, seq_idx if seq_idx is not None else logp, mask,
        logp_ref if logp_ref is not None else logp, loss, stats,
        logp.numel(), float(eps_low), float(eps_high), float(kl_coef),
        HAS_SEQ_IDX=seq_idx is not None, HAS_KL=logp_ref is not None, BLOCK=BLOCK, num_warps=4)
    return loss, stats


class GRPOLoss(torch.autograd.Function):
    """Triton forward and backward; the gradient flows to logp only."""

    @staticmethod
    def forward(ctx, logp, logp_old, adv, mask, seq_idx, logp_ref, eps_low, eps_high, kl_coef):
        loss, stats = _grpo_forward(logp, logp_old, adv, mask, seq_idx, logp_ref,
                                    eps_low, eps_high, kl_coef)
        ctx.save_for_backward(logp, logp_old, adv, mask, seq_idx, logp_ref, stats)
        ctx.params = (float(eps_low), float(eps_high), float(kl_coef))
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logp, logp_old, adv, mask, seq_idx, logp_ref, stats = ctx.saved_tensors
        eps_low, eps_high, kl_coef = ctx.params
        N = logp.numel()
        dlogp = torch.empty_like(logp)
        _grpo_bwd_kernel[(triton.cdiv(N, BLOCK),)](
            logp, logp_old, adv, seq_idx if seq_idx is not None else logp, mask,
            logp_ref if logp_ref is not None else logp, stats,
            grad_loss.to(torch.float32).contiguous(), dlogp,
            N, eps_low, eps_high, kl_coef,
            HAS_SEQ_IDX=seq_idx is not None, HAS_KL=logp_ref is not None, BLOCK=BLOCK, num_warps=4)
        return dlogp, None, None, None, None, None, None, None, None


def prepare_token_inputs(logp_old, adv, mask, seq_idx, logp_ref, kl_coef, n_tokens):
    """Flatten, cast to what the kernels read (fp32 values, int indices), and check shapes."""
    if kl_coef != 0.0 and logp_ref is None:
        raise ValueError("kl_coef != 0 needs logp_ref, the reference policy's per-token log-probs")
    logp_old = logp_old.reshape(-1).to(torch.float32).contiguous()   # (N,)
    mask = mask.reshape(-1).to(torch.float32).contiguous()           # (N,)
    adv = adv.reshape(-1).to(torch.float32).contiguous()             # (N,) or (B,) with seq_idx
    if seq_idx is not None:
        seq_idx = seq_idx.reshape(-1).contiguous()                   # (N,) index into adv
        assert seq_idx.numel() == n_tokens, f"seq_idx has {seq_idx.numel()} entries, expected {n_tokens}"
    else:
        assert adv.numel() == n_tokens, (f"adv has {adv.numel()} entries for {n_tokens} tokens; "
                                         "pass seq_idx for per-sequence advantages")
    logp_ref = None if kl_coef == 0.0 else logp_ref.reshape(-1).to(torch.float32).contiguous()
    for name, t in (("logp_old", logp_old), ("mask", mask), ("logp_ref", logp_ref)):
        assert t is None or t.numel() == n_tokens, f"{name} has {t.numel()} entries, expected {n_tokens}"
    return logp_old, adv, mask, seq_idx, logp_ref


def grpo_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.2, seq_idx=None,
              kl_coef=0.0, logp_ref=None):
    """Token-level mean clipped surrogate. Returns (loss 0-d tensor, GRPOStats).

    Runs the Triton kernels for CUDA tensors (or under TRITON_INTERPRET=1), and the plain-torch
    `grpo_loss_reference` for CPU tensors: a dispatch on device, see utils.py.
    """
    if not use_triton(logp):
        return grpo_loss_reference(logp, logp_old, adv, mask, eps_low, eps_high, seq_idx,
                                   kl_coef, logp_ref)
    logp = logp.reshape(-1).to(torch.float32).contiguous()                # (N,)
    logp_old, adv, mask, seq_idx, logp_ref = prepare_token_inputs(
        logp_old, adv, mask, seq_idx, logp_ref, kl_coef, logp.numel())
    loss, stats = GRPOLoss.apply(logp, logp_old, adv, mask, seq_idx, logp_ref,
                                 eps_low, eps_high, kl_coef)
    return loss, GRPOStats(clip_frac=stats[0], ratio_mean=stats[1], approx_kl=stats[2])


# ----------------------------------------------------------------------------------------------
# Plain-torch reference of the same math (autograd does the backward)

def grpo_loss_reference(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.2, seq_idx=None,
                        kl_coef=0.0, logp_ref=None):
    logp = logp.reshape(-1).float()                                     # (N,)
    logp_old, adv, mask, seq_idx, logp_ref = prepare_token_inputs(
        logp_old, adv, mask, seq_idx, logp_ref, kl_coef, logp.numel())
    if seq_idx is not None:
        adv = adv[seq_idx]                                              # (B,) -> (N,)
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
    msum = mask.sum()
    denom = torch.where(msum != 0, msum, torch.ones_like(msum))
    loss = (mask * per_token).sum() / denom
    with torch.no_grad():
        stats = GRPOStats(
            clip_frac=(mask * (s2 < s1)).sum() / denom,
            ratio_mean=(mask * ratio).sum() / denom,
            approx_kl=(mask * (ratio - 1.0 - log_ratio)).sum() / denom,
        )
    return loss, stats
