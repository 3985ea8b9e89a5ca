"""Fused token log-prob (and entropy) from final hidden states, without (N, V) logits.

    z    = (h @ W.T) / temperature        h (N, H), W (V, H)   -> z (N, V), never all at once
    logp = z[target] - logsumexp(z)        (N,) fp32
    ent  = -sum_v softmax(z)_v * log softmax(z)_v                (N,) fp32, optional

Why it is needed: at N = 16k tokens and Qwen's V = 152k, fp32 logits are 10 GB, and the naive
log_softmax + gather + autograd keeps several such tensors alive (27 GB peak in bench/loss.py).

Tiling choice: token chunks through cuBLAS, with a Triton epilogue per row.
  * The matmul is 99% of the FLOPs. A hand-written Triton matmul fused with an online
    logsumexp over V tiles never writes logits at all, but it has to beat cuBLAS at its own
    game to win anything. So we let cuBLAS do what it is best at, on C rows at a time:
    logits_c = h[c] @ W.T, (C, V) in the model dtype (bf16: 2 bytes per logit).
  * Only C rows exist at any time, with C picked from a byte budget (utils.chunk_rows,
    default 1 GiB), so peak extra memory does not grow with N; only (N,)-vectors do.
  * The epilogue is one Triton program per row (grid = (C,), 1-D, bounded by the chunk, so no
    sequence length overflows a grid dimension). A program streams its row in BLOCK_V tiles
    with an online logsumexp (running max m, sum s = sum exp(z - m), and t = sum exp(z - m)(z - m)
    for the entropy), i.e. it reads the row once: 2 bytes per logit after cuBLAS wrote 2.
    The naive forward writes bf16 logits (2 bytes), reads them and writes an fp32 copy (2 + 4),
    reads that and writes the fp32 log_softmax (4 + 4), then gathers: 16 bytes of traffic and
    10 bytes of live memory per logit, for all N x V logits at once.
  * Entropy is computed as log(s) - t/s, i.e. relative to the running max, so that large
    logits (|z| ~ 1e4) do not cancel catastrophically the way lse - E[z] would.

No backward: the trainer scores with this op under no_grad (logp_old, logp_ref), and the loss's
gradient comes from fused.py, which writes it over the logits in the same pass. The row helpers
below are shared with it; `_row_write_dlogits` is the gradient of logp:

    d logp / d z_v = onehot_v - p_v
    d / d logits   = (d / d z) / temperature
"""
import torch
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

from .utils import chunk_rows, logit_chunks, next_pow2, use_triton

MAX_BLOCK_V = 4096            # vocab tile per loop step (tests shrink it to exercise many tiles)
CHUNK_BYTES = 1 << 30         # budget for one chunk of logits in the model dtype
REFERENCE_CHUNK_BYTES = 256 << 20  # torch reference: fp32 logits + log_softmax + grads, ~4x


# ----------------------------------------------------------------------------------------------
# Triton: row helpers (also used by fused.py) and the kernel

@triton.jit
def _row_logsumexp_entropy(row_ptr, V, inv_T, BLOCK_V: tl.constexpr):
    """Stream one row of logits; return (logsumexp(z), entropy(softmax(z))) with z = x * inv_T."""
    m = tl.full((), -1.0e30, tl.float32)  # finite start: 0 * (m - m_new) stays 0 on step one
    s = tl.zeros((), dtype=tl.float32)
    t = tl.zeros((), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inb = cols < V
        z = tl.load(row_ptr + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_T
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)
        zm = tl.where(inb, z - m_new, 0.0)                      # no -inf past V: no 0 * inf
        p = tl.where(inb, tl.exp(zm), 0.0)
        # Rebase the running sums from max m to max m_new, then add this tile.
        t = scale * (t + s * (m - m_new)) + tl.sum(p * zm, axis=0)
        s = scale * s + tl.sum(p, axis=0)
        m = m_new
    log_s = tl.log(s)
    return m + log_s, log_s - t / s


@triton.jit
def _row_write_dlogits(row_ptr, tgt, V, inv_T, lse, g_logp, BLOCK_V: tl.constexpr):
    """Overwrite one row of logits with d(g_logp * logp)/d(logits), in place."""
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inb = cols < V
        z = tl.load(row_ptr + cols, mask=inb, other=0.0).to(tl.float32) * inv_T
        logq = z - lse                                          # log softmax
        q = tl.exp(logq)
        d = tl.where(cols == tgt, g_logp, 0.0) - g_logp * q
        tl.store(row_ptr + cols, (d * inv_T).to(row_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _row_fill_zero(row_ptr, V, BLOCK_V: tl.constexpr):
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(row_ptr + cols, tl.zeros([BLOCK_V], dtype=row_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _logprob_fwd_kernel(LOGITS, stride, TARGETS, LOGP, ENT, V, inv_T, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride
    lse, ent = _row_logsumexp_entropy(row_ptr, V, inv_T, BLOCK_V)
    tgt = tl.load(TARGETS + row)
    z_tgt = tl.load(row_ptr + tgt).to(tl.float32) * inv_T   # one scalar load, no gather pass
    tl.store(LOGP + row, z_tgt - lse)
    tl.store(ENT + row, ent)


def launch_config(V: int):
    """(BLOCK_V, num_warps) for a row epilogue over V columns."""
    block_v = min(MAX_BLOCK_V, next_pow2(V))
    return block_v, (8 if block_v >= 2048 else 4)


# ----------------------------------------------------------------------------------------------
# Launcher

def _token_logprobs_triton(h, W, targets, inv_T, chunk):
    """(N,) log-probs and entropies, fp32: cuBLAS chunks of logits and the row kernel over each."""
    N, V = h.shape[0], W.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=h.device)
    ent = torch.empty_like(logp)
    block_v, num_warps = launch_config(V)
    for s, e, logits in logit_chunks(h, W, chunk):                        # (C, V)
        _logprob_fwd_kernel[(e - s,)](logits, logits.stride(0), targets[s:e], logp[s:e], ent[s:e], V, inv_T,
                                      BLOCK_V=block_v, num_warps=num_warps)
    return logp, ent


def _flatten(h, W, targets):
    H = h.shape[-1]
    assert W.dim() == 2 and W.shape[1] == H, f"W must be (V, {H}), got {tuple(W.shape)}"
    assert h.dtype == W.dtype, f"h is {h.dtype} but W is {W.dtype}"
    h = h.reshape(-1, H)
    if h.stride(-1) != 1:
        h = h.contiguous()
    targets = targets.reshape(-1).contiguous()
    assert targets.numel() == h.shape[0], f"{targets.numel()} targets for {h.shape[0]} tokens"
    return h, W, targets


def token_logprobs(h, W, targets, temperature=1.0, return_entropy=False, chunk_size=None):
    """log pi(target) per token, (N,) fp32 [and entropy (N,) fp32], without gradients: call it under
    torch.no_grad() (the loss's gradient comes from fused_grpo_loss).

    h: (N, H) or (B, T, H); W: (V, H), the lm_head weight; targets: (N,) ids in [0, V).
    CUDA tensors (or TRITON_INTERPRET=1) run the Triton path; CPU tensors run the chunked torch
    reference (a device dispatch, see utils.py).
    """
    if torch.is_grad_enabled() and (h.requires_grad or W.requires_grad):
        raise RuntimeError("token_logprobs has no backward: call it under torch.no_grad() (fused_grpo_loss "
                           "gives the loss's gradient; token_logprobs_reference is differentiable)")
    h, W, targets = _flatten(h, W, targets)
    if not use_triton(h):
        return token_logprobs_reference(h, W, targets, temperature, return_entropy, chunk_size)
    N, V = h.shape[0], W.shape[0]
    chunk = chunk_size or chunk_rows(N, V, h.element_size(), CHUNK_BYTES)
    logp, ent = _token_logprobs_triton(h, W, targets, 1.0 / temperature, chunk)
    return (logp, ent) if return_entropy else logp


# ----------------------------------------------------------------------------------------------
# Plain-torch reference of the same math: chunked, autograd through log_softmax, recomputed in
# the backward by torch.utils.checkpoint so that its memory is bounded too.

def _logprob_chunk_torch(h, W, targets, inv_T):
    z = (h @ W.t()).float() * inv_T                              # (C, V): matmul in model dtype
    logq = torch.log_softmax(z, dim=-1)                          # (C, V)
    logp = logq.gather(1, targets[:, None]).squeeze(1)           # (C,)
    ent = -(logq.exp() * logq).sum(-1)                           # (C,)
    return logp, ent


def token_logprobs_reference(h, W, targets, temperature=1.0, return_entropy=False, chunk_size=None):
    h, W, targets = _flatten(h, W, targets)
    N, V = h.shape[0], W.shape[0]
    chunk = chunk_size or chunk_rows(N, V, 4, REFERENCE_CHUNK_BYTES)
    grad = torch.is_grad_enabled() and (h.requires_grad or W.requires_grad)
    logps, ents = [], []
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        args = (h[s:e], W, targets[s:e], 1.0 / temperature)
        lp, en = (checkpoint(_logprob_chunk_torch, *args, use_reentrant=False) if grad
                  else _logprob_chunk_torch(*args))
        logps.append(lp)
        ents.append(en)
    logp, ent = torch.cat(logps), torch.cat(ents)
    return (logp, ent) if return_entropy else logp
