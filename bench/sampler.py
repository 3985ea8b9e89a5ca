"""
Throughput of rollout.generate() against transformers' generate(), side by side, on random weights.

    python bench/sampler.py                 # GPU: SmolLM2-135M and Qwen2.5-1.5B shapes, B = 64 and 256
    python bench/sampler.py --cpu-smoke     # tiny shapes on the CPU: runs every code path but the GPU ones

Both samplers get the same model and the same prompts (128 random tokens), sample at temperature 1
with no top-k/top-p (the RL setting), and produce exactly 256 new tokens (EOS ignored). Columns:
  tok/s        generated tokens per second, prefill included, warm (compile and graph capture excluded,
               and reported separately as "warmup")
  x generate   our tok/s over transformers' (bf16, its default dynamic KV cache)
  floor tok/s  the memory-bandwidth floor: every decode step reads all weights plus the KV cache
               of every sequence once (context averaged over the steps), at the copy bandwidth
               measured here; % floor = tok/s / floor tok/s
Targets (issue 3): >= 10x generate() at B=256 on both shapes, >= 50% of the floor on Qwen2.5-1.5B.
"""
import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Transformer, num_params  # noqa: E402
from weights import load_hf_state_dict  # noqa: E402
from rollout import KVCache, generate  # noqa: E402

SHAPES = {  # name: (architecture, transformers config fields)
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                   tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                                   max_position_embeddings=8192)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                   tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                   max_position_embeddings=32768)),
}
TINY = {  # --cpu-smoke: same families, toy sizes
    "tiny-llama": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                                 tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=256)),
    "tiny-qwen2": ("qwen2", dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                                 num_key_value_heads=2, intermediate_size=160, vocab_size=700,
                                 tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=256)),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes):
    """Bytes per second moved by a large device-to-device copy (read + write both counted)."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t)


def build(arch, fields, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    with torch.device(device):
        hf = model_cls(cfg_cls(**fields)).to(dtype).eval()
        ours = Transformer(hf.config)
    load_hf_state_dict(ours, hf.state_dict())
    hf.generation_config.eos_token_id = None       # 256 new tokens, always
    return hf, ours.to(dtype).eval()


def time_ours(ours, prompts, new, B, device, compile, flash):
    cache = KVCache.for_model(ours, max_len=len(prompts[0]) + new, max_slots=B, compile=compile)
    cache.use_flash = cache.use_flash and flash
    assert cache.n_slots >= B, f"the memory budget gives only {cache.n_slots} slots for batch {B}"
    sync(device)
    t = time.perf_counter()
    generate(ours, prompts, max_new_tokens=new, eos_ids=(), seed=0, cache=cache)  # compiles, records graphs
    sync(device)
    warmup = time.perf_counter() - t
    t = time.perf_counter()
    out = generate(ours, prompts, max_new_tokens=new, eos_ids=(), seed=1, cache=cache)
    sync(device)
    dt = time.perf_counter() - t
    assert all(len(r.tokens) == new for r in out), "every rollout should have exactly `new` tokens"
    return len(prompts) * new / dt, warmup, cache


def time_hf(hf, prompts, new, device):
    ids = torch.tensor(prompts, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
              eos_token_id=None, pad_token_id=0)
    hf.generate(ids[:, :16], max_new_tokens=4, **{**kw, "attention_mask": torch.ones_like(ids[:, :16])})
    sync(device)
    t = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
    sync(device)
    dt = time.perf_counter() - t
    assert out.shape == (len(prompts), ids.shape[1] + new), f"generate() returned {tuple(out.shape)}"
    return len(prompts) * new / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, fp32, compile on")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes (default 64,256)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 256)")
    ap.add_argument("--no-compile", action="store_true", help="decode step uncompiled (CUDA graphs still on)")
    ap.add_argument("--no-flash", action="store_true", help="torch attention even if flash-attn is installed")
    ap.add_argument("--skip-hf", action="store_true", help="do not run transformers' generate()")
    args = ap.parse_args()

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke for the CPU check")
    dtype = torch.float32 if smoke else torch.bfloat16
    shapes = TINY if smoke else SHAPES
    if args.shapes:
        shapes = {k: shapes[k] for k in args.shapes.split(",")}
    batches = [int(b) for b in (args.batch or ("4,8" if smoke else "64,256")).split(",")]
    P = args.prompt_len or (16 if smoke else 128)
    N = args.new_tokens or (8 if smoke else 256)
    compile = not args.no_compile  # on the CPU smoke too, so the compiled step is exercised

    import transformers
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    bw = copy_bandwidth(device, (64 if smoke else 1024) << 20)
    from rollout import flash_attn_with_kvcache
    flash = flash_attn_with_kvcache is not None and not args.no_flash and device.type == "cuda"
    print(f"# {datetime.date.today()} | {name} | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | copy bandwidth {bw / 1e9:.0f} GB/s | prompt {P}, new {N}, T=1 | "
          f"decode attention: {'flash-attn' if flash else 'torch SDPA'} | compile: {compile}")
    print(f"{'shape':<14} {'B':>4} {'ours tok/s':>11} {'generate':>10} {'x gen':>6} "
          f"{'floor tok/s':>12} {'% floor':>8} {'warmup s':>9} {'graphs':>6}")
    for shape, (arch, fields) in shapes.items():
        hf, ours = build(arch, fields, device, dtype)
        cfg = ours.config
        weight_bytes = num_params(ours) * torch.finfo(dtype).bits // 8   # tied embeddings counted once
        kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
        for B in batches:
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(0, cfg.vocab_size, (B, P), generator=g).tolist()
            ours_tps, warmup, cache = time_ours(ours, prompts, N, B, device, compile, not args.no_flash)
            hf_tps = float("nan") if args.skip_hf else time_hf(hf, prompts, N, device)
            step_bytes = weight_bytes + B * kv_per_token * (P + N / 2)   # mean context over the steps
            floor = B / (step_bytes / bw)
            print(f"{shape:<14} {B:>4} {ours_tps:>11,.0f} {hf_tps:>10,.0f} {ours_tps / hf_tps:>6.1f} "
                  f"{floor:>12,.0f} {100 * ours_tps / floor:>7.1f}% {warmup:>9.1f} {len(cache.graphs):>6}")
            del cache
        if smoke:
            # The compiled step must give what the eager one gives (greedy, same prompts).
            prompts = torch.randint(0, cfg.vocab_size, (3, P)).tolist()
            kw = dict(max_new_tokens=N, temperature=0.0, eos_ids=())
            a = generate(ours, prompts, cache=KVCache.for_model(ours, P + N, max_slots=3, compile=True), **kw)
            b = generate(ours, prompts, cache=KVCache.for_model(ours, P + N, max_slots=3, compile=False), **kw)
            assert [r.tokens for r in a] == [r.tokens for r in b], "compiled and eager decode steps disagree"
            print(f"{shape}: compiled step == eager step (greedy, {N} tokens x 3)")
        del hf, ours
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
