"""
Rollouts for GRPO/SRPO: a KV-cached sampler with continuous batching, small enough to read in one go.

    cache = KVCache.for_model(model, max_len=max_prompt_len + max_new_tokens)   # once per run
    rollouts = generate(model, prompts, n=G, max_new_tokens=..., temperature=1.0, cache=cache)
    # -> [Rollout(prompt_idx, tokens, logprobs, finish)], ordered by (prompt_idx, sample index)

generate() runs in three phases, repeated until every request is done:
  1. admission: pending (prompt, sample) requests take free cache slots; the G samples of a prompt
     share one prefill, whose keys/values are copied into each of their slots;
  2. decoding: one step feeds every slot's last token and samples its next one, all on the device;
     on a GPU the step is compiled and replayed as a CUDA graph;
  3. reaping: at most `sync_every` steps apart the host looks at which slots stopped (EOS, stop
     string, max_new_tokens) and refills them, so long-tailed response lengths never idle the batch.
The number of slots comes from a memory budget, not a constant (KVCache.for_model).

A rollout's log-probs are those of the distribution each token was sampled from, after temperature,
top-k and top-p (0.0 for greedy). At temperature 1 without truncation they are the policy's own:
logp_old. The uniform number that picks token t of request r is a hash of (seed, r, t), so a seeded
run reproduces, and a request's tokens do not depend on its slot or on when it was admitted.

After a training step, call generate() with the same model: graphs recorded on its weights stay valid
while they are updated in place. An FSDP2-sharded model first needs whole weights:
common.inference_copy() builds (or refreshes) a plain bf16 copy by gathering one parameter at a time;
every rank must call it.
We prefer this to FSDPModule.unshard(): FSDP's hooks free unsharded parameters again on the next
forward, which would leave recorded graphs pointing at freed memory.
"""
import heapq
import importlib
import warnings
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from common import share_of_free_memory


def optional_flash_attn(name: str, fallback: str):
    """flash-attn's function `name`, or None where flash-attn (an optional, CUDA-only extra) is not
    installed. One installed but unusable (built for another torch or CUDA) warns, saying `fallback`."""
    try:
        return getattr(importlib.import_module("flash_attn"), name, None)
    except (ImportError, OSError) as e:
        if getattr(e, "name", None) != "flash_attn":
            warnings.warn(f"flash-attn is installed but does not import ({type(e).__name__}: {e}); "
                          f"{fallback}")
        return None


flash_attn_with_kvcache = optional_flash_attn("flash_attn_with_kvcache",
                                              "decoding falls back to torch's attention")

MAX_EOS_IDS = 8  # EOS ids live in a fixed-size device tensor, so recorded graphs can be reused
PREFILL_TOKENS = 16384  # prompt tokens (padded) per prefill forward
# The compiled decode step has a variant per sampling mode (five, see decode_mode), for a batch of
# exactly 1 (dynamo specialises it) and per model shape: 10 for one model, so 24 leave room for two.
# Past its own limit (8) dynamo runs the step eagerly, saying so only in a log; _eager_step warns.
DECODE_VARIANTS = 24


@dataclass
class Rollout:
    prompt_idx: int        # index into the `prompts` list given to generate()
    tokens: list           # response token ids (prompt not included)
    logprobs: list         # log-prob of each token under the sampling distribution
    finish: str            # "stop" (EOS id or stop string) or "length" (max_new_tokens)


class DecodeMode(NamedTuple):
    """The sampling settings that are code rather than data: the compiled step has a variant, and
    each shape a CUDA graph, per mode (temperature and top_p are device tensors read at run time,
    top_k >= 2 a dynamic int). Make one with decode_mode(), which puts it in canonical form."""
    greedy: bool      # argmax: temperature 0, or top-k 1
    top_k: int        # 0 = no top-k
    use_top_p: bool   # top_p < 1: keep the nucleus
    use_flash: bool   # flash-attn's KV-cache kernel, else SDPA


# -----------------------------------------------------------------------------
# The KV cache: preallocated buffers, the per-slot decode state, and the decode step's graphs


class KVCache:
    """What the sampler keeps from one generate() call to the next, in three parts:
      1. the KV buffers: keys and values of every slot's sequence, per layer;
      2. the per-slot decode state, on the device: each slot's last token, position and response
         so far, and the call's sampling settings, so a decode step never waits for the host;
      3. the decode step itself: its attention kernel, its compiled function and its recorded
         CUDA graphs. Set use_flash or use_graphs False to force torch's attention or eager steps.
    The host's own record of which slot holds which request lives in generate() (Slot)."""

    def __init__(self, cfg, n_slots: int, max_len: int, dtype=torch.bfloat16, device="cpu",
                 compile: bool | None = None, graphs: bool | None = None):
        dev = torch.device(device)
        N, S = n_slots, max_len
        self.config, self.n_slots, self.max_len, self.dtype, self.device = cfg, N, S, dtype, dev

        # ---- 1. KV buffers: (N, n_kv_heads, S, head_dim) per layer. One tensor per layer rather
        # than one (L, ...) block: each is then a plain input to the compiled step, written in
        # place (a view of a bigger input would be copied back whole).
        shape = (N, cfg.n_kv_heads, S, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(cfg.n_layers)]

        # ---- 2. Per-slot decode state, on the device: row s is slot s.
        zeros = lambda dt: torch.zeros(N, dtype=dt, device=dev)
        self.tok = zeros(torch.long)     # last sampled token: the next step's input
        self.pos = zeros(torch.long)     # where that token's k/v go = its position in the sequence
        self.n_gen = zeros(torch.long)   # response tokens so far
        self.req = zeros(torch.long)     # request id (prompt_idx * n + sample index): seeds the hash
        self.done = torch.ones(N, dtype=torch.bool, device=dev)  # finished or empty slot
        self.rows = torch.arange(N, device=dev)
        # Response tokens and log-probs, written at column n_gen. One spare column takes the
        # (ignored) writes of finished slots, which keep stepping until the host looks.
        self.out_tok = torch.zeros(N, S + 1, dtype=torch.long, device=dev)
        self.out_logp = torch.zeros(N, S + 1, dtype=torch.float32, device=dev)
        # Sampling knobs as device tensors, so one recorded graph serves any value.
        self.temperature = torch.ones((), device=dev)
        self.top_p = torch.ones((), device=dev)
        self.max_new = torch.zeros((), dtype=torch.long, device=dev)
        self.seed = torch.zeros((), dtype=torch.long, device=dev)
        self.eos = torch.full((MAX_EOS_IDS,), -1, dtype=torch.long, device=dev)

        # ---- 3. The decode step: kernel, compiled function, recorded CUDA graphs (see run_step).
        # flash-attn's decode kernel when it is installed and applies; set False to use the torch path.
        self.use_flash = (flash_attn_with_kvcache is not None and dev.type == "cuda"
                          and dtype in (torch.float16, torch.bfloat16))
        # True (inductor), False, or a torch.compile backend (tests count graphs with one)
        self.compile = dev.type == "cuda" if compile is None else compile
        self.core = None         # decode_core, compiled or not; made by the first generate()
        # CUDA graphs on a GPU unless graphs=False (--no_cuda_graphs: where capture fails beside NCCL)
        self.use_graphs = dev.type == "cuda" if graphs is None else graphs
        self.graphs = {}         # (batch, S_b, DecodeMode) -> torch.cuda.CUDAGraph
        self.weights_key = None  # which parameter tensors the graphs were recorded with
        # Prompts admitted together that start alike (RL: the same chat template and instructions)
        # prefill their shared start once (prefill's `shared`); set False to prefill each whole.
        self.share_prefix = True
        if self.use_graphs:
            self.pool = torch.cuda.graph_pool_handle()  # graphs share memory: they never overlap
            self.stream = torch.cuda.Stream(device=dev)

    @staticmethod
    def for_model(model, max_len: int, max_slots: int = 256, mem_fraction: float = 0.5,
                  mem_bytes: int | None = None, dtype=None, device=None, compile=None,
                  graphs=None) -> "KVCache":
        """As many slots (up to max_slots) as fit in mem_bytes, by default mem_fraction of the memory
        free now (common.free_memory), on a CPU too: max_slots long slots can exceed the RAM. Each slot
        costs slot_bytes(): keys/values for max_len positions plus the sampler's work buffers."""
        if max_slots < 1:
            raise ValueError(f"max_slots={max_slots}: the cache needs at least one slot")
        p = next(model.parameters())
        dtype, device = dtype or p.dtype, torch.device(device or p.device)
        if mem_bytes is None:
            mem_bytes = share_of_free_memory(device, mem_fraction)
        per_slot = slot_bytes(model.config, max_len, dtype)
        n = max_slots if mem_bytes is None else min(max_slots, mem_bytes // per_slot)
        if n < 1:
            raise MemoryError(f"the KV cache budget ({mem_bytes / 2**20:.1f} MiB) does not fit one slot "
                              f"of {per_slot / 2**20:.1f} MiB (max_len {max_len}); lower max_len or raise it")
        return KVCache(model.config, n, max_len, dtype, device, compile, graphs)


def slot_bytes(cfg, max_len: int, dtype) -> int:
    """Memory of one cache slot: its keys/values for max_len positions, the sampler's (vocab,)-sized
    fp32 work buffers, and its row of out_tok/out_logp. Linear in max_len."""
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * max_len * torch.finfo(dtype).bits // 8
    sampler = 6 * 4 * cfg.vocab_size            # logits, probs, cdf, sorted values + int64 ids
    return kv + sampler + 12 * (max_len + 1)    # + out_tok, out_logp


# -----------------------------------------------------------------------------
# The model against the cache: model.py's forward with our attention (attend=)


def prefill(model, cache: KVCache, prompts: list, dst_slots: list, src: list, shared: int = 0):
    """Run the prompts once; write prompt src[j]'s keys/values into cache slot dst_slots[j] (a prompt
    appears in several slots when several of its samples were admitted together). Returns the
    next-token logits after each prompt, (P, V) fp32. shared > 0: every prompt starts with the same
    `shared` tokens (the chat template and instructions, in RL), computed once, the rest of each
    prompt attending to them; shorter than every prompt."""
    dev = cache.device
    dst = torch.tensor(dst_slots, device=dev)
    src = torch.tensor(src, device=dev)
    head = []                            # per layer: the shared prefix's (k, v), (1, nkv, shared, D)
    if shared:
        def attend_prefix(i, q, k, v):
            cache.k[i][dst, :, :shared] = k.to(cache.dtype)              # (1, ...) -> every slot
            cache.v[i][dst, :, :shared] = v.to(cache.dtype)
            head.append((k, v))
            gqa = q.shape[1] != k.shape[1]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        idx = torch.tensor(prompts[0][:shared], device=dev)[None]
        model(idx, attend=attend_prefix, positions=torch.arange(shared, device=dev)[None], return_hidden=True)
        prompts = [p[shared:] for p in prompts]
    P, T = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(P, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, :len(p)] = torch.tensor(p)        # right padding: real tokens sit at 0..len-1
    idx = idx.to(dev)
    positions = shared + torch.arange(T, device=dev).expand(P, T)        # (P, T)
    # after a shared prefix: all of it, then causal within the prompt's own tokens
    mask = torch.ones(T, shared + T, dtype=torch.bool, device=dev).tril(shared) if shared else None

    def attend(i, q, k, v):
        # Copy this prompt's k/v into each of its slots. Padding positions get junk k/v; decoding
        # overwrites position len first, and a query never sees positions beyond its own.
        cache.k[i][dst, :, shared:shared + T] = k[src].to(cache.dtype)   # (n_dst, nkv, T, D)
        cache.v[i][dst, :, shared:shared + T] = v[src].to(cache.dtype)
        gqa = q.shape[1] != k.shape[1]
        if not shared:
            # Plain causal attention within the prompt: no mask tensor, so torch can pick its flash
            # kernel, which does grouped-query attention natively.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        hk, hv = head[i]
        k = torch.cat([hk.expand(P, -1, -1, -1), k], dim=2)              # (P, nkv, shared + T, D)
        v = torch.cat([hv.expand(P, -1, -1, -1), v], dim=2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    h = model(idx, attend=attend, positions=positions, return_hidden=True)  # (P, T, H)
    last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
    h = h[torch.arange(P, device=dev), last]                             # (P, H): last real token
    # Only the last position's logits: the (P, T, V) tensor would be huge for a 150k vocabulary.
    return F.linear(h, model.lm_head_weight).float()                     # (P, V)


def shared_prefix(prompts: list, least: int = 32) -> int:
    """How many leading tokens all the prompts share, if at least `least` (else 0), leaving each
    prompt at least one token of its own."""
    if len(prompts) < 2:
        return 0
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        m = 0
        while m < n and p[m] == first[m]:
            m += 1
        n = m
    return n if n >= least else 0


@torch.library.custom_op("srpo::flash_decode", mutates_args=("k_cache", "v_cache"))
def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """flash-attn's KV-cache kernel for the first B = q.shape[0] cache rows, as a registered torch
    op. flash_attn_with_kvcache itself is a Python call into a C++ extension that dynamo cannot trace:
    inside the compiled step it would break the graph in the middle of the layer loop, and dynamo
    then gives up on the whole step. As an op it is one opaque node, and declaring the cache writes
    (mutates_args) lets torch.compile keep them in place.
    q (B, nh, 1, D); k_cache, v_cache the whole (N, nkv, S, D) layer cache; k, v (B, nkv, 1, D);
    pos (B,) int32. Writes k, v at column pos of each row, attends to columns 0..pos, returns
    y (B, nh, 1, D)."""
    B = q.shape[0]
    y = flash_attn_with_kvcache(q.transpose(1, 2), k_cache[:B].transpose(1, 2), v_cache[:B].transpose(1, 2),
                                k=k.transpose(1, 2), v=v.transpose(1, 2), cache_seqlens=pos, causal=True)
    return y.transpose(1, 2).contiguous()                                # (B, nh, 1, D)


@flash_decode.register_fake
def _(q, k_cache, v_cache, k, v, pos):
    # What the compiler needs to know without running it: the output's shape, dtype and layout.
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def decode_logits(model, ks: list, vs: list, tok, pos, attn_len: int, use_flash: bool):
    """The model half of a decode step, for the first B slots: feed tok (B,) at pos (B,), write its
    k/v into the layer caches ks, vs at column pos, attend to columns 0..pos of its row.
    Returns the next-token logits (B, V) fp32. attn_len: cache columns the SDPA path reads (> pos)."""
    B = tok.shape[0]
    rows = torch.arange(B, device=tok.device)
    # Key column s is visible to the query at position p iff s <= p: the columns a row has written.
    mask = (torch.arange(attn_len, device=tok.device) <= pos[:, None])[:, None, None, :]  # (B,1,1,S_b)

    def attend(i, q, k, v):
        kc, vc = ks[i], vs[i]                                            # (N, nkv, S, D)
        if use_flash:
            # flash-attn writes k/v at column pos itself and reads only columns 0..pos of each row.
            return flash_decode(q, kc, vc, k, v, pos.to(torch.int32))   # (B, nh, 1, D)
        kc[rows, :, pos] = k[:, :, 0].to(kc.dtype)                       # (B, nkv, D) at [b, :, pos_b]
        vc[rows, :, pos] = v[:, :, 0].to(vc.dtype)
        nh, nkv, D = q.shape[1], k.shape[1], q.shape[-1]
        # Grouped-query attention without repeating K/V (torch's fused kernels take no GQA together
        # with a mask, and repeating would copy the cache every step): the nh/nkv query heads of one
        # KV head become its nh/nkv "query positions". They share the row's mask, so it broadcasts.
        qg = q.reshape(B, nkv, nh // nkv, D)                             # (B, nkv, G, D)
        y = F.scaled_dot_product_attention(qg, kc[:B, :, :attn_len], vc[:B, :, :attn_len], attn_mask=mask)
        return y.reshape(B, nh, 1, D)

    h = model(tok[:, None], attend=attend, positions=pos[:, None], return_hidden=True)[:, 0]  # (B, H)
    return F.linear(h, model.lm_head_weight).float()                     # (B, V)


def decode_core(model, ks: list, vs: list, tok, pos, n_gen, req, seed, temperature, top_p,
                attn_len: int, greedy: bool, top_k: int, use_top_p: bool, use_flash: bool):
    """One decode step for the first B slots: feed tok at pos, write its k/v, attend, sample.
    Returns the next token (B,) and its log-prob (B,). Pure apart from the cache writes, so it can be
    compiled; the state update is advance() below. The last four arguments are a DecodeMode."""
    logits = decode_logits(model, ks, vs, tok, pos, attn_len, use_flash)  # (B, V)
    u = uniform(seed, req, n_gen)                                        # (B,)
    return sample(logits, u, temperature, top_p, greedy, top_k, use_top_p)


def advance(cache: KVCache, B: int, new, logp):
    """Record the sampled tokens and move every live slot one position on (device only, no sync)."""
    rows, n_gen, pos, tok = cache.rows[:B], cache.n_gen[:B], cache.pos[:B], cache.tok[:B]
    done = cache.done[:B]
    live = ~done
    cache.out_tok[rows, n_gen] = new       # a finished slot writes its spare column: ignored
    cache.out_logp[rows, n_gen] = logp
    n_gen.add_(live)                       # finished slots stay frozen: same position, same count
    pos.add_(live)
    tok.copy_(torch.where(live, new, tok))
    is_eos = (new[:, None] == cache.eos).any(-1)   # not torch.isin: it may sort, which graphs dislike
    done.logical_or_(live & (is_eos | (n_gen >= cache.max_new)))


# -----------------------------------------------------------------------------
# Sampling on the device: counter-based uniforms and inverse-CDF sampling

M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    # (x * c) mod 2^32 for 32-bit x held in int64, in 16-bit halves so no product overflows int64.
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & M32


def _hash32(x):
    # "lowbias32" (Chris Wellons' integer hash search): a bijection on 32 bits that mixes well.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seed, req, t):
    """A uniform number in [0, 1) for token t of request req, a pure function of (seed, req, t).
    23 bits, so u <= 1 - 2^-23 and u * total stays strictly below total in fp32."""
    h = _hash32(_hash32(_hash32(seed & M32) ^ (req & M32)) ^ (t & M32))
    return (h >> 9).float() * 2.0 ** -23


def sample(logits, u, temperature, top_p, greedy: bool, top_k: int, use_top_p: bool):
    """Draw one token per row of logits (B, V) with the uniforms u (B,). Temperature, then top-k,
    then top-p on the renormalised top-k (transformers' order). Returns tokens (B,) and their
    log-probs (B,) under the truncated, renormalised distribution actually sampled from."""
    if greedy:
        return logits.argmax(-1), torch.zeros_like(logits[:, 0])
    x = logits / temperature                                             # (B, V)
    ids = None                                                           # vocab id of each column
    if top_k > 0:
        x, ids = torch.topk(x, min(top_k, x.shape[-1]), dim=-1)          # (B, k), descending
    elif use_top_p:
        x, ids = torch.sort(x, dim=-1, descending=True)                  # (B, V)
    probs = torch.softmax(x, dim=-1)
    if use_top_p:
        # The nucleus: the smallest set of top tokens with mass >= top_p. A token is in it iff the
        # mass ranked above it is still < top_p (so the top token always is).
        above = probs.cumsum(-1) - probs
        probs = probs.masked_fill(above >= top_p, 0.0)
    cdf = probs.cumsum(-1)                                               # unnormalised after top-p
    total = cdf[:, -1:]                                                  # (B, 1)
    # Inverse CDF: the first column whose cdf exceeds u * total. One uniform per row, so no
    # (B, V) random tensor is ever made.
    j = torch.searchsorted(cdf, u[:, None] * total, right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    p = probs.gather(-1, j)
    # A zero-probability pick can only come from float rounding in the cumsum; take the mode then.
    j = torch.where(p > 0, j, probs.argmax(-1, keepdim=True))
    logp = (probs.gather(-1, j) / total).log()[:, 0]
    tok = j[:, 0] if ids is None else ids.gather(-1, j)[:, 0]
    return tok, logp


# -----------------------------------------------------------------------------
# One decode step, recorded as a CUDA graph on a GPU


def decode_mode(temperature: float, top_k: int, top_p: float, use_flash: bool) -> DecodeMode:
    """The DecodeMode of these settings, in a canonical form, so that settings that sample the same
    way share one compiled variant of the step: top-k 1 is greedy (a point mass either way), and
    greedy ignores top-k and top-p. That leaves five modes; top_k's value (>= 2) is a dynamic int
    in the compiled step, so every k shares one."""
    greedy = temperature == 0 or top_k == 1
    return DecodeMode(greedy, 0 if greedy else int(top_k), not greedy and top_p < 1.0, use_flash)


def attn_bucket(n: int) -> int:
    """Round the attended length up, in steps of ~1/8 of its size (at least 64): few distinct
    shapes (few CUDA graphs), at most ~1/4 wasted columns."""
    step = max(64, 1 << max(0, (n - 1).bit_length() - 3))
    return -(-n // step) * step


def prepare_step(model, cache: KVCache):
    """Before the steps of a generate() call: drop recorded graphs that point at other weight
    tensors (a new model, or parameters replaced rather than updated in place), and make the
    decode step, compiled or not, once per cache."""
    weights_key = (id(model),) + tuple(p.data_ptr() for p in model.parameters())
    if weights_key != cache.weights_key:
        cache.graphs.clear()
        cache.weights_key = weights_key
    if cache.core is None:
        backend = "inductor" if cache.compile is True else cache.compile
        cache.core = decode_core
        if cache.compile:
            cache.core = torch.compile(decode_core, dynamic=True, backend=backend)


def _step(model, cache: KVCache, B: int, attn_len: int, mode: DecodeMode):
    new, logp = cache.core(model, cache.k, cache.v, cache.tok[:B], cache.pos[:B], cache.n_gen[:B],
                           cache.req[:B], cache.seed, cache.temperature, cache.top_p, attn_len, *mode)
    advance(cache, B, new, logp)


def _eager_step(model, cache, B, attn_len, mode):
    """A real step, run eagerly; the first one of a new variant (mode, model) also compiles. If
    compiling fails, or the step would need more than DECODE_VARIANTS compiled variants, we warn
    and run this cache's steps uncompiled rather than stop a training run. (A failure midway
    through the layers only rewrote cache columns that the retry rewrites with the same values.)"""
    try:
        # For this call only: our limit, and an error past it instead of dynamo's quiet eager run.
        with torch._dynamo.config.patch(recompile_limit=DECODE_VARIANTS, fail_on_recompile_limit_hit=True):
            _step(model, cache, B, attn_len, mode)
    except Exception as e:
        if cache.core is decode_core:
            raise
        if isinstance(e, torch._dynamo.exc.FailOnRecompileLimitHit):
            why = (f"it would need more than rollout.DECODE_VARIANTS = {DECODE_VARIANTS} compiled variants "
                   f"(sampling modes x models; this one: mode {mode}, batch {B})")
        else:
            why = f"{type(e).__name__}: {e}"
        warnings.warn(f"compiled decode step failed ({why}); this cache runs it uncompiled from now on")
        cache.core = decode_core
        _step(model, cache, B, attn_len, mode)


def run_step(model, cache: KVCache, B: int, attn_len: int, mode: DecodeMode):
    """One decode step over slots 0..B-1 attending to attn_len cache columns: a graph replay on a
    GPU once this (B, attn_len, mode) has been recorded, else a real step."""
    if not cache.use_graphs:
        return _eager_step(model, cache, B, attn_len, mode)
    key = (B, attn_len, mode)
    graph = cache.graphs.get(key)
    if graph is not None:
        graph.replay()
        return
    # First step at this shape: run it for real on the capture stream (this also warms up cuBLAS
    # and compiles), then record the same step for the next replays. Recording executes nothing.
    cache.stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(cache.stream):
        _eager_step(model, cache, B, attn_len, mode)
    torch.cuda.current_stream().wait_stream(cache.stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=cache.pool, stream=cache.stream):
        _step(model, cache, B, attn_len, mode)
    cache.graphs[key] = graph


# -----------------------------------------------------------------------------
# generate(): admission, decoding, reaping


@dataclass
class Slot:
    """The host's record of a busy slot (the device's is in KVCache, part 2)."""
    req: int               # request id: sample req % n of prompt req // n
    prompt_len: int
    admitted: int          # the decode step it was admitted at (its token 0 came from the prefill)
    scanned: int = 0       # response tokens already searched for stop strings


def eos_token_ids(tok) -> list[int]:
    """The token ids that end a response: the tokenizer's EOS and the end-of-turn tokens chat models use."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):  # chat models end turns with these
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None:
            ids.add(i)
    return sorted(ids)


@torch.no_grad()
def generate(model, prompts: list, n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_ids=None, stop_strings=(), tokenizer=None,
             seed: int | None = None, cache: KVCache | None = None, max_slots: int = 256,
             sync_every: int = 16) -> list:
    """Sample n responses for each prompt (lists of token ids). temperature 0 = greedy. eos_ids
    defaults to the tokenizer's EOS (none without a tokenizer). stop_strings: a response also ends,
    finish "stop", once its decoded text contains one of them, and is cut right after the token
    that completed it; they need the tokenizer, and are looked for on the host every sync_every
    steps (what the device generated past the stop meanwhile is dropped). seed None draws one from
    torch's global RNG. Returns len(prompts) * n Rollouts ordered by (prompt index, sample index).
    See the module docstring for what the log-probs are."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate() needs at least one prompt, and no empty prompt")
    if eos_ids is None:
        eos_ids = () if tokenizer is None or tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    eos_ids = tuple(int(e) for e in eos_ids)
    if len(eos_ids) > MAX_EOS_IDS:
        raise ValueError(f"at most {MAX_EOS_IDS} EOS ids, got {len(eos_ids)}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated tokens")
    M = int(max_new_tokens)
    need = max(len(p) for p in prompts) + M
    if cache is None:
        cache = KVCache.for_model(model, max_len=need, max_slots=max_slots)
    if need > cache.max_len:
        raise ValueError(f"longest prompt + max_new_tokens = {need} exceeds the cache's max_len "
                         f"{cache.max_len}")
    if M < 1:
        return [Rollout(r // n, [], [], "length") for r in range(len(prompts) * n)]

    prepare_step(model, cache)
    mode = decode_mode(temperature, top_k, top_p, cache.use_flash)
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    cache.temperature.fill_(1.0 if mode.greedy else temperature)
    cache.top_p.fill_(top_p)
    cache.max_new.fill_(M)
    cache.seed.fill_(seed)
    cache.eos.fill_(-1)
    cache.eos[:len(eos_ids)] = torch.tensor(eos_ids, dtype=torch.long)

    R = len(prompts) * n                  # requests; request r is sample r % n of prompt r // n
    B = min(cache.n_slots, R)             # slots decoded per step; fixed, so shapes are static
    cache.done[:B] = True
    results = [None] * R
    pending = deque(range(R))
    free = list(range(B))                 # a heap: refill the lowest slots first
    active = {}                           # slot -> Slot, for the busy ones
    # Refill in batches: each prefill is a separate (uncaptured) forward, so refilling one slot at
    # a time would cost more than the idle slots do. (A prompt whose samples land in two admission
    # batches is prefilled twice; that is the only waste.)
    admit_min = max(1, B // 8)
    step = 0                              # decode steps so far

    while pending or active:
        # ---- 1. admission: prefill each newly admitted prompt once, copy it into its samples' slots
        if pending and free and (len(free) >= admit_min or not active):
            reqs = [pending.popleft() for _ in range(min(len(free), len(pending)))]
            slots = [heapq.heappop(free) for _ in reqs]
            _admit(model, cache, prompts, n, reqs, slots, mode)
            active.update((s, Slot(r, len(prompts[r // n]), step)) for r, s in zip(reqs, slots))
        # ---- 2. decoding, on the device, until the host should look again
        step += _decode(model, cache, B, active, step, M, sync_every, mode)
        # ---- 3. reaping: the finished slots' rollouts; their slots go back to the free heap
        for s, ro in _reap(cache, B, active, n, eos_ids, stop_strings, tokenizer):
            r = active.pop(s).req
            if results[r] is not None:
                raise RuntimeError(f"request {r} finished twice: slot bookkeeping is broken")
            results[r] = ro
            heapq.heappush(free, s)
    missing = [r for r, x in enumerate(results) if x is None]
    if missing:
        raise RuntimeError(f"requests {missing[:8]} never finished: slot bookkeeping is broken")
    return results


def _admit(model, cache: KVCache, prompts, n, reqs, slots, mode: DecodeMode):
    """Prefill the distinct prompts among the admitted requests (PREFILL_TOKENS at a time, to bound
    activation memory), sample each request's first token, and set up its slot's decode state."""
    dev = cache.device
    distinct = sorted({r // n for r in reqs}, key=lambda i: len(prompts[i]))  # similar lengths together
    logits = {}
    chunk = []                            # prompts of the next prefill forward
    for i in distinct + [None]:
        if i is not None and (not chunk or (len(chunk) + 1) * len(prompts[i]) <= PREFILL_TOKENS):
            chunk.append(i)
            continue
        row_of = {p: j for j, p in enumerate(chunk)}
        chunk_requests = [(r, s) for r, s in zip(reqs, slots) if r // n in row_of]
        chunk_prompts = [prompts[p] for p in chunk]
        shared = shared_prefix(chunk_prompts) if cache.share_prefix else 0
        out = prefill(model, cache, chunk_prompts, [s for _, s in chunk_requests],
                      [row_of[r // n] for r, _ in chunk_requests], shared)  # (P, V)
        for p, j in row_of.items():
            logits[p] = out[j]
        chunk = [i] if i is not None else []
    req = torch.tensor(reqs, device=dev)
    slot_ids = torch.tensor(slots, device=dev)
    first_logits = torch.stack([logits[r // n] for r in reqs])          # (A, V)
    u = uniform(cache.seed, req, torch.zeros_like(req))                 # token 0 of each request
    tok, logp = sample(first_logits, u, cache.temperature, cache.top_p, mode.greedy, mode.top_k,
                       mode.use_top_p)
    cache.tok[slot_ids] = tok
    cache.pos[slot_ids] = torch.tensor([len(prompts[r // n]) for r in reqs], device=dev)
    cache.n_gen[slot_ids] = 1
    cache.req[slot_ids] = req
    cache.out_tok[slot_ids, 0] = tok
    cache.out_logp[slot_ids, 0] = logp
    cache.done[slot_ids] = (tok[:, None] == cache.eos).any(-1) | (cache.max_new <= 1)


def _decode(model, cache: KVCache, B: int, active: dict, step: int, M: int, sync_every: int,
            mode: DecodeMode) -> int:
    """Decode steps until the host's next look: sync_every of them, or fewer if a slot reaches
    max_new_tokens (M) sooner. Its deadline is known on the host: token 0 came from the prefill,
    one more comes from each step. Returns how many steps ran."""
    steps = min([sync_every] + [slot.admitted + M - 1 - step for slot in active.values()])
    if steps <= 0:
        return 0
    # Attend over the cache columns the longest sequence can reach in these steps, bucketed.
    longest = max(slot.prompt_len + min(step + steps - slot.admitted, M) for slot in active.values())
    attn_len = min(attn_bucket(longest), cache.max_len)
    for _ in range(steps):
        run_step(model, cache, B, attn_len, mode)
    return steps


def _reap(cache: KVCache, B: int, active: dict, n: int, eos_ids: tuple, stop_strings, tokenizer) -> list:
    """The busy slots that have finished, as (slot, Rollout) pairs; marked done on the device too.
    One device->host copy says which slots the device stopped (EOS id or max_new_tokens) and how
    far each got; stop strings are looked for here, on the host."""
    state = torch.stack([cache.done[:B].long(), cache.n_gen[:B]]).cpu()  # (2, B)
    finished = {s: int(state[1, s]) for s in active if state[0, s]}     # slot -> response tokens
    stop_hits = set()
    if stop_strings:
        toks = cache.out_tok[:B, :int(state[1].max())].cpu()
        for s, slot in active.items():
            m = _find_stop(tokenizer, toks[s, :int(state[1, s])].tolist(), slot.scanned, stop_strings)
            if m is not None:
                finished[s] = m           # keep tokens up to the one that completed the stop string
                stop_hits.add(s)
            slot.scanned = int(state[1, s])
    if not finished:
        return []
    slots = sorted(finished)
    idx = torch.tensor(slots, device=cache.device)
    width = max(finished.values())
    toks, logps = cache.out_tok[idx, :width].cpu(), cache.out_logp[idx, :width].cpu()
    cache.done[idx] = True                # stop-string hits were still live on the device
    out = []
    for i, s in enumerate(slots):
        m = finished[s]
        tokens = toks[i, :m].tolist()
        # The device stops a slot at an EOS id or at M tokens; a stop string is the host's call.
        stopped = s in stop_hits or tokens[-1] in eos_ids
        finish = "stop" if stopped else "length"
        out.append((s, Rollout(active[s].req // n, tokens, logps[i, :m].tolist(), finish)))
    return out


def _find_stop(tokenizer, tokens, start, stop_strings):
    """The smallest m > start such that the text of tokens[:m] contains a stop string, or None.
    Only the last tokens before each candidate are decoded (enough to hold the longest stop string):
    a cheap test first, then the exact position."""
    if len(tokens) <= start:
        return None
    window = max(len(s) for s in stop_strings) + 8  # a token is >= 1 character, bar a few byte pieces
    lo = max(0, start - window)
    if not any(s in tokenizer.decode(tokens[lo:]) for s in stop_strings):
        return None
    for m in range(start + 1, len(tokens) + 1):
        if any(s in tokenizer.decode(tokens[lo:m]) for s in stop_strings):
            return m
    return None
