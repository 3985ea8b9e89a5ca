"""GPU paths that work the first time (issue 11), proven on a CPU.

What a GPU run decides or compiles, checked here without one: the compute dtype (and that
flash-attn never gets fp32), the decode step as one graph with flash-attn's kernel in it and a
bounded number of compiled variants, no (T, T) mask where the kernel does not read one, the memory
plan against measured peaks and the launch presets, the Triton kernels compiled ahead of time for
sm_80 and sm_90, and the preflight's CPU mode.

Two parts run in a subprocess of this file (`python tests/test_gpu_ready.py measure|compile ...`):
peak memory needs a fresh process, and the kernels must be imported without the Triton interpreter.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model as model_mod  # noqa: E402
import rollout  # noqa: E402
import checkpoint  # noqa: E402
import memory  # noqa: E402
import datafile  # noqa: E402
import srpo  # noqa: E402
from model import Transformer, num_params  # noqa: E402
from rollout import KVCache, decode_core, generate  # noqa: E402

GiB = 2**30
# Qwen2.5's shapes (their config.json files), for the launch presets and the kernels.
QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True)
QWEN_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)


def qwen(shape: dict, device="cpu", **over) -> Transformer:
    from transformers import Qwen2Config
    torch.manual_seed(0)
    with torch.device(device):
        return Transformer(Qwen2Config(**{**shape, **over}, max_position_embeddings=1 << 16))


def tiny(seed=0, **over) -> Transformer:
    """A random 2-layer Qwen2 with grouped-query attention and peaked next-token distributions."""
    torch.manual_seed(seed)
    m = qwen(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=97, tie_word_embeddings=True), **over).eval()
    with torch.no_grad():
        m.norm.weight.mul_(4.0)
    return m


PROMPTS = [[5, 9, 13], [2] * 11, [40], [7, 8, 9, 10, 11, 12, 13], [60, 1]]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


# -----------------------------------------------------------------------------
# 1. The compute dtype, decided once


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("dtype", ["auto", "bf16", "fp32"])
def test_precision_for_every_device_world_and_sharding(device_type, world, sharded, dtype):
    """Issue 11.1: who casts to bf16 depends on sharding alone (one GPU under torchrun trained in fp32)."""
    if world > 1 and not sharded:
        with pytest.raises(ValueError, match="shards"):
            memory.decide_precision(device_type, world, sharded, dtype)
        return
    p = memory.decide_precision(device_type, world, sharded, dtype)
    want = torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and device_type == "cuda") else torch.float32
    assert p.compute == want, f"{device_type} x{world} sharded={sharded} --dtype {dtype}: computes in {p.compute}"
    assert p.autocast == (want != torch.float32 and not sharded), \
        f"{device_type} x{world} sharded={sharded} --dtype {dtype}: autocast {p.autocast} (FSDP2 casts iff sharded)"
    assert p.tf32 == (device_type == "cuda"), "TF32 on GPUs only"
    assert p.device_type == device_type


def test_one_process_under_torchrun_updates_in_the_compute_dtype(tmp_path):
    """With a process group of one, the update and trainer_logp compute in the chosen dtype (issue 11.1).

    They ran fp32 there (no autocast), handing flash-attn fp32."""
    # A one-process gloo group and --dtype bf16 on the CPU stand in for torchrun on one GPU.
    import torch.distributed as dist
    m = tiny(seed=1).train()
    seen = []
    m.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, i, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    samples = [srpo.Sample([3, 5, 7, 9, 11, 13], 3, [-1.0, -2.0, -1.5], 1.0),
               srpo.Sample([3, 5, 8, 2, 4], 3, [-1.2, -0.7], -1.0)]
    # update_epochs 2 makes the trainer recompute logp_old: trainer_logp runs too, without grad
    cfg = srpo.Config(dtype="bf16", update_epochs=2, reference_loss=True, micro_tokens=64, lr=0.0)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        srpo.policy_update(m, torch.optim.SGD(m.parameters(), lr=0.0), samples, cfg,
                           memory.decide_precision("cpu", 1, False, cfg.dtype), "cpu", world=1)
    finally:
        dist.destroy_process_group()
    assert {g for g, _ in seen} == {True, False}, "expected both the update's forwards and trainer_logp's"
    assert {dt for _, dt in seen} == {torch.bfloat16}, \
        f"with a process group of one and --dtype bf16 the forwards ran in {sorted({str(d) for _, d in seen})}"


def test_flash_attn_is_never_chosen_for_fp32(monkeypatch):
    """An fp32 forward never goes to flash-attn: flex is picked, or a forced flash is an error (issue 11.1).

    flash-attn was picked whatever the dtype, and flash_attn_varlen_func rejects fp32."""
    monkeypatch.setattr(model_mod, "flash_attn_varlen_func", lambda *a, **k: None)  # "installed"
    pick = model_mod._packed_attention
    assert pick(True, torch.bfloat16) == "flash" and pick(True, torch.float16) == "flash"
    assert pick(True, torch.float32) == "flex", "an fp32 forward on a GPU was handed to flash-attn"
    assert pick(False, torch.bfloat16) == "sdpa"
    with pytest.raises(RuntimeError, match="fp16/bf16"):
        pick(True, torch.float32, "flash")


def test_forward_passes_autocast_dtype_to_the_kernel_choice(monkeypatch):
    """Issue 11.1: under autocast the weights are fp32 but attention runs bf16; the kernel choice must see bf16."""
    chosen = []
    monkeypatch.setattr(model_mod, "_packed_attention", lambda on_gpu, dtype, choice: chosen.append(dtype) or "sdpa")
    m = tiny()
    ids, cu = torch.randint(0, 97, (1, 10)), torch.tensor([0, 4, 10])
    with torch.no_grad():
        m(ids, cu_seqlens=cu)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(ids, cu_seqlens=cu)
    assert chosen == [torch.float32, torch.bfloat16], f"the kernel choice saw {chosen}"


# -----------------------------------------------------------------------------
# 2. flash-attn inside the compiled decode step


@torch._dynamo.disable  # like the real one: a call into a C++ extension that dynamo cannot trace
def stand_in_flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=False):
    """flash_attn_with_kvcache's contract in plain torch, same signature: q (B, 1, nh, D); k_cache,
    v_cache (B, S, nkv, D); k, v (B, 1, nkv, D) written at row b's position cache_seqlens[b], which
    then attends to positions 0..cache_seqlens[b]. Returns (B, 1, nh, D)."""
    B, S = k_cache.shape[:2]
    pos = cache_seqlens.long()
    rows = torch.arange(B)
    k_cache[rows, pos] = k[:, 0]
    v_cache[rows, pos] = v[:, 0]
    mask = (torch.arange(S)[None, :] <= pos[:, None])[:, None, None, :]        # (B, 1, 1, S)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                       attn_mask=mask, enable_gqa=True)
    return y.transpose(1, 2)


@pytest.mark.parametrize("use_flash", [False, True], ids=["sdpa", "flash"])
def test_decode_step_is_one_graph(use_flash, monkeypatch):
    """The decode step compiles to one graph without breaks, with flash-attn's kernel or SDPA (issue 11.2).

    A bare flash_attn_with_kvcache broke the compiled decode step's graph."""
    monkeypatch.setattr(rollout, "flash_attn_with_kvcache", stand_in_flash_attn_with_kvcache)
    m = tiny()
    c = KVCache.for_model(m, max_len=80, max_slots=4)
    B = 4
    c.pos[:B] = torch.tensor([3, 7, 0, 12])
    for mode in [(False, 0, False), (True, 0, False), (False, 5, True)]:
        e = torch._dynamo.explain(decode_core)(m, c.k, c.v, c.tok[:B], c.pos[:B], c.n_gen[:B], c.req[:B], c.seed,
                                               c.temperature, c.top_p, 64, *mode, use_flash)
        reasons = [str(b.reason)[:200] for b in e.break_reasons]
        assert (e.graph_count, e.graph_break_count) == (1, 0), \
            f"use_flash={use_flash} mode {mode}: {e.graph_count} graphs, {e.graph_break_count} breaks: {reasons}"


@pytest.mark.parametrize("backend", [False, "aot_eager"], ids=["eager", "compiled"])
def test_flash_decode_op_samples_what_sdpa_samples(backend, monkeypatch):
    """The registered flash op keeps flash-attn's semantics: eager or compiled, it samples as SDPA (issue 11.2)."""
    monkeypatch.setattr(rollout, "flash_attn_with_kvcache", stand_in_flash_attn_with_kvcache)
    m = tiny(seed=3)
    kw = dict(n=2, max_new_tokens=12, temperature=1.0, top_p=0.9, eos_ids=(3,), seed=5)
    ref = generate(m, PROMPTS, cache=KVCache.for_model(m, max_len=40, max_slots=4), **kw)
    cache = KVCache.for_model(m, max_len=40, max_slots=4, compile=backend)
    cache.use_flash = True
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compiled decode step failed")
        got = generate(m, PROMPTS, cache=cache, **kw)
    for r, (a, b) in enumerate(zip(got, ref)):
        assert a.tokens == b.tokens, f"request {r}: flash op {a.tokens} != SDPA {b.tokens}"
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4, f"request {r}: log-probs differ"


@pytest.mark.cxx
def test_compiled_flash_decode_writes_the_cache_in_place(monkeypatch):
    """Inductor hands the mutating flash op the cache tensors themselves, not a per-step copy (issue 11.2)."""
    from torch._inductor.utils import run_and_get_code
    monkeypatch.setattr(rollout, "flash_attn_with_kvcache", stand_in_flash_attn_with_kvcache)
    m = tiny()
    c = KVCache.for_model(m, max_len=80, max_slots=4)
    c.pos[:4] = torch.tensor([3, 7, 0, 12])
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(decode_core, dynamic=True), m, c.k, c.v, c.tok[:4], c.pos[:4],
                                   c.n_gen[:4], c.req[:4], c.seed, c.temperature, c.top_p, 64, False, 0, False, True)
    calls = re.findall(r"torch\.ops\.srpo\.flash_decode\.default\(([^,]+), ([^,]+), ([^,]+),", "\n".join(code))
    assert len(calls) == m.config.n_layers, f"expected one flash_decode per layer, found {len(calls)}"
    for _, kc, vc in calls:
        assert re.fullmatch(r"arg\d+_1", kc) and re.fullmatch(r"arg\d+_1", vc), \
            f"flash_decode got {kc}, {vc}: copies of the cache, not the cache (graph inputs argN_1)"
    assert c.k[0][0, :, 3].abs().sum() > 0, "the compiled step did not write the cache"


# -----------------------------------------------------------------------------
# 6. A bounded number of compiled decode-step variants, and a warning past it


def counting_backend(counts):
    def backend(gm, example_inputs):
        counts["graphs"] += 1

        def run(*args):
            counts["calls"] += 1
            return gm.forward(*args)
        return run
    return backend


SWEEP = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=5),
         dict(temperature=0.7, top_k=12), dict(temperature=0.7, top_k=1), dict(temperature=1.0, top_k=20, top_p=0.8),
         dict(temperature=0.0, top_k=5, top_p=0.5), dict(temperature=1.3, top_k=7)]


def test_decode_step_stays_compiled_across_a_settings_sweep(monkeypatch):
    """The decode step stays compiled over a sampling-settings sweep, and warns past DECODE_VARIANTS (issue 11.6).

    Past dynamo's recompile limit the decode step silently ran eagerly; it must stay compiled, or warn.
    Past the limit, the uncompiled fallback samples what the eager step samples."""
    torch._dynamo.reset()
    counts = {"graphs": 0, "calls": 0}
    backend = counting_backend(counts)
    runs = 0
    decode_steps = 0                            # rollout.run_step calls: one per decode step
    plain_run_step = rollout.run_step

    def counted_run_step(*args):
        nonlocal decode_steps
        decode_steps += 1
        return plain_run_step(*args)
    monkeypatch.setattr(rollout, "run_step", counted_run_step)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compiled decode step failed")
        for m in [tiny(seed=7)]:
            for prompts in (PROMPTS, PROMPTS[:1]):     # 15 requests, and 1 (a batch of one specialises)
                for kw in SWEEP:
                    cache = KVCache.for_model(m, max_len=40, max_slots=8, compile=backend)
                    before, steps_before = counts["calls"], decode_steps
                    generate(m, prompts, n=3 if len(prompts) > 1 else 1, max_new_tokens=8, seed=1, cache=cache, **kw)
                    steps = decode_steps - steps_before
                    assert counts["calls"] - before == steps > 0, \
                        f"{kw}, {len(prompts)} prompts: {counts['calls'] - before} of {steps} decode steps ran compiled"
                    runs += 1
    assert runs > torch._dynamo.config.recompile_limit, "the sweep must pass dynamo's default recompile limit"
    assert counts["graphs"] <= 10, f"{counts['graphs']} compiled variants: more than 5 modes x 2 batch kinds"

    # Past the limit: a warning that names it, and the same rollouts as the eager step.
    monkeypatch.setattr(rollout, "DECODE_VARIANTS", counts["graphs"])
    m = tiny(seed=9, intermediate_size=80)        # another shape: one variant more
    kw = dict(n=2, max_new_tokens=8, temperature=1.0, seed=4)
    with pytest.warns(UserWarning, match="DECODE_VARIANTS"):
        got = generate(m, PROMPTS, cache=KVCache.for_model(m, max_len=40, max_slots=8, compile=backend), **kw)
    ref = generate(m, PROMPTS, cache=KVCache.for_model(m, max_len=40, max_slots=8), **kw)
    assert [r.tokens for r in got] == [r.tokens for r in ref], "the uncompiled fallback sampled something else"


def test_equivalent_sampling_settings_share_a_mode():
    """Settings that sample alike share a compiled variant: five canonical modes, not one each (issue 11.6)."""
    modes = {(greedy, top_k > 0, top_p) for greedy, top_k, top_p, _ in
             (rollout.decode_mode(t, k, p, False) for t in (0.0, 0.7, 1.0) for k in (0, 1, 2, 5, 50) for p in (0.5, 1.0))}
    assert len(modes) == 5, f"{len(modes)} modes: {sorted(modes)}"
    assert rollout.decode_mode(0.7, 1, 0.5, False) == rollout.decode_mode(0.0, 0, 1.0, False) == (True, 0, False, False)


# -----------------------------------------------------------------------------
# 5. The dense (T, T) mask only where SDPA reads it


class ShapeLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every tensor an op makes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("impl", ["flash", "flex", "sdpa"])
def test_no_dense_mask_unless_sdpa_reads_it(impl, monkeypatch):
    """Issue 11.5: every forward built a (T, T) mask (and flex's create_block_mask another); only SDPA may."""
    monkeypatch.setattr(model_mod, "_packed_attention", lambda *a: impl)
    m = tiny()
    T = 640
    ids = torch.randint(0, 97, (1, T))
    cu = torch.tensor([0, 1, 200, 333, 640])
    log = ShapeLog()
    with log:
        a = m._attention_inputs(ids, None, cu, torch.bfloat16)
    if impl == "sdpa":
        assert a.mask is not None and a.mask.shape[-2:] == (T, T), "SDPA needs its dense document mask"
        return
    assert a.mask is None, f"{impl}: AttnInputs carries a dense mask {tuple(a.mask.shape)}"
    assert log.largest < T * T, f"{impl}: a tensor of {log.largest} elements was built (T x T = {T * T})"
    assert (a.cu_seqlens is not None) == (impl == "flash") and (a.block_mask is not None) == (impl == "flex")


def test_document_block_mask_equals_create_block_mask():
    """Issue 11.5: the tile-by-tile block mask must equal the one torch derives from the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask
    for lengths in ([300], [128, 128, 44], [5, 250, 1, 300, 130], [128] * 4, [1] * 50 + [600], [64]):
        T = sum(lengths)
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        ref = create_block_mask(lambda b, h, q, k: (doc[q] == doc[k]) & (k <= q), None, None, T, T, device="cpu")
        got = model_mod.document_block_mask(doc)
        for f in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                  "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert torch.equal(getattr(ref, f), getattr(got, f)), f"documents {lengths}: {f} differs"
        assert ref.seq_lengths == got.seq_lengths


# -----------------------------------------------------------------------------
# 3. The memory plan: against measured peaks on a CPU, and the launch presets against 80 GB


def measure_peak(H, L, I, nh, nkv, V, T, ckpt, mode):
    """The peak memory of policy_update's micro-batches beyond the weights and their gradients,
    against the plan's activation estimate. Two micro-batches of T tokens, so the second runs with
    the gradients already there, as in training. Measured as the growth of this process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs just before) over its RSS then: the process's own
    memory, whatever else the machine runs. glibc's mmap threshold is pinned (by the caller's
    environment) so that a freed tensor leaves the RSS at once."""
    m = qwen(dict(hidden_size=H, num_hidden_layers=L, intermediate_size=I, num_attention_heads=nh,
                  num_key_value_heads=nkv, vocab_size=V, tie_word_embeddings=True))
    if mode == "bf16":
        m = m.to(torch.bfloat16)        # what FSDP2's policy computes in: bf16 weights, no autocast
    prec = memory.Precision("cpu", torch.float32 if mode == "fp32" else torch.bfloat16, mode == "autocast", False)
    cfg = srpo.Config(micro_tokens=T, reference_loss=True, grad_clip=0.0, grad_ckpt="on" if ckpt else "off")
    m.grad_ckpt = ckpt
    opt = torch.optim.SGD(m.parameters(), lr=0.0)

    def samples(n_tokens, n):
        g = torch.Generator().manual_seed(1)
        k = n_tokens // n
        return [srpo.Sample(torch.randint(0, V, (k + 1,), generator=g).tolist(), k // 4, [-1.0] * (k + 1 - k // 4),
                            1.0 if i % 2 else -1.0) for i in range(n)]

    def status(field):
        return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    srpo.policy_update(m, opt, samples(64, 8), cfg, prec, "cpu")   # one-time initialisation, small
    opt.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                    # VmHWM := VmRSS
    before = status("VmRSS")
    srpo.policy_update(m, opt, samples(2 * T, 8), cfg, prec, "cpu")
    peak = status("VmHWM") - before
    grads = sum(p.numel() * p.element_size() for p in m.parameters())
    plan = plan_memory(m, cfg, prec, 1, max_len=T // 4 + 1, capacity=None)
    return {"measured": peak - grads, "planned": plan.activations}


# (H, L, I, heads, kv heads, V, T, checkpointing, precision): the blocks dominate (fp32, then
# checkpointed, then in bf16 weights as under FSDP2), and the loss dominates (a larger vocabulary,
# under autocast as on one GPU)
MEASURED = [(256, 6, 704, 8, 2, 2048, 1024, False, "fp32"), (256, 6, 704, 8, 2, 2048, 1024, True, "fp32"),
            (256, 6, 704, 8, 2, 2048, 1024, False, "bf16"), (128, 2, 256, 4, 2, 16000, 1024, False, "autocast")]


def test_memory_plan_matches_measured_peaks():
    """The memory plan's activation estimate is within 25% of peaks measured on a CPU (issue 11.3).

    That estimate is what picks checkpointing and the micro-batch."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("measuring a peak needs Linux's /proc/self/clear_refs")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, __file__, "measure", json.dumps(MEASURED)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, f"measuring failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    for case, r in zip(MEASURED, json.loads(p.stdout.strip().splitlines()[-1])):
        ratio = r["planned"] / r["measured"]
        assert 0.75 <= ratio <= 1.25, \
            f"{case}: planned {r['planned'] / 2**20:.1f} MiB of activations, measured {r['measured'] / 2**20:.1f} MiB"


def plan_memory(m, cfg, prec, world, max_len, capacity):
    """memory.plan_memory for model m with the options of cfg, as srpo.main passes them."""
    return memory.plan_memory(m.config, num_params(m), prec, world, max_len, capacity, micro_tokens=cfg.micro_tokens,
                                grad_ckpt=cfg.grad_ckpt, gen_slots=cfg.gen_slots,
                                rollouts=-(-cfg.prompts_per_step // world) * cfg.G, kl_coef=cfg.kl_coef,
                                reference_loss=cfg.reference_loss)


def train_sh_args(what: str, model_path: str) -> list[str]:
    """The srpo.py options that `bash train.sh WHAT MODEL` passes, read from train.sh itself."""
    text = open(os.path.join(ROOT, "train.sh")).read().replace("\\\n", " ")
    branch = text.split(f'elif [ "$what" = "{what}" ]; then', 1)[1].split("\nelse", 1)[0]
    line = next(x for x in branch.splitlines() if "srpo.py" in x)
    words = shlex.split(line.replace('"$model"', model_path).replace('"$@"', ""))
    return words[words.index("srpo.py") + 1:]


@pytest.mark.parametrize("shape,size", [(QWEN_1_5B, "1.5B"), (QWEN_7B, "7B")])
def test_qwen_launch_fits_8x80gb(shape, size):
    """`train.sh qwen` plans to fit 8x80 GB for Qwen2.5-1.5B and 7B, checkpointing where needed (issue 11.3).

    It asked for 16k-token micro-batches without checkpointing: ~100 GiB for 7B."""
    cfg = srpo.parse_config(train_sh_args("qwen", "/models/qwen"))
    with torch.device("meta"):
        m = qwen(shape, device="meta")
    prec = memory.decide_precision("cuda", 8, sharded=True, dtype=cfg.dtype)
    usable = int(0.9 * 80e9)
    max_len = 1024 + cfg.max_new_tokens  # a generous one-shot prompt, plus a whole response
    plan = plan_memory(m, cfg, prec, 8, max_len=max_len, capacity=usable)
    assert plan.total <= usable, f"Qwen2.5-{size}, train.sh qwen: {plan}"
    assert plan.grad_ckpt and plan.micro_tokens == cfg.micro_tokens, \
        f"Qwen2.5-{size}: expected checkpointing at the asked budget: {plan}"
    if size == "7B":
        assert plan.act_plain > 80 * GiB, f"without checkpointing 16k tokens of 7B should not fit: {plan}"
        # Without checkpointing it fits only at a smaller micro-batch, with fewer KV-cache slots (the
        # cache takes what is left); with responses so long that no micro-batch fits, it stops, naming it.
        off = plan_memory(m, srpo.parse_config(train_sh_args("qwen", "/m") + ["--grad_ckpt", "off"]), prec, 8,
                          max_len=max_len, capacity=usable)
        assert off.micro_tokens < cfg.micro_tokens and off.kv_slots < plan.kv_slots, f"{off}\nvs\n{plan}"
        with pytest.raises(MemoryError, match="--grad_ckpt"):
            plan_memory(m, srpo.parse_config(train_sh_args("qwen", "/m") + ["--grad_ckpt", "off"]), prec, 8,
                        max_len=1024 + 16384, capacity=usable)
    # One 80 GB GPU with a 1.5B model: over the edge as asked; checkpointing brings it back.
    if size == "1.5B":
        one = memory.decide_precision("cuda", 1, sharded=False, dtype=cfg.dtype)
        plan1 = plan_memory(m, cfg, one, 1, max_len=max_len, capacity=usable)
        assert plan1.grad_ckpt and plan1.total <= usable, f"Qwen2.5-1.5B on one GPU: {plan1}"
        assert plan1.casts > 0 and plan1.sampler > 0, "one GPU: autocast's bf16 casts and the sampler's bf16 copy"


def test_qwen_kv_cache_takes_what_the_plan_leaves(monkeypatch, capsys):
    """train.sh qwen on 8 x 80 GB: the KV cache is sized once from the memory plan's leftover, with the
    allocator's cache emptied first, and the start-up plan says slots, rollouts and waves, and why
    not one wave (issue 21.2: --gen_mem 0.25 of mem_get_info gave ~50 slots and left ~18 GiB idle)."""
    cfg = srpo.parse_config(train_sh_args("qwen", "/models/qwen"))
    world, total = 8, 80 * 10**9
    usable = int(0.9 * total)                                     # as Run.prepare
    with torch.device("meta"):
        m = qwen(QWEN_7B, device="meta")
    prec = memory.decide_precision("cuda", world, sharded=True, dtype=cfg.dtype)
    max_len = 1024 + cfg.max_new_tokens                            # a generous one-shot prompt + a whole response
    plan = plan_memory(m, cfg, prec, world, max_len=max_len, capacity=usable)
    rollouts = cfg.prompts_per_step // world * cfg.G
    assert rollouts == 256, rollouts
    per_slot = rollout.slot_bytes(m.config, max_len, prec.compute)
    assert plan.total <= usable, f"the plan does not fit: {plan}"
    assert plan.kv_slots >= min(rollouts, cfg.gen_slots) or plan.total + per_slot > usable, \
        f"{plan.kv_slots} slots, yet the plan leaves room for more ({(usable - plan.total) / GiB:.1f} GiB idle): {plan}"
    # The GPU at the cache's making: weights, the sampler's copy and cached allocator blocks in use.
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: calls.append("mem_get_info") or
                        (total - plan.weights - plan.sampler - (0 if "empty_cache" in calls else 10 * GiB), total))
    budget, source = memory.kv_budget(plan, torch.device("cuda", 0), cfg.gen_mem)
    assert calls == ["empty_cache", "mem_get_info"], f"free memory measured before emptying the cache: {calls}"
    assert budget == plan.kv_cache, f"the cache's budget {budget} is not the plan's {plan.kv_cache} ({source})"
    sampler = m.to(torch.bfloat16)                                # the sampler's copy, on the meta device
    problems = [datafile.Problem("long", "math", "q", "1"), datafile.Problem("short", "math", "q", "1")]
    prompt_ids = {"long": [1] * 1024, "short": [1] * 100}
    cache = memory.make_cache(sampler, problems, prompt_ids, cfg.max_new_tokens, cfg.gen_slots, budget, source)
    assert cache.n_slots == plan.kv_slots, f"the cache has {cache.n_slots} slots, the plan {plan.kv_slots}"
    line = memory.generation_plan(cache, rollouts, cfg.gen_slots, source)
    waves = -(-rollouts // cache.n_slots)
    assert f"{cache.n_slots} KV-cache slots per rank" in line and f"{rollouts} rollouts per rank per step" in line \
        and f"{waves} wave" in line, line
    if waves > 1:
        assert "fewer slots than rollouts: what the memory plan leaves" in line and "GiB a slot" in line, line
    print(plan, line, sep="\n")


# -----------------------------------------------------------------------------
# The Triton kernels compile for sm_80 and sm_90, from the launchers' own specialisations


LIMITS = {80: 163 * 1024, 90: 227 * 1024}   # dynamic shared memory per block (A100, H100)


def compile_kernels():
    """Run every launcher as the trainer does (both dtypes, every loss variant, the default model's
    and Qwen2.5-1.5B's shapes), on meta tensors with the launches recorded instead of run; bind
    each recorded launch as Triton's JIT would on a GPU (its own binder and argument packing, for a
    GPUTarget), deduplicate, compile for sm_80 and sm_90, and read ptxas's report of each."""
    import contextlib
    import io
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    import srpo_kernels as kernels
    from srpo_kernels import fused, logprob
    grpo = sys.modules["srpo_kernels.grpo_loss"]
    launches = []

    def record(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append((kernel, args, kwargs))
        return run
    for mod in (fused, logprob, grpo):
        mod.use_triton = lambda t: True                      # meta tensors go down the Triton path
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                obj.run = record(obj)

    t0 = time.time()
    for H, V in ((576, 49152), (1536, 151936)):              # SmolLM2-135M, Qwen2.5-1.5B
        for dtype in (torch.bfloat16, torch.float32):
            with torch.device("meta"):
                N = 5
                h = torch.randn(N, H, dtype=dtype, requires_grad=True)
                W = torch.randn(V, H, dtype=dtype, requires_grad=True)
                tg, logp_old, adv, mask = torch.randint(0, V, (N,)), torch.randn(N), torch.randn(N), torch.ones(N)
                with torch.no_grad():
                    kernels.token_logprobs(h, W, tg, return_entropy=True)
                for kl in (0.0, 0.1):
                    loss, _ = kernels.fused_grpo_loss(h, W, tg, logp_old, adv, mask, kl_coef=kl,
                                                      logp_ref=logp_old)
                    loss.backward()
                    kernels.fused_grpo_loss(h.detach(), W.detach(), tg, logp_old, adv, mask, kl_coef=kl,
                                            logp_ref=logp_old)   # no gradient wanted
    for N in (5, 16):                                 # token counts: Triton specialises multiples of 16
        with torch.device("meta"):
            logp = torch.randn(N)
            for kl in (0.0, 0.1):                            # the loss kernel, as fused_grpo_loss launches it
                grpo._grpo_forward(logp, torch.randn(N), torch.randn(N), torch.ones(N),
                                   torch.randn(N) if kl else None, 0.2, 0.2, kl)

    triton.knobs.nvidia.dump_ptxas_log = True                # Triton prints ptxas -v's report
    seen, out = set(), []
    for arch in (80, 90):
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        for kernel, args, kwargs in launches:
            kwargs = dict(kwargs, debug=False)
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, spec, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
            name = kernel.fn.__name__
            key = (arch, name, repr(signature), repr(constexprs), repr(attrs), options.num_warps)
            if key in seen:
                continue
            seen.add(key)
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
            report = log.getvalue()
            regs = re.search(r"Used (\d+) registers", report)
            spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
            consts = {kernel.arg_names[p[0]]: v for p, v in constexprs.items()}
            out.append(dict(arch=arch, kernel=name, dtype=signature[kernel.arg_names[0]], constexprs=consts,
                            num_warps=options.num_warps, regs=int(regs.group(1)) if regs else None, spills=spills,
                            shared=compiled.metadata.shared, cubin=len(compiled.asm.get("cubin", b""))))
    print(json.dumps({"seconds": time.time() - t0, "launches": len(launches), "kernels": out}))


def test_triton_kernels_compile_for_sm80_and_sm90(tmp_path):
    """Every Triton specialisation the launchers produce compiles for sm_80 and sm_90, within the limits.

    Without register spills, within the shared memory of a block, and within the 64K registers of a block."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")  # nothing cached between runs
    p = subprocess.run([sys.executable, __file__, "compile"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, f"compiling failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    result = json.loads(p.stdout.strip().splitlines()[-1])
    ks = result["kernels"]
    names = {k["kernel"] for k in ks}
    assert names == {"_logprob_fwd_kernel", "_fused_row_kernel", "_grpo_fwd_kernel"}, \
        f"launchers produced {names}"
    assert {k["arch"] for k in ks} == {80, 90} and {k["dtype"] for k in ks if k["kernel"] == "_fused_row_kernel"} == \
        {"*bf16", "*fp32"}, "both targets, both dtypes"
    assert {(k["constexprs"]["HAS_KL"], k["constexprs"]["NEED_GRAD"])
            for k in ks if k["kernel"] == "_fused_row_kernel"} == {(a, b) for a in (0, 1) for b in (0, 1)}, \
        "every loss variant of the fused kernel"
    for k in ks:
        what = f"{k['kernel']} sm_{k['arch']} {k['dtype']} {k['constexprs']}"
        assert k["cubin"] > 0 and k["regs"] is not None, f"{what}: no cubin / no ptxas report"
        assert not any(k["spills"]), f"{what}: ptxas spilled registers ({k['spills']} bytes stored/loaded)"
        assert k["shared"] <= LIMITS[k["arch"]], f"{what}: {k['shared']} bytes of shared memory, limit {LIMITS[k['arch']]}"
        assert k["regs"] * 32 * k["num_warps"] <= 65536, f"{what}: {k['regs']} registers x {32 * k['num_warps']} threads"
    print(f"\n{len(ks)} kernel specialisations compiled in {result['seconds']:.0f} s")
    for k in ks:
        print(f"  sm_{k['arch']} {k['kernel']:22s} {k['dtype']:6s} warps {k['num_warps']} regs {k['regs']:3d} "
              f"spills {sum(k['spills'])} smem {k['shared']} {k['constexprs']}")


# -----------------------------------------------------------------------------
# The preflight, and fallbacks that announce themselves


def test_preflight_on_a_cpu_lists_its_checks_and_exits_cleanly():
    """bench/preflight.py on a machine without a GPU says what it would check and exits 0."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "preflight.py")], capture_output=True, text=True,
                       env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, f"preflight on a CPU failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    for path in ("decode step", "packed attention", "Triton loss", "FSDP2", "bf16 update"):
        assert path in p.stdout, f"the CPU listing does not mention {path!r}:\n{p.stdout}"
    assert "no GPU" in p.stdout


def test_preflight_lists_what_it_covers_and_its_two_rank_graphs_mode_runs():
    """The preflight lists its checks (--help) and its 2-rank decode-graphs mode runs under torchrun;
    on a CPU as a gloo dry run of the same code (issue 21.7, 21.8: graphs beside NCCL, the branch
    mask under checkpointing and FSDP2 were not covered)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "bench", "preflight.py")
    p = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for covered in ("branch mask", "activation checkpointing", "graphs + NCCL", "--graphs-worker"):
        assert covered in p.stdout, f"preflight --help does not say it covers {covered!r}:\n{p.stdout}"
    p = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=300)
    assert "CUDA graphs beside NCCL" in p.stdout and "--no_cuda_graphs" in p.stdout, \
        f"the listing does not name the 2-rank graphs check and its way out:\n{p.stdout}"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        script, "--graphs-worker"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, f"the 2-rank graphs mode failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "graphs + gloo: 2 ranks" in p.stdout and "dry run" in p.stdout, p.stdout


def test_cuda_graphs_option_reaches_the_cache(monkeypatch):
    """--no_cuda_graphs (the way out when capture fails beside NCCL, issue 21.8) reaches the KV cache."""
    cfg = srpo.parse_config(["--no_cuda_graphs"])
    assert cfg.cuda_graphs is False and srpo.parse_config([]).cuda_graphs is True
    asked = {}
    real = KVCache.for_model

    def for_model(model, **kw):
        asked.update(kw)
        return real(model, **kw)
    monkeypatch.setattr(KVCache, "for_model", staticmethod(for_model))
    m = tiny()
    problems = [datafile.Problem("a", "math", "q", "1")]
    for graphs, expect in ((False, False), (True, None)):
        cache = memory.make_cache(m, problems, {"a": [1, 2, 3]}, max_new_tokens=4, max_slots=2, budget=None,
                                    source="", cuda_graphs=graphs)
        assert asked["graphs"] is expect, f"cuda_graphs={graphs} gave KVCache graphs={asked['graphs']!r}"
    assert cache.use_graphs is False, "a CPU cache records no graphs"
    assert "cuda_graphs" in checkpoint.RESUMABLE, "a run stopped by a capture failure must resume with --no_cuda_graphs"


def test_broken_flash_attn_install_is_announced(tmp_path):
    """A flash-attn that is installed but does not import fell back to torch's kernels silently: it must warn."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('undefined symbol: _ZN3c10 (a stand-in)', name='flash_attn_2_cuda')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    p = subprocess.run([sys.executable, "-W", "always", "-c", "import model, rollout"], capture_output=True, text=True,
                       env=env, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr.count("UserWarning: flash-attn is installed but does not import") == 2 and "undefined symbol" in p.stderr, \
        p.stderr


if __name__ == "__main__":
    if sys.argv[1] == "measure":
        torch.set_num_threads(1)
        print(json.dumps([measure_peak(*case) for case in json.loads(sys.argv[2])]))
    elif sys.argv[1] == "compile":
        compile_kernels()
