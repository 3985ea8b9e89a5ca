"""Hidden states -> GRPO loss, forward + backward: time and peak extra memory, three ways.

    python bench/loss.py                 # on a GPU: the table for bench/RESULTS.md
    python bench/loss.py --cpu-smoke     # tiny shapes on CPU (Triton interpreter): code paths only

Methods, all computing the same token-level-mean clipped surrogate with grads to h and W:
  srpo kernels  srpo_kernels.fused_grpo_loss: cuBLAS token chunks + Triton epilogue, three matmuls
  naive torch   bf16 matmul -> fp32 log_softmax -> gather -> torch clipped loss, autograd
  liger         liger_kernel's LigerFusedLinearGRPOLoss (beta=0, token-level mean "bnpo")
plus the matmul floor: three N x H x V products at the bf16 rate measured here on h @ W.T.
"Peak extra" is max_memory_allocated during forward + backward minus what was allocated before
(inputs and weights), so it includes the gradients dh and dW every method has to produce.
Then the accuracy check: our bf16 path against the fp32 torch reference (relative L2 error of
the loss, dh and dW; the issue asks for < 1e-2), with naive bf16 torch for scale.
"""
import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EPS_LOW, EPS_HIGH = 0.2, 0.2


def make_inputs(torch, kernels, N, H, V, T, dtype, device, seed=0):
    """A batch that looks like a rollout: B sequences of T tokens, a prompt prefix masked out,
    per-sequence advantages, and logp_old near the current policy (so some tokens clip)."""
    torch.manual_seed(seed)
    B = N // T
    h = torch.randn(N, H, device=device, dtype=dtype)                     # (N, H)
    W = (torch.randn(V, H, device=device) / H ** 0.5 * 4).to(dtype)       # (V, H), peaked-ish logits
    targets = torch.randint(0, V, (N,), device=device)
    with torch.no_grad():
        logp_now = kernels.token_logprobs(h, W, targets)
    logp_old = logp_now + 0.1 * torch.randn(N, device=device)
    adv_seq = torch.randn(B, device=device)                                # (B,)
    seq_idx = torch.arange(B, device=device).repeat_interleave(T)          # (N,)
    prompt_len = torch.randint(0, T // 4 + 1, (B,), device=device)
    pos = torch.arange(T, device=device).repeat(B)
    mask = (pos >= prompt_len[seq_idx]).float()                            # (N,) response tokens
    return dict(h=h, W=W, targets=targets, logp_old=logp_old, adv_seq=adv_seq,
                adv=adv_seq[seq_idx].contiguous(), mask=mask, B=B, T=T)


def srpo_step(torch, kernels):
    def step(x, h, W):
        loss, _ = kernels.fused_grpo_loss(h, W, x["targets"], x["logp_old"], x["adv"], x["mask"],
                                          EPS_LOW, EPS_HIGH)
        loss.backward()
        return loss
    return step


def naive_step(torch):
    def step(x, h, W):
        logits = h @ W.t()                                                 # (N, V) bf16
        logq = torch.log_softmax(logits.float(), dim=-1)                   # (N, V) fp32
        logp = logq.gather(1, x["targets"][:, None]).squeeze(1)            # (N,)
        ratio = torch.exp(logp - x["logp_old"])
        adv, mask = x["adv"], x["mask"]
        obj = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * adv)
        loss = -(obj * mask).sum() / mask.sum().clamp_min(1)
        loss.backward()
        return loss
    return step


def liger_step(torch, compiled=True):
    """None with a reason when liger-kernel is missing; imported only here."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as e:  # ImportError, or a liger/triton version mismatch at import time
        return None, f"not installed ({type(e).__name__})"
    try:
        fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo", compiled=compiled,
                                      epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, temperature=1.0)
    except TypeError:  # older liger: fewer knobs (its default clip is 0.2 / 0.2 as well)
        fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)

    def step(x, h, W):
        B, T = x["B"], x["T"]
        out = fn(h.view(B, T, -1), W, x["targets"].view(B, T), x["mask"].view(B, T),
                 x["adv_seq"], old_per_token_logps=x["logp_old"].view(B, T))
        loss = out[0] if isinstance(out, (tuple, list)) else out
        loss.backward()
        return loss
    return step, ""


def measure(torch, step, x, warmup, iters, cuda):
    """Median fwd+bwd ms, peak extra GiB (None on CPU) and the loss: every method must agree on it."""
    h = x["h"].detach().requires_grad_()
    W = x["W"].detach().requires_grad_()
    for _ in range(warmup):
        step(x, h, W)
        h.grad = W.grad = None
    times = []
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(iters):
        h.grad = W.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(x, h, W)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            loss = step(x, h, W)
            times.append(1e3 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if cuda else None
    h.grad = W.grad = None
    return statistics.median(times), peak, float(loss.detach())


def matmul_ms(torch, x, iters, cuda):
    """One N x H x V bf16 product (h @ W.T into a preallocated output), median ms."""
    h, W = x["h"], x["W"]
    out = torch.empty(h.shape[0], W.shape[0], dtype=h.dtype, device=h.device)
    times = []
    for i in range(iters + 1):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(h, W.t(), out=out)
            end.record()
            torch.cuda.synchronize()
            t = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            torch.mm(h, W.t(), out=out)
            t = 1e3 * (time.perf_counter() - t0)
        if i:  # the first call warms cuBLAS up
            times.append(t)
    del out
    return statistics.median(times)


def profile_srpo(torch, kernels, N, H, V, T, dtype, device):
    """Where our time goes: device time per op (matmuls by shape, the Triton epilogue)."""
    x = make_inputs(torch, kernels, N, H, V, T, dtype, device)
    step = srpo_step(torch, kernels)
    h, W = x["h"].detach().requires_grad_(), x["W"].detach().requires_grad_()
    step(x, h, W)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        h.grad = W.grad = None
        step(x, h, W)
        torch.cuda.synchronize()
    table = prof.key_averages(group_by_input_shape=True)
    print(f"\n# srpo kernels at H={H}, V={V}: device time by op (one fwd+bwd)\n")
    for key in ("device_time_total", "cuda_time_total"):  # the name changed across torch versions
        try:
            print(table.table(sort_by=key, row_limit=15, max_name_column_width=40))
            break
        except Exception:
            continue


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def accuracy(torch, kernels, N, H, V, T, device, low):
    """Relative error of (loss, dh, dW) in `low` precision vs the fp32 torch reference."""
    x = make_inputs(torch, kernels, N, H, V, T, torch.float32, device, seed=1)

    def grads(fn, dtype):
        h = x["h"].to(dtype).requires_grad_()
        W = x["W"].to(dtype).requires_grad_()
        loss = fn(h, W)
        dh, dW = torch.autograd.grad(loss, (h, W))
        return loss.detach(), dh, dW

    def ours(h, W, reference=False):
        return kernels.fused_grpo_loss(h, W, x["targets"], x["logp_old"], x["adv"], x["mask"],
                                       EPS_LOW, EPS_HIGH, reference=reference)[0]

    def naive(h, W):
        logq = torch.log_softmax((h @ W.t()).float(), dim=-1)
        logp = logq.gather(1, x["targets"][:, None]).squeeze(1)
        ratio = torch.exp(logp - x["logp_old"])
        obj = torch.minimum(ratio * x["adv"], torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * x["adv"])
        return -(obj * x["mask"]).sum() / x["mask"].sum()

    ref = grads(lambda h, W: ours(h, W, reference=True), torch.float32)
    rows = []
    for name, fn in (("srpo kernels", ours), ("naive torch", naive)):
        got = grads(fn, low)
        rows.append((name, *(rel_err(a, b) for a, b in zip(got, ref))))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on CPU through the Triton interpreter: exercises every code path")
    p.add_argument("--n", type=int, default=16384, help="tokens per batch (N)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (T); B = N / T")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
    p.add_argument("--skip", default="", help="comma-separated methods to skip: srpo,naive,liger")
    args = p.parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"   # before triton sees any kernel definition

    import torch
    import triton
    import srpo_kernels as kernels

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        sys.exit("no CUDA GPU: run with --cpu-smoke to check the code paths on CPU")
    if args.cpu_smoke:
        N, T, shapes, warmup, iters = 64, 16, [(32, 300), (24, 257)], 0, 1
        dtype, acc_shape = torch.float32, (48, 32, 300, 16)  # the interpreter reads no bf16
    else:
        N, T, warmup, iters = args.n, args.seq_len, 2, args.iters
        shapes, dtype, acc_shape = [(1536, 151936), (3584, 152064)], torch.bfloat16, (4096, 1536, 151936, 1024)
    device = "cuda" if cuda else "cpu"
    skip = set(filter(None, args.skip.split(",")))

    methods = [("srpo kernels", srpo_step(torch, kernels), ""), ("naive torch", naive_step(torch), "")]
    step, why = liger_step(torch, compiled=cuda)   # on a CPU uncompiled: the smoke checks the call
    methods.append(("liger FusedLinearGRPOLoss", step, why))
    key = {"srpo kernels": "srpo", "naive torch": "naive", "liger FusedLinearGRPOLoss": "liger"}

    dev_name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"# GRPO loss from hidden states: forward + backward, N = {N} tokens\n")
    print(f"{datetime.date.today()} | {dev_name} | torch {torch.__version__} | triton {triton.__version__}\n")
    print("| H | V | method | fwd+bwd ms | x floor | peak extra GiB | loss |")
    print("|---|---|---|---|---|---|---|")
    for H, V in shapes:
        x = make_inputs(torch, kernels, N, H, V, T, dtype, device)
        mm = matmul_ms(torch, x, 5 if cuda else 1, cuda)
        floor = 3 * mm
        tflops = 2 * N * H * V / (mm * 1e-3) / 1e12
        print(f"| {H} | {V} | matmul floor (3 x N*H*V at {tflops:.0f} TFLOP/s) | {floor:.1f} | 1.00 | - | - |")
        for name, step, why in methods:
            if key[name] in skip:
                why = why or "skipped"
            if step is None or key[name] in skip:
                print(f"| {H} | {V} | {name} | {why} | - | - | - |")
                continue
            try:
                ms, peak, loss = measure(torch, step, x, warmup, iters, cuda)
                mem = f"{peak:.2f}" if peak is not None else "n/a"
                print(f"| {H} | {V} | {name} | {ms:.1f} | {ms / floor:.2f} | {mem} | {loss:.6f} |")
            except torch.cuda.OutOfMemoryError:
                print(f"| {H} | {V} | {name} | OOM | - | - | - |")
            if cuda:
                torch.cuda.empty_cache()
        del x
        sys.stdout.flush()

    if cuda and "srpo" not in skip:
        profile_srpo(torch, kernels, N, *shapes[0], T, dtype, device)

    an, ah, av, at = acc_shape
    low = torch.bfloat16 if cuda else torch.float32
    print(f"\n# Accuracy: {str(low).replace('torch.', '')} vs the fp32 torch reference "
          f"(N={an}, H={ah}, V={av}), relative L2 error\n")
    print("| method | loss | dh | dW |")
    print("|---|---|---|---|")
    for name, el, eh, ew in accuracy(torch, kernels, an, ah, av, at, device, low):
        print(f"| {name} | {el:.1e} | {eh:.1e} | {ew:.1e} |")


if __name__ == "__main__":
    main()
