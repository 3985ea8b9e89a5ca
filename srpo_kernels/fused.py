"""Hidden states -> GRPO loss in one pass: exactly three N x H x V matmuls, (N, V) never stored.

This is what the training loop calls. Composing logprob.py and grpo_loss.py would cost four
matmuls: logits in the forward, then logits again (recompute), dh and dW in the backward. The
floor is three (logits, dh, dW), and four cannot come within 1.3x of it. The way to three:

    dL/dlogp_t = (1 / sum(mask)) * m_t * d(-min(ratio_t A_t, clip(ratio_t) A_t))/d logp_t

depends only on token t's own logp, logp_old, A and mask, plus the global normaliser sum(mask),
which we know before looking at any logits. So while a chunk's logits are in memory in the
forward pass, we already know everything the backward needs, and we do it right away:

    per chunk c of C tokens (C from a byte budget, independent of N):
      1. logits = h[c] @ W.T                 cuBLAS, (C, V) in the model dtype   matmul 1
      2. Triton, one program per row:        read the row: online logsumexp -> logp, entropy
                                             g = dL/dlogp from the GRPO helper (grpo_loss.py)
                                             read the row again, write dlogits = g (onehot - p) / T
                                             over the logits, in place (no second buffer)
      3. dh[c] = dlogits @ W                 cuBLAS, written straight into dh      matmul 2
      4. dW   += dlogits.T @ h[c]            cuBLAS addmm with beta = 1            matmul 3
    then one tiny kernel turns the (N,) logp into the loss value and the statistics.

The backward only multiplies the saved dh and dW by grad_output (a 0-d tensor: no sync).

Memory (N = 16384, H = 1536, V = 151936, bf16): one logits chunk (<= 1 GiB), dW (V x H, 0.47
GB), dh (N x H, 0.05 GB), a few (N,) vectors. Nothing of size N x V. Naive torch peaks at ~27 GB.

Memory traffic beyond the matmuls' own: per logit, the epilogue reads 2 bytes twice and writes
2 bytes once (6 bytes, ~15 GB at this shape, ~5 ms on an H100); rows whose gradient is exactly
zero (masked tokens, clipped tokens) skip the second read. dW's beta = 1 accumulation re-reads
and re-writes dW once per chunk (2 x 0.47 GB per chunk); with K = C >= 2048 the dW matmul stays
compute-bound, so this mostly hides under the tensor-core work.

Why dW accumulates in W's dtype and not fp32: torch's cuBLAS entry points accumulate into C only
in the input dtype (torch.addmm with out_dtype=float32 requires C to be bf16 too), so fp32
accumulation would mean a (V, H) fp32 temporary per chunk plus an add (+0.93 GB, +2 passes of
fp32 traffic per chunk) or a hand-written matmul. Inside each matmul cuBLAS accumulates in
fp32; only the running sum is rounded to bf16, once per chunk. With ~5 large chunks at this
shape that adds a relative error of a few 1e-3 to dW (bench/loss.py measures it against an
fp32 reference). In fp32 (the tests) the accumulation is exact fp32.

Temperature and the k3 KL term to a reference policy go through the same per-token helper, so they
cost nothing extra here.
"""
import torch
import triton
import triton.language as tl

from .grpo_loss import (GRPOStats, _grpo_forward, _grpo_token, _mean_denominator, grpo_loss_reference,
                        mean_denominator, prepare_token_inputs)
from .logprob import (CHUNK_BYTES, _flatten, _row_fill_zero, _row_logsumexp_entropy,
                      _row_write_dlogits, launch_config, token_logprobs_reference)
from .utils import chunk_rows, logit_chunks, use_triton


@triton.jit
def _fused_row_kernel(LOGITS, stride, TARGETS, LOGP_OLD, ADV, MASK, LOGP_REF, MSUM,
                      LOGP, ENT, V, inv_T, eps_low, eps_high, kl_coef,
                      HAS_KL: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride
    # Pass 1: logsumexp and entropy, then this token's log-prob.
    lse, ent = _row_logsumexp_entropy(row_ptr, V, inv_T, BLOCK_V)
    tgt = tl.load(TARGETS + row)
    logp = tl.load(row_ptr + tgt).to(tl.float32) * inv_T - lse
    tl.store(LOGP + row, logp)
    tl.store(ENT + row, ent)
    if NEED_GRAD:
        # dL/dlogp for this token: the GRPO math from grpo_loss.py, on one token.
        logp_old = tl.load(LOGP_OLD + row)
        m = tl.load(MASK + row)
        adv = tl.load(ADV + row)
        logp_ref = logp
        if HAS_KL:
            logp_ref = tl.load(LOGP_REF + row)
        _, dloss, _, _, _ = _grpo_token(logp, logp_old, adv, m, logp_ref,
                                        eps_low, eps_high, kl_coef, HAS_KL)
        msum = tl.load(MSUM)
        g = dloss / _mean_denominator(msum)
        # Pass 2: dlogits over the logits. A zero gradient (masked or clipped token) needs
        # no second read of the row, only zeros for the dh / dW matmuls.
        if g != 0.0:
            _row_write_dlogits(row_ptr, tgt, V, inv_T, lse, g, BLOCK_V)
        else:
            _row_fill_zero(row_ptr, V, BLOCK_V)


class FusedGRPOLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, W, targets, logp_old, adv, mask, logp_ref, eps_low, eps_high, inv_T, kl_coef, chunk):
        N, V = h.shape[0], W.shape[0]
        need_dh, need_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        msum = mask.sum().reshape(1)                     # the global normaliser, stays on device
        logp = torch.empty(N, dtype=torch.float32, device=h.device)
        ent = torch.empty_like(logp)
        dh = torch.empty_like(h) if need_dh else None
        dW = torch.zeros_like(W) if need_dW else None
        block_v, num_warps = launch_config(V)
        for s, e, logits in logit_chunks(h, W, chunk):                    # (C, V): matmul 1
            _fused_row_kernel[(e - s,)](
                logits, logits.stride(0), targets[s:e], logp_old[s:e], adv[s:e], mask[s:e],
                logp_ref[s:e] if logp_ref is not None else logp_old[s:e], msum,
                logp[s:e], ent[s:e], V, inv_T, eps_low, eps_high, kl_coef,
                HAS_KL=logp_ref is not None, NEED_GRAD=need_dh or need_dW,
                BLOCK_V=block_v, num_warps=num_warps)
            if need_dh:
                torch.mm(logits, W, out=dh[s:e])                          # matmul 2
            if need_dW:
                dW.addmm_(logits.t(), h[s:e])                             # matmul 3
        # Loss value and statistics from the (N,) log-probs: the grpo_loss forward kernel.
        loss, stats = _grpo_forward(logp, logp_old, adv, mask, logp_ref, eps_low, eps_high, kl_coef)
        ent_mean = _masked_mean(ent, mask, stats[3])
        ctx.save_for_backward(dh, dW)
        ctx.mark_non_differentiable(stats, ent_mean)
        return loss, stats, ent_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_ent):
        dh, dW = ctx.saved_tensors
        dh = dh * grad_loss.to(dh.dtype) if dh is not None else None
        dW = dW * grad_loss.to(dW.dtype) if dW is not None else None
        return dh, dW, None, None, None, None, None, None, None, None, None, None


def _masked_mean(x, mask, msum):
    """sum(mask * x) / sum(mask) over the tokens with mask != 0 (x elsewhere may be inf or NaN), 0 when
    there are none; msum is sum(mask)."""
    return torch.where(mask != 0, mask * x, torch.zeros_like(x)).sum() / mean_denominator(msum)


def fused_grpo_loss(h, W, targets, logp_old, adv, mask, eps_low=0.2, eps_high=0.2,
                    temperature=1.0, kl_coef=0.0, logp_ref=None, reference=False, chunk_size=None):
    """GRPO loss straight from final hidden states. Returns (loss, GRPOStats with entropy).

    h: (N, H) or (B, T, H) final hidden states; W: (V, H) lm_head weight; targets: (N,) sampled
    token ids; logp_old: (N,) log-probs under the rollout policy; adv: (N,) per-token advantages;
    mask: (N,) 1 on response tokens. The loss carries gradients to h and W. kl_coef > 0 adds the
    k3 KL to logp_ref (see grpo_loss.py).

    reference=True runs the plain-torch reference (chunked, autograd, 4 matmuls) for debugging;
    CPU tensors always do unless TRITON_INTERPRET=1 (a device dispatch, see utils.py).
    """
    h, W, targets = _flatten(h, W, targets)
    N, V = h.shape[0], W.shape[0]
    if reference or not use_triton(h):
        return fused_grpo_loss_reference(h, W, targets, logp_old, adv, mask, eps_low, eps_high,
                                         temperature, kl_coef, logp_ref, chunk_size)
    logp_old, adv, mask, logp_ref = prepare_token_inputs(logp_old, adv, mask, logp_ref, kl_coef, N)
    chunk = chunk_size or chunk_rows(N, V, h.element_size(), CHUNK_BYTES)
    loss, stats, ent_mean = FusedGRPOLoss.apply(
        h, W, targets, logp_old, adv, mask, logp_ref,
        float(eps_low), float(eps_high), 1.0 / temperature, float(kl_coef), chunk)
    return loss, GRPOStats(clip_frac=stats[0], ratio_mean=stats[1], approx_kl=stats[2],
                           entropy=ent_mean)


def fused_grpo_loss_reference(h, W, targets, logp_old, adv, mask, eps_low=0.2, eps_high=0.2,
                              temperature=1.0, kl_coef=0.0, logp_ref=None, chunk_size=None):
    """The same loss as plain torch: chunked checkpointed log-probs, then the torch loss."""
    logp, ent = token_logprobs_reference(h, W, targets, temperature, True, chunk_size)
    loss, stats = grpo_loss_reference(logp, logp_old, adv, mask, eps_low, eps_high, kl_coef, logp_ref)
    with torch.no_grad():
        m = mask.reshape(-1).float()
        stats.entropy = _masked_mean(ent, m, m.sum())
    return loss, stats
