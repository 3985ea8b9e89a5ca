"""The policy update alone, at the Qwen2.5-1.5B shape: training tokens/s and MFU.

    python bench/update.py              # on a GPU: the table for bench/RESULTS.md
    python bench/update.py --cpu-smoke  # a tiny model on CPU: every code path, numbers meaningless

What is timed: one call of srpo.policy_update (pack the rollouts into micro-batches of at most
--micro-tokens tokens, forward + backward through the fused GRPO loss, gradient clipping, one
AdamW step), on random weights and synthetic GRPO-shaped rollouts, after warm-up calls (the
first compiles flex_attention). Weights are fp32 masters; policy_update runs the forward under
bf16 autocast on a single GPU. Variants, side by side on the same rollouts:
  srpo kernels     cfg.reference_loss = False: the fused Triton loss (what training runs)
  reference loss   cfg.reference_loss = True: the plain-torch loss, the baseline
  sdpa causal      srpo kernels, but attention through SDPA's causal path over the whole packed
                   row instead of flex_attention's document mask. Tokens attend across document
                   boundaries, so the loss is wrong: a speed reference for the attention only.

Tokens/s counts every packed token (prompts included): they all go through forward and backward.
MFU = tokens/s * model FLOPs per token / the bf16 matmul rate measured here on an 8192^3 product,
the realistic ceiling rather than the datasheet's. Model FLOPs (flops.flops_per_token) are 6N
plus causal attention; attention depends on each document's length, so the total is summed per
rollout, not taken at a mean length. The head's FLOPs count 3 matmuls even for the reference
loss, which does 4 (it recomputes the logits): MFU is about useful work.
"""
import argparse
import datetime
import os
import random
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402

import model as model_mod  # noqa: E402
from flops import flops_per_token  # noqa: E402
import memory  # noqa: E402
import srpo  # noqa: E402

# Qwen2.5-1.5B's shape (its config.json), and a tiny one with the same structure for --cpu-smoke.
QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                 max_position_embeddings=32768)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, tie_word_embeddings=True, rope_theta=1e6,
            max_position_embeddings=2048)

# -----------------------------------------------------------------------------
# Inputs: a random-weight model and synthetic rollouts


def build_model(shape: dict, device) -> torch.nn.Module:
    """Random weights, fp32 masters, built directly on `device` (a 1.5B model inits in seconds on a
    GPU, minutes on CPU). std 0.02 as in GPT-2/Qwen init; norms stay at one, biases at zero."""
    torch.manual_seed(0)
    with torch.device(device):
        model = model_mod.Transformer(transformers.Qwen2Config(**shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
            elif name.endswith(".bias"):
                p.zero_()
    return model


def make_samples(n_tokens: int, vocab: int, prompt_len: int, resp_min: int, resp_max: int, G: int,
                 seed: int = 0) -> list[srpo.Sample]:
    """GRPO-shaped rollouts until at least n_tokens: groups of G responses sharing one prompt of
    ~prompt_len tokens, response lengths uniform in [resp_min, resp_max], advantages from random
    0/1 rewards normalised within each group (so some groups are all-zero, as in training), and
    logp_old = -U(0, 3) per response token."""
    rng = random.Random(seed)
    samples, total = [], 0
    while total < n_tokens:
        prompt = [rng.randrange(vocab) for _ in range(prompt_len + rng.randrange(-32, 33))]
        rewards = torch.tensor([[float(rng.random() < 0.5) for _ in range(G)]])     # (1, G)
        adv, _ = srpo.group_advantages(rewards, eps=1e-4)                           # (1, G)
        for g in range(G):
            n_resp = rng.randint(resp_min, resp_max)
            resp = [rng.randrange(vocab) for _ in range(n_resp)]
            logp_old = [-3.0 * rng.random() for _ in range(n_resp)]
            samples.append(srpo.Sample(prompt + resp, len(prompt), logp_old, float(adv[0, g])))
            total += len(prompt) + n_resp - 1   # the packed length: every token but the last
    return samples


def update_flops(samples: list[srpo.Sample], mcfg) -> float:
    """Model FLOPs of one update: each rollout is its own causal document of len(tokens) - 1."""
    return sum((len(s.tokens) - 1) * flops_per_token(mcfg, len(s.tokens) - 1) for s in samples)

# -----------------------------------------------------------------------------
# Timing


class Clock:
    """Wall time between marks: CUDA events on a GPU (read after one synchronize), perf_counter on
    CPU. Marks can be made from inside hooks without forcing a sync there."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return a.elapsed_time(b)
        return 1e3 * (b - a)


def matmul_rate(device, cuda: bool, n: int, iters: int = 10) -> float:
    """Measured bf16 matmul FLOP/s: median of `iters` n x n x n products into a fixed output."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    clock, times = Clock(cuda), []
    for i in range(iters + 2):     # the first two warm cuBLAS up (heuristics, clocks)
        t0 = clock.mark()
        torch.mm(a, b, out=out)
        t1 = clock.mark()
        if i >= 2:
            times.append(clock.ms(t0, t1))
    return 2 * n ** 3 / (statistics.median(times) * 1e-3)


def time_update(model, samples, cfg: srpo.Config, device, cuda: bool, warmup: int, iters: int) -> dict:
    """Median ms of policy_update, split at the optimizer step by hooks on the optimizer (no
    change to the loop): 'fwd+bwd' is everything before opt.step() (packing, copies, forward,
    backward, grad clipping), 'optimizer' is AdamW's step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0)
    prec = memory.decide_precision(torch.device(device).type, 1, False, cfg.dtype)
    clock = Clock(cuda)
    marks = {}
    opt.register_step_pre_hook(lambda *_: marks.__setitem__("pre", clock.mark()))
    opt.register_step_post_hook(lambda *_: marks.__setitem__("post", clock.mark()))

    def one():
        marks["start"] = clock.mark()
        srpo.policy_update(model, opt, samples, cfg, prec, device)
        marks["end"] = clock.mark()
        return {"total": clock.ms(marks["start"], marks["end"]), "fwd_bwd": clock.ms(marks["start"], marks["pre"]),
                "opt": clock.ms(marks["pre"], marks["post"])}

    t0 = time.perf_counter()
    one()                             # compiles flex_attention, allocates AdamW's state
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        one()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    runs = [one() for _ in range(iters)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["first_s"] = first_s
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    return out                        # AdamW's state goes with this frame (opt and the closure one)


def host_prep_ms(samples, cfg: srpo.Config, device) -> float:
    """Packing and building the micro-batch tensors on the host: part of the timed update, shown
    alone because it is Python list work that the GPU waits for."""
    t0 = time.perf_counter()
    mbs = [srpo.make_micro_batch(samples, g, device) for g in srpo.pack_micro_batches(samples, cfg.micro_tokens)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    del mbs
    return 1e3 * (time.perf_counter() - t0)

# -----------------------------------------------------------------------------
# Variants and what they actually ran


class HeadProbe:
    """Records the dtypes of the final hidden states and lm_head weight entering the loss (the
    first call per variant), by wrapping srpo's fused_grpo_loss. Under single-GPU autocast these
    tell whether the biggest matmul of the model (H x V, V = 151936) runs in bf16."""

    def __init__(self):
        self.inner = srpo.fused_grpo_loss
        self.seen = None

    def __call__(self, h, W, *args, **kwargs):
        if self.seen is None:
            self.seen = f"{_short(h.dtype)}/{_short(W.dtype)}"
        return self.inner(h, W, *args, **kwargs)


class AttnProbe:
    """Records the dtypes of q, k, v handed to flex_attention (the first call per variant), by
    wrapping model.py's accessor of the compiled function. Under autocast the rotary embedding
    runs in the residual stream's dtype, so q and k may arrive in fp32 next to a bf16 v; what the
    kernel then computes in depends on the torch version (cast by autocast, or fp32 kernels)."""

    def __init__(self):
        self.inner = model_mod._flex_attention
        self.seen = None

    def __call__(self):
        fn = self.inner()

        def probed(q, k, v, **kwargs):
            if self.seen is None:
                self.seen = "/".join(_short(t.dtype) for t in (q, k, v))
            return fn(q, k, v, **kwargs)
        return probed


def _short(dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def attention_path(cuda: bool, sdpa_causal: bool) -> str:
    if sdpa_causal:
        return "SDPA causal (no doc mask)"
    return {"flash": "flash-attn varlen", "flex": "flex_attention + doc mask",
            "sdpa": "SDPA + dense doc mask"}[model_mod._packed_attention(cuda, torch.bfloat16 if cuda else torch.float32)]


def use_sdpa_causal(model, on: bool):
    """Route packed attention through SDPA's is_causal path (mask None) for this model instance:
    the positions still restart per document, only the document mask is gone."""
    if not on:
        model.__dict__.pop("_attention_inputs", None)
        return
    original = type(model)._attention_inputs.__get__(model)

    def causal_only(*args, **kwargs):
        a = original(*args, **kwargs)
        a.block_mask, a.mask, a.cu_seqlens = None, None, None   # cu_seqlens None: not flash-attn's varlen either
        return a
    model._attention_inputs = causal_only

# -----------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: runs every code path quickly")
    p.add_argument("--micro-tokens", default="16384,8192",
                   help="comma-separated micro-batch token budgets; each gets a row per variant "
                        "(8192 is there in case 16384 does not fit next to fp32 AdamW state)")
    p.add_argument("--micro-batches", type=int, default=4, help="rollout tokens = this x the largest budget")
    p.add_argument("--prompt-len", type=int, default=256, help="mean prompt tokens (+-32)")
    p.add_argument("--resp-min", type=int, default=200, help="shortest response")
    p.add_argument("--resp-max", type=int, default=1000, help="longest response")
    p.add_argument("--G", type=int, default=8, help="responses per prompt")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (the first compiles)")
    p.add_argument("--iters", type=int, default=5, help="timed calls (median reported)")
    p.add_argument("--variants", default="kernels,ckpt,reference,sdpa",
                   help="comma-separated subset of: kernels, ckpt (kernels + activation checkpointing), reference, sdpa")
    args = p.parse_args()

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        sys.exit("no CUDA GPU: run with --cpu-smoke to check the code paths on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    if args.cpu_smoke:
        # Tiny everything; the CPU path uses SDPA with a dense mask and the torch reference loss.
        shape, budgets, mm_n = TINY, [256, 128], 256
        args.prompt_len, args.resp_min, args.resp_max, args.G = 40, 20, 80, 4
        args.warmup, args.iters = 1, 1
    else:
        shape, budgets, mm_n = QWEN_1_5B, [int(x) for x in args.micro_tokens.split(",")], 8192
    variants = [v for v in args.variants.split(",") if v]
    if bad := set(variants) - {"kernels", "ckpt", "reference", "sdpa"}:
        sys.exit(f"unknown variants {sorted(bad)}: choose from kernels, ckpt, reference, sdpa")

    rate = matmul_rate(device, cuda, mm_n)
    model = build_model(shape, device)
    mcfg = model.config
    samples = make_samples(args.micro_batches * max(budgets), mcfg.vocab_size, args.prompt_len,
                           args.resp_min, args.resp_max, args.G)
    n_tok = sum(len(s.tokens) - 1 for s in samples)
    n_resp = sum(len(s.tokens) - s.n_prompt for s in samples)
    flops = update_flops(samples, mcfg)
    n_params = model_mod.num_params(model)

    import triton
    dev_name = torch.cuda.get_device_name() if cuda else "CPU (smoke: numbers mean nothing)"
    print(f"# Policy update: {'Qwen2.5-1.5B shape' if not args.cpu_smoke else 'tiny model'}, "
          f"random weights, fp32 masters{', bf16 autocast' if cuda else ''}, AdamW\n")
    print(f"{datetime.date.today()} | {dev_name} | torch {torch.__version__} | triton {triton.__version__} | "
          f"transformers {transformers.__version__} | flash-attn {'yes' if model_mod.flash_attn_varlen_func else 'no'}\n")
    print(f"- model: {n_params / 1e6:,.1f} M parameters ({mcfg.n_layers} layers, H {mcfg.hidden_size}, "
          f"V {mcfg.vocab_size}, tied embeddings)")
    print(f"- rollouts: {len(samples)} samples in groups of {args.G}, prompts ~{args.prompt_len} tokens, "
          f"responses {args.resp_min}-{args.resp_max}; {n_tok} packed tokens ({n_resp} response tokens) per update")
    print(f"- model FLOPs per update: {flops / 1e12:.4g} TFLOP ({flops / n_tok / 1e9:.4g} GFLOP/token, "
          f"6N + causal attention per document)")
    print(f"- measured bf16 matmul rate ({mm_n}^3): {rate / 1e12:.4g} TFLOP/s\n")
    print("| micro tokens | variant | attention | q/k/v into attention | h/W into loss | tokens/s | MFU | "
          "update ms | fwd+bwd ms | optimizer ms | host prep ms | peak GiB | first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    sys.stdout.flush()

    for budget in budgets:
        for variant in variants:
            cfg = srpo.Config(micro_tokens=budget, reference_loss=variant == "reference", lr=1e-6, grad_clip=1.0)
            n_micro = len(srpo.pack_micro_batches(samples, budget))
            use_sdpa_causal(model, variant == "sdpa")
            model.grad_ckpt = variant == "ckpt"  # recompute each block in backward: memory for FLOPs
            probe = srpo.fused_grpo_loss = HeadProbe()
            attn = model_mod._flex_attention = AttnProbe()
            name = {"kernels": "srpo kernels", "ckpt": "kernels + act. ckpt", "reference": "reference loss",
                    "sdpa": "srpo kernels"}[variant]
            cells = f"| {budget} ({n_micro} mb) | {name} | {attention_path(cuda, variant == 'sdpa')} |"
            # q/k/v dtypes are known only for flex_attention; SDPA casts its inputs under autocast.
            qkv = lambda: attn.seen or ("bf16 (SDPA autocast)" if cuda else "fp32")
            try:
                prep = host_prep_ms(samples, cfg, device)
                r = time_update(model, samples, cfg, device, cuda, args.warmup, args.iters)
                tok_s = n_tok / (r["total"] * 1e-3)
                mfu = flops / (r["total"] * 1e-3) / rate
                peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
                print(f"{cells} {qkv()} | {probe.seen} | {tok_s:,.0f} | {100 * mfu:.1f}% | {r['total']:.0f} | "
                      f"{r['fwd_bwd']:.0f} | {r['opt']:.0f} | {prep:.0f} | {peak} | {r['first_s']:.1f} |")
            except torch.cuda.OutOfMemoryError:
                # Say so in the table and carry on with the next row: the smaller budget may fit.
                peak = torch.cuda.max_memory_allocated() / 2 ** 30
                print(f"{cells} {qkv()} | {probe.seen or '-'} | OOM | - | - | - | - | - | {peak:.1f} (at failure) | - |")
            except Exception as e:
                # A broken path (e.g. flex_attention failing to compile) must not hide the other
                # rows: the row names the error, the traceback goes to stderr.
                print(f"{cells} {qkv()} | {probe.seen or '-'} | FAILED: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else ''} | - | - | - | - | - | - | - |")
                traceback.print_exc(file=sys.stderr)
            finally:
                srpo.fused_grpo_loss, model_mod._flex_attention = probe.inner, attn.inner
                model.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
            sys.stdout.flush()
    use_sdpa_causal(model, False)

    print("\nupdate ms = one policy_update call, median of", args.iters, "after", args.warmup,
          "warm-up calls; fwd+bwd = up to opt.step() (includes packing, copies, grad clipping); "
          "host prep = packing + building micro-batch tensors alone; peak = max allocated during the "
          "timed calls, weights and AdamW state included. The sdpa row attends across documents: speed only.")


if __name__ == "__main__":
    main()
