"""Triton kernels for the policy update, one op per file.

    logprob.py    token_logprobs: h, W, targets -> per-token log-prob (and entropy), no (N, V)
    grpo_loss.py  grpo_loss: per-token log-probs -> masked clipped-surrogate loss + stats
    fused.py      fused_grpo_loss: h, W, targets -> loss in three matmuls (what srpo.py calls)

Each file holds its Triton kernels, the launcher, an autograd.Function and a plain-torch
reference of the same math. CUDA tensors run Triton; CPU tensors run the torch reference,
unless TRITON_INTERPRET=1 (the tests), which runs the Triton kernels in the interpreter.
"""
from .fused import fused_grpo_loss, fused_grpo_loss_reference
from .grpo_loss import GRPOStats, grpo_loss, grpo_loss_reference
from .logprob import token_logprobs, token_logprobs_reference

__all__ = [
    "token_logprobs", "token_logprobs_reference",
    "grpo_loss", "grpo_loss_reference", "GRPOStats",
    "fused_grpo_loss", "fused_grpo_loss_reference",
]
