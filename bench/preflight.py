"""GPU preflight: every GPU path of the trainer once, against its plain counterpart, in minutes.

    python bench/preflight.py          # on a GPU machine, before a long run: one table, < 3 minutes
    python bench/preflight.py          # on a CPU: lists what it would check, exits 0
    python bench/preflight.py --help   # this list

The GPU paths have been proven on a CPU only as far as a CPU can prove them (tests/test_gpu_ready.py:
the Triton kernels compile for sm_80/sm_90, the decode step traces as one graph, the memory plan
matches measured peaks). Whether they run, and agree, on *this* GPU with *this* torch, Triton,
CUDA and flash-attn is what this script finds out, on tiny random models:

  decode step      compiled + CUDA graphs vs the eager step (fp32: the same tokens)
  flash decode     flash-attn's KV-cache kernel vs SDPA in the decode step (bf16)
  packed attention flash-attn / flex_attention vs SDPA with a dense mask, forward and backward (bf16),
                   and flex's branch mask (the shared-prompt layout) under activation checkpointing
  Triton loss      the fused GRPO loss vs its torch reference, loss and both gradients (bf16, fp32)
  FSDP2 over NCCL  a 2-rank shared-prompt update (flex branch mask, activation checkpointing) vs one
                   process (when two GPUs are visible)
  graphs + NCCL    2 ranks capture and replay the decode step's CUDA graphs with NCCL initialised, vs
                   the eager step (when two GPUs are visible; also run alone: torchrun
                   --nproc_per_node 2 bench/preflight.py --graphs-worker, which on a CPU is a gloo dry run)
  bf16 update      policy_update in bf16 autocast vs fp32, on one GPU

Each row: path, OK / FAIL / SKIP, the error, and what a training run does when that path fails.
The exit status is 1 if any check failed.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model as model_mod  # noqa: E402
import rollout  # noqa: E402
import common  # noqa: E402
import memory  # noqa: E402
import srpo  # noqa: E402
from model import Transformer  # noqa: E402
from rollout import KVCache, generate  # noqa: E402

PROMPTS = [[5, 9, 13], [2] * 11, [40], [7, 8, 9, 10, 11, 12, 13], [60, 1]]


class Skip(Exception):
    """A check that does not apply here (flash-attn not installed, one GPU)."""


def tiny(device="cuda", dtype=torch.float32, seed=0, vocab=512, sharpen=8.0):
    """A random 2-layer Qwen2 with grouped-query attention and head_dim 64 (what flash-attn wants).
    sharpen scales the logits: peaked next-token distributions, so that sampling is not decided by
    rounding; 1 for the updates, whose ratios must not all clip."""
    from transformers import Qwen2Config
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=512, vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=4096)
    with torch.device(device):
        m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)      # GPT-style init: near-uniform logits (ratios near 1 at logp_old = log 1/V)
        m.norm.weight.mul_(sharpen)
    return m.to(dtype)


def same_rollouts(a, b, what, min_agree=1.0):
    agree = sum(x.tokens == y.tokens for x, y in zip(a, b)) / len(a)
    if agree < min_agree:
        bad = next(i for i, (x, y) in enumerate(zip(a, b)) if x.tokens != y.tokens)
        raise AssertionError(f"{what}: {agree:.0%} of rollouts agree; request {bad}: {a[bad].tokens[:8]} vs {b[bad].tokens[:8]}")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()

# -----------------------------------------------------------------------------
# The checks: each returns a short note or raises


def check_decode_step():
    m = tiny().eval()
    kw = dict(n=3, max_new_tokens=40, temperature=1.0, top_p=0.9, eos_ids=(3,), seed=5)
    fast = KVCache.for_model(m, max_len=60, max_slots=8)              # compiled + CUDA graphs, as in training
    slow = KVCache.for_model(m, max_len=60, max_slots=8, compile=False)
    slow.use_graphs = False
    same_rollouts(generate(m, PROMPTS, cache=fast, **kw), generate(m, PROMPTS, cache=slow, **kw),
                  "compiled + graphs vs eager")
    if not fast.graphs:
        raise AssertionError("no CUDA graph was recorded")
    return f"{len(fast.graphs)} graphs"


def check_flash_decode():
    if rollout.flash_attn_with_kvcache is None:
        raise Skip("flash-attn not installed")
    m = tiny(dtype=torch.bfloat16).eval()
    kw = dict(n=3, max_new_tokens=24, temperature=0.0, eos_ids=(), seed=5)
    flash = KVCache.for_model(m, max_len=60, max_slots=8)                # compiled + graphs, as in training
    sdpa = KVCache.for_model(m, max_len=60, max_slots=8, compile=False)  # the eager SDPA step
    sdpa.use_flash = sdpa.use_graphs = False
    if not flash.use_flash:
        raise AssertionError("flash-attn is installed but the cache does not use it")
    # bf16 greedy: the two kernels round differently, so allow a near-tie to flip one rollout
    same_rollouts(generate(m, PROMPTS, cache=flash, **kw), generate(m, PROMPTS, cache=sdpa, **kw),
                  "flash decode vs SDPA", min_agree=0.8)


def check_packed_attention():
    m = tiny()
    ids = torch.randint(0, 512, (1, 700), device="cuda")
    cu = torch.tensor([0, 1, 130, 131, 400, 700], device="cuda")
    # The shared-prompt layout: each document a prompt (branch 0) and responses 1, 2, ... after it
    branches = torch.tensor([0] * 101 + [1] * 20 + [2] * 9 + [0] * 151 + [1] * 119 + [0] * 50 + [1] * 150
                            + [2] * 100, device="cuda")                              # (700,)

    def run(impl, branches=None):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m(ids, cu_seqlens=cu, branches=branches, packed_attention=impl)
        logits.logsumexp(-1).mean().backward()
        return logits.detach(), [p.grad.clone() for p in m.parameters()]
    notes = []
    for layout, b in (("documents", None), ("branches", branches)):
        m.grad_ckpt = b is not None   # the shared-prompt update checkpointed, as in train.sh qwen
        ref, ref_g = run("sdpa", b)
        # flash-attn has no branch mask: with branches, 'flash' runs flex (the trainer's GPU path)
        for impl in ("flash", "flex") if b is None else ("flex",):
            if impl == "flash" and model_mod.flash_attn_varlen_func is None:
                notes.append("flash: not installed")
                continue
            out, g = run(impl, b)
            err = rel(out, ref)
            gerr = max(rel(x, y) for x, y in zip(g, ref_g))
            if err > 2e-2 or gerr > 5e-2:
                raise AssertionError(f"{impl} ({layout}): logits differ from SDPA by {err:.1e} "
                                     f"(relative), gradients by {gerr:.1e}")
            notes.append(f"{impl} {layout} ok")
    m.grad_ckpt = False
    # fp32 without autocast (--dtype fp32): 'auto' must pick a kernel that takes fp32
    m(ids, cu_seqlens=cu).sum().backward()
    return ", ".join(notes)


def check_triton_loss():
    from srpo_kernels import fused_grpo_loss, fused_grpo_loss_reference
    torch.manual_seed(0)
    N, H, V = 1000, 576, 49152                                          # the default model's head
    notes = []
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        h0 = torch.randn(N, H, device="cuda")
        W0 = torch.randn(V, H, device="cuda") / H ** 0.5 * 4
        tg = torch.randint(0, V, (N,), device="cuda")
        logp_old = -3 * torch.rand(N, device="cuda")
        adv, mask = torch.randn(N, device="cuda"), (torch.rand(N, device="cuda") > 0.2).float()
        out = []
        for fn, dt in ((fused_grpo_loss, dtype), (fused_grpo_loss_reference, torch.float32)):
            h, W = h0.to(dt).requires_grad_(), W0.to(dt).requires_grad_()
            loss, _ = fn(h, W, tg, logp_old, adv, mask, kl_coef=0.01, logp_ref=logp_old + 0.1)
            loss.backward()
            out.append((loss.detach(), h.grad, W.grad))
        errs = [rel(a, b) for a, b in zip(*out)]
        if max(errs) > tol:
            raise AssertionError(f"{dtype}: loss, dh, dW differ from the reference by {', '.join(f'{e:.1e}' for e in errs)}")
        notes.append(f"{str(dtype)[6:]} {max(errs):.0e}")
    return ", ".join(notes)


def fsdp_worker(out: str):
    """One update of a tiny model on this rank's share of a fixed batch; rank 0 saves loss and grads."""
    rank, world, device = common.setup_dist()
    m = tiny(device=device, sharpen=1.0)
    m.grad_ckpt = True   # as train.sh qwen: activation checkpointing around the branch-masked attention
    if world > 1:
        common.shard_model(m, param_dtype=torch.float32)   # fp32 compute: the comparison can be tight
    g = torch.Generator().manual_seed(0)
    # 2 prompts of 8 tokens x 4 responses each: the shared-prompt update packs a prompt once, its
    # responses as branches after it (flex_attention's branch mask on a GPU)
    prompts = [torch.randint(0, 512, (8,), generator=g).tolist() for _ in range(2)]
    samples = [srpo.Sample(prompts[i % 2] + torch.randint(0, 512, (12 + 7 * i,), generator=g).tolist(), 8,
                           (-6.2 + torch.rand(12 + 7 * i, generator=g)).tolist(), float(torch.randn((), generator=g)))
               for i in range(8)]
    cfg = srpo.Config(micro_tokens=60, lr=0.0, grad_clip=0.0, dtype="fp32", reference_loss=False)
    prec = memory.decide_precision(device.type, world, sharded=world > 1, dtype=cfg.dtype)
    stats = srpo.policy_update(m, torch.optim.SGD(m.parameters(), lr=0.0), samples[rank::world],
                               cfg, prec, device, world=world)
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    grads = [full(p.grad).float().cpu() for p in m.parameters()]
    if rank == 0:
        torch.save({"loss": stats.loss, "grads": grads}, out)
    common.close_dist()


def check_fsdp():
    if torch.cuda.device_count() < 2:
        raise Skip("one GPU visible")
    with tempfile.TemporaryDirectory() as d:
        one, two = os.path.join(d, "one.pt"), os.path.join(d, "two.pt")
        me = os.path.abspath(__file__)
        for cmd in ([sys.executable, me, "--fsdp-worker", one],
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", me,
                     "--fsdp-worker", two]):
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
            if p.returncode != 0:
                raise AssertionError(f"{' '.join(cmd[-4:])} failed: {p.stderr.strip().splitlines()[-1:]}")
        a, b = torch.load(one), torch.load(two)
    if abs(a["loss"] - b["loss"]) > 1e-4 * max(1.0, abs(a["loss"])):
        raise AssertionError(f"loss: one process {a['loss']}, two ranks {b['loss']}")
    gerr = max(rel(x, y) for x, y in zip(b["grads"], a["grads"]))
    if gerr > 1e-3:
        raise AssertionError(f"gradients differ by {gerr:.1e} (relative)")
    return f"grads {gerr:.0e}"


def graphs_worker():
    """Under torchrun: each rank, with its process group up (NCCL on GPUs), records and replays the
    decode step's CUDA graphs and must sample what the eager step samples; a collective before and
    after, so the group is live around the capture. Without GPUs it is a gloo dry run of the same
    code with eager steps (what tests/test_gpu_ready.py runs)."""
    rank, world, device = common.setup_dist()
    flag = torch.ones(1, device=device)
    torch.distributed.all_reduce(flag)                       # the communicator is up before capture
    m = tiny(device=device).eval()
    kw = dict(n=3, max_new_tokens=40, temperature=1.0, top_p=0.9, eos_ids=(3,), seed=5 + rank)
    fast = KVCache.for_model(m, max_len=60, max_slots=8)     # on a GPU: compiled + CUDA graphs, as trained
    slow = KVCache.for_model(m, max_len=60, max_slots=8, compile=False, graphs=False)
    same_rollouts(generate(m, PROMPTS, cache=fast, **kw), generate(m, PROMPTS, cache=slow, **kw),
                  f"rank {rank}: graphs beside a live process group vs eager")
    torch.distributed.all_reduce(flag)                       # and still works after it
    if device.type == "cuda" and not fast.graphs:
        raise AssertionError(f"rank {rank}: no CUDA graph was recorded")
    common.print0(f"graphs + {torch.distributed.get_backend()}: {world} ranks, {len(fast.graphs)} graphs "
                    f"recorded a rank, rollouts equal to the eager step's"
                    + ("" if device.type == "cuda" else " (dry run)"))
    common.close_dist()
    common.exit_torchrun()


def check_graphs_beside_nccl():
    if torch.cuda.device_count() < 2:
        raise Skip("one GPU visible")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), "--graphs-worker"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    if p.returncode != 0:
        raise AssertionError(f"2 ranks failed: {(p.stderr.strip().splitlines() or [''])[-1][:200]}")
    return p.stdout.strip().splitlines()[-1]


def check_bf16_update():
    # logp_old near log(1/V): ratios near 1, so most tokens carry a gradient
    samples = [srpo.Sample(list(range(3, 40 + 5 * i)), 10, [-6.2] * (27 + 5 * i), 1.0 if i % 2 else -1.0) for i in range(6)]
    cfg = srpo.Config(micro_tokens=200, lr=0.0, grad_clip=0.0)
    res = []
    for dtype in ("fp32", "bf16"):
        m = tiny(sharpen=1.0)
        prec = memory.decide_precision("cuda", 1, sharded=False, dtype=dtype)
        stats = srpo.policy_update(m, torch.optim.SGD(m.parameters(), lr=0.0), samples, cfg,
                                   prec, "cuda")
        res.append((stats.loss, torch.cat([p.grad.flatten().float() for p in m.parameters()])))
    (l32, g32), (l16, g16) = res
    cos = F.cosine_similarity(g32, g16, dim=0).item()
    if abs(l16 - l32) > 2e-2 * abs(l32) + 1e-4 or cos < 0.99:
        raise AssertionError(f"bf16 loss {l16:.5f} vs fp32 {l32:.5f}, gradient cosine {cos:.4f}")
    return f"cosine {cos:.4f}"


# (path, check, what a training run does when this path fails on its GPU)
CHECKS = [
    ("decode step (compiled + CUDA graphs)", check_decode_step,
     "compile error: warns once, decodes uncompiled (slow); graph capture error: --no_cuda_graphs"),
    ("flash decode (flash_attn_with_kvcache)", check_flash_decode,
     "none, the run stops: uninstall flash-attn to decode with SDPA"),
    ("packed attention (flash / flex vs SDPA)", check_packed_attention,
     "flex does not compile: the run stops at start-up; else none: the model's forward with "
     "packed_attention='sdpa' (a dense T x T mask)"),
    ("Triton loss (fused GRPO vs reference)", check_triton_loss,
     "none, the run stops: --reference_loss (plain torch, more memory)"),
    ("FSDP2 over NCCL (2 ranks vs 1)", check_fsdp, "none, the run stops: train on one GPU"),
    ("CUDA graphs beside NCCL (2 ranks)", check_graphs_beside_nccl,
     "the run stops at its first generation: rerun with --no_cuda_graphs (compiled steps, not recorded)"),
    ("bf16 update (autocast vs fp32)", check_bf16_update, "--dtype fp32 (TF32 matmuls, twice the activations)"),
]


def table(rows):
    w = max(len(r[0]) for r in rows)
    lines = [f"{'path':{w}} | result | error / note | fallback in a run", "-" * (w + 60)]
    lines += [f"{p:{w}} | {s:6} | {e} | {f}" for p, s, e, f in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fsdp-worker", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("--graphs-worker", action="store_true",
                    help="one rank of the 'graphs + NCCL' check: run under torchrun --nproc_per_node 2")
    args = ap.parse_args()
    if args.fsdp_worker:
        return fsdp_worker(args.fsdp_worker)
    if args.graphs_worker:
        return graphs_worker()
    if not torch.cuda.is_available():
        print("preflight: no GPU here, so nothing runs. On a GPU machine it would check:")
        print(table([(p, "skip", "no GPU", f) for p, _, f in CHECKS]))
        return 0
    print(f"preflight on {torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}, "
          f"flash-attn {'yes' if model_mod.flash_attn_varlen_func is not None else 'no'}; checks: "
          + ", ".join(p for p, _, _ in CHECKS), flush=True)
    rows, failed, t0 = [], False, time.time()
    for path, check, fallback in CHECKS:
        t = time.time()
        try:
            with warnings.catch_warnings():
                # A fallback the trainer would take quietly enough to miss is a failure here.
                warnings.filterwarnings("error", message="compiled decode step failed")
                note = check() or ""
            status = "OK"
        except Skip as e:
            status, note = "SKIP", str(e)
        except Exception as e:
            status, note, failed = "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}", True
            traceback.print_exc()
        rows.append((path, status, f"{note} ({time.time() - t:.0f} s)", fallback))
        print(f"{path}: {status} {note}", flush=True)
        torch.cuda.empty_cache()
    print(table(rows))
    print(f"preflight took {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
