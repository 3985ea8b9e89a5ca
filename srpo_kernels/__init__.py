"""Triton kernels for the policy update, one op per file.

    logprob.py    token_logprobs: h, W, targets -> per-token log-prob (and entropy), no (N, V), no grad
    grpo_loss.py  the clipped-surrogate math per token, the loss and stats kernel, the torch reference
    fused.py      fused_grpo_loss: h, W, targets -> loss in three matmuls (what srpo.py calls)

Each file holds its Triton kernels, the launcher (fused.py's an autograd.Function) and a
plain-torch reference of the same math. CUDA tensors run Triton; CPU tensors run the torch reference,
unless TRITON_INTERPRET=1 (the tests), which runs the Triton kernels in the interpreter.
"""
from .fused import fused_grpo_loss, fused_grpo_loss_reference
from .grpo_loss import GRPOStats, grpo_loss_reference
from .logprob import token_logprobs, token_logprobs_reference

__all__ = [
    "token_logprobs", "token_logprobs_reference",
    "grpo_loss_reference", "GRPOStats",
    "fused_grpo_loss", "fused_grpo_loss_reference",
]
