"""Small helpers shared by the kernel files: where to run, block sizes, and the chunked matmul.

Device dispatch, stated once: a Triton kernel needs a CUDA tensor, or the Triton CPU interpreter
(TRITON_INTERPRET=1, which the tests set). Anything else, i.e. CPU tensors on a plain CPU run,
goes to the plain-torch reference that sits beside each kernel and computes the same math. That
is a choice made by the tensor's device, visible in each entry point, not a silent fallback
after a failure: a broken kernel on a GPU raises.
"""
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (read per call, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernels for tensors on a GPU, or anywhere under the interpreter."""
    return t.is_cuda or interpreting()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def chunk_rows(n_rows: int, n_vocab: int, itemsize: int, budget_bytes: int) -> int:
    """How many token rows of (rows, V) logits fit in `budget_bytes`, balanced over chunks.

    The chunk is the only N-sized thing we ever allocate next to (N,)-vectors, so peak extra
    memory is budget_bytes + O(N) no matter how long the batch is. Chunks are balanced (16384
    tokens in 5 chunks of ~3300, not 4 x 3532 + 2256) and rounded to 128 rows so cuBLAS sees
    tile-friendly shapes.
    """
    cap = max(1, budget_bytes // (n_vocab * itemsize))
    if cap >= n_rows:
        return max(1, n_rows)
    n_chunks = -(-n_rows // cap)
    rows = -(-n_rows // n_chunks)
    if rows > 128:
        rows = min(cap, -(-rows // 128) * 128)
    return max(1, rows)


def logit_chunks(h: torch.Tensor, W: torch.Tensor, chunk: int):
    """Yield (s, e, logits) for each run of `chunk` token rows: logits = h[s:e] @ W.T, (e - s, V) in
    h's dtype (cuBLAS), written into one (chunk, V) buffer that every chunk reuses: the memory it
    takes does not grow with N. The caller may overwrite the logits in place."""
    N, V = h.shape[0], W.shape[0]
    buf = torch.empty(min(chunk, N), V, dtype=h.dtype, device=h.device)  # the one (C, V) buffer
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        logits = buf[: e - s]                                              # (C, V)
        torch.mm(h[s:e], W.t(), out=logits)
        yield s, e, logits
