"""srpo_kernels/: Triton (in the interpreter on CPU) vs plain torch, forward and backward.

Ground truth is an independent naive computation in float64: full logits, log_softmax, gather,
and the clipped loss written with torch.minimum / torch.clamp, differentiated by autograd.
Shapes are tiny and irregular (the interpreter is ~100x slower than torch); vocab tiles are
shrunk to 64 columns so that every row spans several tiles and the last one is partial.
Every test draws fresh random inputs.
"""
import dataclasses

import pytest
import torch

import srpo_kernels as kernels
from srpo_kernels import fused, logprob
from srpo_kernels import grpo_loss as grpo
from srpo_kernels.utils import chunk_rows


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(logprob, "MAX_BLOCK_V", 64)


def close(actual, expected, what, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} differs from the naive float64 result:\n{m}")


def make_policy(N, H, V, scale=1.0, dtype=torch.float32):
    h = torch.randn(N, H, dtype=dtype).requires_grad_()
    W = (torch.randn(V, H) * scale / H ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,))
    return h, W, targets


def naive_logprobs(h, W, targets, temperature=1.0):
    z = (h.double() @ W.double().t()) / temperature                 # (N, V): all of it
    logq = torch.log_softmax(z, dim=-1)
    logp = logq.gather(1, targets[:, None]).squeeze(1)
    ent = -(logq.exp() * logq).sum(-1)
    return logp, ent


def naive_grpo(logp, logp_old, adv, mask, eps_low, eps_high, kl_coef=0.0, logp_ref=None):
    """Textbook clipped surrogate, token-level mean over unmasked tokens (inputs all finite)."""
    logp_old, adv, mask = logp_old.double(), adv.double(), mask.double()
    ratio = torch.exp(logp - logp_old)
    obj = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    per_token = -obj
    if kl_coef:
        d = logp_ref.double() - logp
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1)
    loss = (per_token * mask).sum() / mask.sum()
    clipped = ((ratio > 1 + eps_high) & (adv > 0)) | ((ratio < 1 - eps_low) & (adv < 0))
    stats = {"clip_frac": (clipped * mask).sum() / mask.sum(),
             "ratio_mean": (ratio * mask).sum() / mask.sum(),
             "approx_kl": ((ratio - 1 - (logp - logp_old)) * mask).sum() / mask.sum()}
    return loss, stats


def stat_values(stats) -> dict:
    """The statistics a GRPOStats holds (entropy where the path computes it), by name."""
    values = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    return {k: v for k, v in values.items() if v is not None}


def loss_kernel(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.2, kl_coef=0.0, logp_ref=None):
    """The Triton loss-and-statistics kernel over (N,) log-probs, as fused_grpo_loss runs it: loss (0-d)
    and stats (4,) = clip_frac, ratio_mean, approx_kl, sum(mask)."""
    logp = logp.detach().reshape(-1).float().contiguous()
    logp_old, adv, mask, logp_ref = grpo.prepare_token_inputs(logp_old, adv, mask, logp_ref, kl_coef,
                                                              logp.numel())
    return grpo._grpo_forward(logp, logp_old, adv, mask, logp_ref, eps_low, eps_high, kl_coef)


def rollout_inputs(logp_now, N, n_masked_rows=3):
    """logp_old near the current policy (so some tokens clip, most do not), adv, 0/1 mask."""
    logp_old = logp_now.detach().float() + 0.3 * torch.randn(N)
    adv = torch.randn(N)
    mask = (torch.rand(N) > 0.25).float()
    mask[torch.randperm(N)[:min(n_masked_rows, N - 1)]] = 0.0   # some fully masked rows
    return logp_old, adv, mask


# ---------------------------------------------------------------------------------------------
# token_logprobs

@pytest.mark.parametrize("N,H,V,temperature", [(1, 8, 5, 1.0), (37, 24, 203, 0.7), (19, 16, 64, 1.3)])
def test_token_logprobs_matches_naive(N, H, V, temperature):
    """token_logprobs' log-probs and entropies equal naive float64 math on irregular shapes; asked for a
    gradient it has not got, it refuses rather than return log-probs that carry none."""
    h, W, targets = make_policy(N, H, V, scale=3.0)
    with torch.no_grad():
        logp, ent = kernels.token_logprobs(h, W, targets, temperature, return_entropy=True,
                                           chunk_size=max(1, N // 3))
        logp_ref, ent_ref = naive_logprobs(h, W, targets, temperature)
    close(logp, logp_ref, "log-prob")
    close(ent, ent_ref, "entropy")
    with pytest.raises(RuntimeError, match="no backward"):
        kernels.token_logprobs(h, W, targets, temperature)


def test_token_logprobs_reference_matches_naive():
    """The chunked torch reference, token_logprobs_reference, equals naive float64 log-probs and dW."""
    N, H, V = 23, 12, 97
    h, W, targets = make_policy(N, H, V, scale=2.0)
    logp = kernels.token_logprobs_reference(h, W, targets, 0.9, chunk_size=5)
    logp_ref, _ = naive_logprobs(h, W, targets, 0.9)
    close(logp, logp_ref, "reference log-prob")
    close(torch.autograd.grad(logp.sum(), W)[0], torch.autograd.grad(logp_ref.sum(), W)[0], "reference dW")


def test_token_logprobs_large_logits_stay_finite_and_exact():
    """At logits of 1e3..1e4 the log-probs, entropy and the fused loss's dh stay finite and exact (no
    overflow, no cancellation)."""
    # Logits of order 1e3..1e4: a logsumexp without the running max overflows exp() at ~88,
    # and an entropy computed as lse - E[z] loses every digit to cancellation.
    N, H, V = 9, 16, 150
    h, W, targets = make_policy(N, H, V, scale=3000.0)
    with torch.no_grad():
        logp, ent = kernels.token_logprobs(h, W, targets, return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all(), "non-finite log-prob/entropy"
    # Compare with float64 math on the *same* fp32 logits (the matmul's own rounding at 1e4
    # is ~1e-3 and not what is being tested).
    z = (h.detach() @ W.detach().t()).double()
    logq = torch.log_softmax(z, -1)
    close(logp, logq.gather(1, targets[:, None]).squeeze(1), "log-prob at large logits", atol=1e-3)
    close(ent, -(logq.exp() * logq).sum(-1), "entropy at large logits", atol=1e-4)
    # The gradient over the same logits, through the fused loss's row kernel (ratio 1: none clipped).
    loss, _ = kernels.fused_grpo_loss(h, W, targets, logp, torch.ones(N), torch.ones(N))
    dh, = torch.autograd.grad(loss, h)
    assert torch.isfinite(dh).all(), "non-finite dh at large logits"


# ---------------------------------------------------------------------------------------------
# grpo_loss: the loss-and-statistics kernel (fused_grpo_loss's last step) and the torch reference

def test_grpo_loss_matches_naive_and_reference():
    """The loss kernel and the reference equal the naive clipped loss and stats, and the reference its
    dlogp, with eps_low != eps_high."""
    N = 300                                    # > BLOCK? no: 1024; still several partial lanes
    logp = (torch.randn(N) - 2).requires_grad_()
    logp_old, adv, mask = rollout_inputs(logp, N)
    eps_low, eps_high = 0.2, 0.28              # clip-higher: the two bounds must not be swapped
    loss, stats = loss_kernel(logp, logp_old, adv, mask, eps_low, eps_high)
    loss_n, stats_n = naive_grpo(logp.double(), logp_old, adv, mask, eps_low, eps_high)
    loss_r, stats_r = kernels.grpo_loss_reference(logp, logp_old, adv, mask, eps_low, eps_high)
    close(loss, loss_n, "loss")
    close(loss_r, loss_n, "reference loss")
    assert 0.0 < float(stats_n["clip_frac"]) < 1.0, "test inputs should clip some tokens, not all"
    for i, k in enumerate(("clip_frac", "ratio_mean", "approx_kl")):
        close(stats[i], stats_n[k], f"stat {k}")
        close(getattr(stats_r, k), stats_n[k], f"reference stat {k}")
    close(stats[3], mask.sum(), "the kernel's sum(mask)")
    close(torch.autograd.grad(loss_r, logp)[0], torch.autograd.grad(loss_n, logp)[0], "reference dlogp")


def test_grpo_loss_long_batch_loops_inside_one_program():
    """The loss kernel over more than two BLOCKs, looped in one program, still equals the naive loss."""
    N = 2500                                   # > 2 x BLOCK: the forward's loop takes 3 steps
    logp = (torch.randn(N) - 1).requires_grad_()
    logp_old, adv, mask = rollout_inputs(logp, N)
    loss, _ = loss_kernel(logp, logp_old, adv, mask)
    loss_n, _ = naive_grpo(logp.double(), logp_old, adv, mask, 0.2, 0.2)
    close(loss, loss_n, "loss over several blocks")


def test_grpo_loss_k3_kl_term():
    """The k3 KL term matches the naive loss (kernel and reference) and dlogp (reference), and kl_coef
    without logp_ref is a ValueError."""
    N = 77
    logp = (torch.randn(N) - 2).requires_grad_()
    logp_old, adv, mask = rollout_inputs(logp, N)
    logp_ref = logp.detach() + 0.2 * torch.randn(N)
    loss, _ = loss_kernel(logp, logp_old, adv, mask, kl_coef=0.3, logp_ref=logp_ref)
    loss_r, _ = kernels.grpo_loss_reference(logp, logp_old, adv, mask, kl_coef=0.3, logp_ref=logp_ref)
    loss_n, _ = naive_grpo(logp.double(), logp_old, adv, mask, 0.2, 0.2, 0.3, logp_ref)
    close(loss, loss_n, "loss with k3 KL")
    close(loss_r, loss_n, "reference loss with k3 KL")
    close(torch.autograd.grad(loss_r, logp)[0], torch.autograd.grad(loss_n, logp)[0], "dlogp with k3 KL")
    with pytest.raises(ValueError, match="logp_ref"):
        kernels.grpo_loss_reference(logp, logp_old, adv, mask, kl_coef=0.1)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, on the inf inputs
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_grpo_loss_all_masked_is_zero_not_nan(impl):
    """An all-masked batch gives loss, stats (and the reference's grad) of exactly 0, not NaN, even with
    inf or NaN in logp_old."""
    N = 40
    logp = torch.randn(N).requires_grad_()
    logp_old = torch.full((N,), float("-inf"))                # padding garbage: ratio = inf
    logp_old[::3] = float("nan")
    adv, mask = torch.randn(N), torch.zeros(N)
    if impl == "triton":
        loss, stats = loss_kernel(logp, logp_old, adv, mask)
        assert loss.item() == 0.0, f"all-masked loss is {loss.item()}, expected 0"
        assert torch.equal(stats, torch.zeros(4)), f"all-masked stats {stats.tolist()}"
        return
    loss, stats = kernels.grpo_loss_reference(logp, logp_old, adv, mask)
    assert loss.item() == 0.0, f"all-masked loss is {loss.item()}, expected 0"
    values = stat_values(stats)
    assert all(v == 0.0 for v in values.values()), f"all-masked stats {values}"
    g = torch.autograd.grad(loss, logp)[0]
    assert torch.equal(g, torch.zeros_like(g)), "all-masked batch produced a nonzero or NaN grad"


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, on the inf inputs
def test_grpo_loss_masked_garbage_does_not_leak():
    """inf in logp_old at masked tokens (padding) changes neither the loss (kernel and reference) nor
    dlogp (reference)."""
    N = 50
    logp = (torch.randn(N) - 2).requires_grad_()
    logp_old, adv, mask = rollout_inputs(logp, N)
    dirty = logp_old.clone()
    dirty[mask == 0] = float("inf")                          # what padding may hold
    close(loss_kernel(logp, dirty, adv, mask)[0], loss_kernel(logp, logp_old, adv, mask)[0],
          "loss with inf at masked tokens")
    loss, _ = kernels.grpo_loss_reference(logp, dirty, adv, mask)
    loss_clean, _ = kernels.grpo_loss_reference(logp, logp_old, adv, mask)
    close(loss, loss_clean, "reference loss with inf at masked tokens")
    close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(loss_clean, logp)[0],
          "dlogp with inf at masked tokens")


# ---------------------------------------------------------------------------------------------
# fused_grpo_loss (the training loop's entry point)

def fused_case(N, H, V, temperature, kl=False):
    h, W, targets = make_policy(N, H, V, scale=2.0)
    logp_now, _ = naive_logprobs(h, W, targets, temperature)
    logp_old, adv, mask = rollout_inputs(logp_now, N)
    kw = dict(eps_low=0.2, eps_high=0.28, temperature=temperature)
    if kl:
        kw.update(kl_coef=0.1, logp_ref=logp_now.detach().float() + 0.1 * torch.randn(N))
    return h, W, targets, logp_old, adv, mask, kw


def naive_fused(h, W, targets, logp_old, adv, mask, kw):
    logp, ent = naive_logprobs(h, W, targets, kw["temperature"])
    loss, stats = naive_grpo(logp, logp_old, adv, mask, kw["eps_low"], kw["eps_high"],
                             kw.get("kl_coef", 0.0), kw.get("logp_ref"))
    stats["entropy"] = (ent * mask.double()).sum() / mask.double().sum()
    return loss, stats


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("N,H,V,temperature,kl", [
    (45, 16, 131, 0.8, False),    # several chunks, V not a multiple of the 64-wide tile
    (1, 8, 70, 1.0, False),       # a single token
    (29, 12, 100, 1.0, True),     # k3 KL
])
def test_fused_grpo_loss_matches_naive(impl, N, H, V, temperature, kl):
    """fused_grpo_loss and its reference equal naive float64 loss, stats, dh and dW, grad_output != 1
    included."""
    h, W, targets, logp_old, adv, mask, kw = fused_case(N, H, V, temperature, kl)
    if N == 1:
        mask[:] = 1.0
    loss, stats = kernels.fused_grpo_loss(h, W, targets, logp_old, adv, mask, **kw,
                                          reference=impl == "reference", chunk_size=8)
    loss_n, stats_n = naive_fused(h, W, targets, logp_old, adv, mask, kw)
    close(loss, loss_n, f"{impl} loss")
    for k in ("clip_frac", "ratio_mean", "approx_kl", "entropy"):
        close(getattr(stats, k), stats_n[k], f"{impl} stat {k}")
    # 1.7 x loss: the backward must scale the gradients it computed in the forward.
    dh, dW = torch.autograd.grad(1.7 * loss, (h, W))
    dh_n, dW_n = torch.autograd.grad(1.7 * loss_n, (h, W))
    close(dh, dh_n, f"{impl} dh")
    close(dW, dW_n, f"{impl} dW")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, on the inf inputs
def test_fused_grpo_loss_all_masked_is_zero_not_nan():
    """fused_grpo_loss on an all-masked batch with inf logp_old gives loss, stats, dh and dW of exactly 0."""
    h, W, targets, logp_old, adv, mask, kw = fused_case(21, 8, 90, 1.0)
    mask.zero_()
    logp_old[:] = float("inf")
    loss, stats = kernels.fused_grpo_loss(h, W, targets, logp_old, adv, mask, **kw, chunk_size=6)
    assert loss.item() == 0.0, f"all-masked fused loss is {loss.item()}"
    values = stat_values(stats)
    assert set(values) == {"clip_frac", "ratio_mean", "approx_kl", "entropy"}, f"fused stats {sorted(values)}"
    assert all(v == 0.0 for v in values.values()), f"all-masked stats {values}"
    dh, dW = torch.autograd.grad(loss, (h, W))
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dW, torch.zeros_like(dW)), \
        "all-masked batch produced nonzero or NaN gradients"


def test_fused_grpo_loss_without_grad_gives_the_same_value():
    """Under no_grad fused_grpo_loss (the NEED_GRAD=False kernel) gives the same loss as naive math."""
    h, W, targets, logp_old, adv, mask, kw = fused_case(17, 8, 77, 1.0)
    with torch.no_grad():
        loss, _ = kernels.fused_grpo_loss(h, W, targets, logp_old, adv, mask, **kw, chunk_size=5)
        loss_n, _ = naive_fused(h, W, targets, logp_old, adv, mask, kw)
    close(loss, loss_n, "loss computed under no_grad (the NEED_GRAD=False kernel)")


def test_cpu_without_interpreter_dispatches_to_reference(monkeypatch):
    """On CPU without TRITON_INTERPRET, fused_grpo_loss runs the torch reference, and its loss is right."""
    # Device dispatch: CPU tensors and no TRITON_INTERPRET -> the torch reference, by design.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    real = fused.fused_grpo_loss_reference
    monkeypatch.setattr(fused, "fused_grpo_loss_reference",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    h, W, targets, logp_old, adv, mask, kw = fused_case(20, 8, 60, 1.0)
    loss, _ = kernels.fused_grpo_loss(h, W, targets, logp_old, adv, mask, **kw)
    assert calls, "CPU tensors without the interpreter did not take the torch reference"
    loss_n, _ = naive_fused(h, W, targets, logp_old, adv, mask, kw)
    close(loss, loss_n, "dispatched reference loss")


def test_chunk_rows_bounds_memory_and_covers_batch():
    """chunk_rows picks 1..N rows whose logits fit the byte budget, or one row when a single row
    exceeds it."""
    for n, v, budget in [(16384, 151936, 1 << 30), (262144, 151936, 1 << 30), (5, 10, 1000),
                         (1000, 7, 10**9)]:
        rows = chunk_rows(n, v, 2, budget)
        assert 1 <= rows <= n, f"chunk of {rows} rows for a batch of {n}"
        assert rows * v * 2 <= max(budget, v * 2), f"chunk of {rows} rows of V={v} exceeds {budget} bytes"


# ---------------------------------------------------------------------------------------------
# GPU only

def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.gpu
def test_gpu_bf16_close_to_fp32_reference():
    """On a GPU, Triton's fused loss, dh and dW in bf16 and in fp32 are within 1% of the fp32 torch
    reference."""
    torch.manual_seed(0)
    N, H, V = 4096, 1024, 32003
    h32 = torch.randn(N, H, device="cuda")
    W32 = torch.randn(V, H, device="cuda") / H ** 0.5
    targets = torch.randint(0, V, (N,), device="cuda")
    with torch.no_grad():
        logp_now = kernels.token_logprobs_reference(h32, W32, targets)
    logp_old = logp_now + 0.2 * torch.randn(N, device="cuda")
    adv = torch.randn(N, device="cuda")
    mask = (torch.rand(N, device="cuda") > 0.2).float()

    def run(h, W, **kw):
        h = h.detach().requires_grad_()
        W = W.detach().requires_grad_()
        loss, _ = kernels.fused_grpo_loss(h, W, targets, logp_old, adv, mask, **kw)
        dh, dW = torch.autograd.grad(loss, (h, W))
        return loss, dh, dW

    ref = run(h32, W32, reference=True)
    for name, got in [("bf16 triton", run(h32.bfloat16(), W32.bfloat16())), ("fp32 triton", run(h32, W32))]:
        for what, a, b in zip(("loss", "dh", "dW"), got, ref):
            err = rel_err(a, b)
            assert err < 1e-2, f"{name} {what}: relative error {err:.2e} vs the fp32 reference"


@pytest.mark.gpu
def test_gpu_long_input_256k_tokens():
    """At 256k tokens no grid overflows: the fused loss and grads match the reference, token_logprobs
    stays finite."""
    # 262144 tokens: every grid is 1-D over a chunk or over token blocks, so nothing overflows
    # CUDA's 65535 limit on grid y/z (Liger's (B, L) grid does at L >= 65536).
    torch.manual_seed(0)
    N, H, V = 262144, 64, 1000
    h = torch.randn(N, H, device="cuda", requires_grad=True)
    W = (torch.randn(V, H, device="cuda") / 8).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    logp_old = -torch.rand(N, device="cuda") * 8
    adv, mask = torch.randn(N, device="cuda"), (torch.rand(N, device="cuda") > 0.1).float()
    loss, stats = kernels.fused_grpo_loss(h, W, targets, logp_old, adv, mask)
    dh, dW = torch.autograd.grad(loss, (h, W))
    loss_r, _ = kernels.fused_grpo_loss(h, W, targets, logp_old, adv, mask, reference=True)
    dh_r, dW_r = torch.autograd.grad(loss_r, (h, W))
    assert torch.isfinite(dh).all() and torch.isfinite(dW).all(), "non-finite grads at 256k tokens"
    for what, a, b in (("loss", loss, loss_r), ("dh", dh, dh_r), ("dW", dW, dW_r)):
        assert rel_err(a, b) < 1e-4, f"{what} at 256k tokens: relative error {rel_err(a, b):.2e}"
    with torch.no_grad():
        logp = kernels.token_logprobs(h, W, targets)
    assert logp.shape == (N,) and torch.isfinite(logp).all(), "token_logprobs failed at 256k tokens"
