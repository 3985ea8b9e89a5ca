"""
Precision and memory, decided once at start-up from the device, the world and the model's shape:
the compute dtype, the memory plan (activation checkpointing and the micro-batch that fit beside
weights, AdamW and the KV cache), and the sampler's weights and KV cache.
"""

from dataclasses import dataclass
import torch

from common import free_memory, inference_copy, print0, share_of_free_memory
from errors import UserError
from srpo_kernels.logprob import CHUNK_BYTES, REFERENCE_CHUNK_BYTES
from srpo_kernels.utils import chunk_rows
from model import _packed_attention
from rollout import KVCache, slot_bytes


@dataclass(frozen=True)
class Precision:
    """How this process computes. Master weights, gradients and AdamW's state are fp32 whatever it says."""
    device_type: str       # "cuda" or "cpu"
    compute: torch.dtype   # matmuls and attention: the update, trainer_logp and generation
    autocast: bool         # the update casts the fp32 weights with torch.autocast (one unsharded process);
                           # a sharded model is cast by FSDP2's policy instead,
                           # shard_model(param_dtype=compute)
    tf32: bool             # the fp32 matmuls that remain run on TF32 tensor cores

    def cast(self):
        """The context the update's forwards run in: autocast to the compute dtype, or nothing."""
        return torch.autocast(self.device_type, dtype=self.compute, enabled=self.autocast)


def decide_precision(device_type: str, world: int, sharded: bool, dtype: str = "auto") -> Precision:
    """--dtype auto computes in bf16 on a GPU and fp32 on a CPU. Who casts depends on sharding alone,
    not on whether torch.distributed is up: torchrun on one GPU makes a process group of one and
    does not shard, and must still get bf16 (it once trained in fp32, and sent fp32 to flash-attn)."""
    if world > 1 and not sharded:
        raise ValueError(f"{world} processes that each hold the whole model: "
                         f"training shards it whenever world > 1")
    compute = {"auto": torch.bfloat16 if device_type == "cuda" else torch.float32,
               "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return Precision(device_type, compute, autocast=compute != torch.float32 and not sharded,
                     tf32=device_type == "cuda")


@dataclass
class MemoryPlan:
    """Bytes per GPU at the peak of a step, and the activation checkpointing and micro-batch token
    budget chosen so that they fit in `capacity` (None on a CPU, where the plan is only printed)."""
    weights: int          # fp32 master weights: 1/world of them each under FSDP2
    grads: int            # fp32 gradients, sharded likewise
    optimizer: int        # AdamW's two fp32 moments, sharded likewise
    casts: int            # compute-dtype weights of the update: autocast's casts (kept for the backward),
                          # or under FSDP2 the root's gathered weights and the blocks in flight
    sampler: int          # the sampler's unsharded copy (0 in one fp32 process: it samples the model itself)
    reference: int        # the frozen initial policy, only with the KL term
    kv_cache: int         # the sampler's KV cache: kv_slots slots, each the longest prompt + --max_new_tokens
    act_plain: int        # one micro-batch's forward + backward without activation checkpointing
    act_ckpt: int         # with it
    grad_ckpt: bool
    micro_tokens: int
    capacity: int | None
    kv_slots: int = 0     # on a GPU what the rest leaves room for, at most --gen_slots; on a CPU --gen_slots

    @property
    def activations(self) -> int:
        return self.act_ckpt if self.grad_ckpt else self.act_plain

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.optimizer + self.casts + self.sampler + self.reference
                + self.kv_cache + self.activations)

    def __str__(self):
        g = lambda b: f"{b / 2**30:.1f}"
        room = f"of {g(self.capacity)} GiB usable" if self.capacity else "(a CPU: not checked)"
        return (f"memory plan per {'GPU' if self.capacity else 'process'}, GiB: weights {g(self.weights)} | "
                f"grads {g(self.grads)} | AdamW {g(self.optimizer)} | "
                f"casts {g(self.casts)} | sampler {g(self.sampler)} | reference {g(self.reference)} | "
                f"KV cache {g(self.kv_cache)} ({self.kv_slots} slots) | "
                f"activations {g(self.activations)} at {self.micro_tokens} tokens "
                f"(checkpointed {g(self.act_ckpt)}, not {g(self.act_plain)}; checkpointing "
                f"{'on' if self.grad_ckpt else 'off'}) | total {g(self.total)} {room}")


def plan_memory(mc, n_params: int, prec: Precision, world: int, max_len: int, capacity: int | None, *,
                micro_tokens: int, grad_ckpt: str, gen_slots: int, rollouts: int, kl_coef: float,
                reference_loss: bool) -> MemoryPlan:
    """What each GPU will hold (model config mc of n_params parameters, samples of up to max_len
    tokens), and the settings that make it fit in capacity bytes. The KV cache gets what the rest
    leaves, at most --gen_slots slots of max_len positions; the settings are tried in this order:
    as asked (--micro_tokens, --grad_ckpt); with --grad_ckpt auto, activation checkpointing (it
    keeps the micro-batch asked for); then --micro_tokens halved. The first that leaves slots for
    all of a step's `rollouts` on this rank (one generation wave) wins; if none does, the first that
    leaves one slot. Past that, a MemoryError that names what to change. The other keyword arguments
    are the Config's options of those names. tests/test_gpu_ready.py holds the activation estimate
    to measured peaks on a CPU."""
    c = torch.finfo(prec.compute).bits // 8
    N, H, L, V, I = n_params, mc.hidden_size, mc.n_layers, mc.vocab_size, mc.intermediate_size
    Hq, Hkv, nh, D = mc.n_heads * mc.head_dim, mc.n_kv_heads * mc.head_dim, mc.n_heads, mc.head_dim
    sharded = world > 1
    embed = V * H * (1 if mc.tie_embeddings else 2)
    if sharded:  # FSDP2 keeps the root (embeddings, lm_head) gathered through the step and prefetches a block
        casts = c * (embed + 2 * (N - embed) // L)
    else:
        casts = c * N if prec.autocast else 0
    sampler = c * N if (sharded or prec.compute != torch.float32) else 0   # main's `infer`
    reference = c * N if kl_coef > 0 else 0
    # weights 4 + grads 4 + AdamW 8 bytes a parameter
    static = (16 * N) // world + casts + sampler + reference
    if capacity is not None and static > capacity:
        raise MemoryError(f"the weights, gradients, AdamW state and their copies alone take "
                          f"{static / 2**30:.1f} GiB per GPU, more than the {capacity / 2**30:.1f} GiB "
                          f"usable: use more GPUs (FSDP2 divides the first three by their number) "
                          f"or a smaller model")
    # One KV-cache slot holds the longest prompt and a whole response. The cache lives through the
    # step (its CUDA graphs are reused), beside everything else here at the update's peak.
    per_slot = slot_bytes(mc, max_len, prec.compute)

    fused = prec.device_type == "cuda" and not reference_loss   # the Triton loss, else the torch reference
    dense_mask = _packed_attention(prec.device_type == "cuda", prec.compute) == "sdpa"
    r = 4   # the residual stream: fp32 in every precision (model.py's numeric recipe)
    # Saved for the backward, bytes per token of one block. Each RMSNorm keeps its fp32 input and
    # normalised x, and its output in the compute dtype, the input of the Linears that read it (q, k,
    # v; gate, up); attention keeps q, k, v, its output (and o_proj a copy) and the row log-sum-exp;
    # the MLP keeps gate, up, silu(gate) and their product.
    norms = 2 * (8 * H + c * H)
    layer = norms + c * (3 * Hq + 2 * Hkv) + 4 * nh + 4 * c * I
    grad_tmp = c * (3 * I + 3 * H)   # a block's backward: gradients of the MLP's inner tensors and of x

    def activations(T: int, ckpt: bool) -> int:
        # Checkpointed, a block keeps only its input until the backward recomputes it.
        per_token = (L * r * H if ckpt else L * layer) + 4 * H + 2 * c * H + 2 * r * D  # + final norm, rope
        # SDPA (the CPU's packed path) gets a (T, T) bool mask, and keeps it per block as a float bias
        mask = T * T * (1 + (1 if ckpt else L) * c) if dense_mask else 0
        if fused:   # logits chunk, dh and dW in the forward; dh and dW scaled in the backward
            buf = min(chunk_rows(T, V, c, CHUNK_BYTES), T) * V * c
            head = max(buf + c * (T * H + V * H) * (2 if prec.autocast else 1), 2 * c * (T * H + V * H))
        else:       # the torch reference: a chunk's fp32 log-softmax, in the forward and again in
            # the backward; of z, log_softmax, its exp and their product (or their gradients) three
            # are live at once
            head = 3 * 4 * min(chunk_rows(T, V, 4, REFERENCE_CHUNK_BYTES), T) * V
        block = T * (grad_tmp + (layer if ckpt else 0))
        return T * per_token + mask + max(head, block)   # the loss's or a block's backward on top

    def plan(ckpt: bool, T: int, slots: int) -> MemoryPlan:
        # a sample is never split, so the largest micro-batch holds max(T, max_len) tokens
        Tmax = max(T, max_len)
        return MemoryPlan(4 * N // world, 4 * N // world, 8 * N // world, casts, sampler, reference,
                          slots * per_slot, activations(Tmax, False), activations(Tmax, True), ckpt, T,
                          capacity, slots)

    if capacity is None:
        return plan(grad_ckpt == "on", micro_tokens, gen_slots)
    tries = [ckpt for ckpt in (False, True) if grad_ckpt in ("auto", "on" if ckpt else "off")]
    settings, T = [], micro_tokens   # (checkpointing, micro-batch budget), in order of preference
    while True:
        settings += [(ckpt, T) for ckpt in tries]
        if T <= max_len:   # a shorter budget would not shrink the longest micro-batch
            break
        T = max(T // 2, max_len)
    # A generation wave is a whole decode of the longest response: fewer slots than rollouts cost
    # whole waves, more than activation checkpointing or a smaller micro-batch cost the update.
    for need in (min(gen_slots, rollouts), 1):
        for ckpt, T in settings:
            rest = plan(ckpt, T, 0)
            slots = min(gen_slots, max(0, capacity - rest.total) // per_slot)
            if slots >= need:
                return plan(ckpt, T, slots)
    raise MemoryError(
        f"a step does not fit in the GPU's memory with one KV-cache slot ({per_slot / 2**30:.2f} GiB: the "
        f"longest prompt + --max_new_tokens = {max_len} positions) even at --micro_tokens {T}"
        f"{' with activation checkpointing' if True in tries else ''}:\n  {rest}\n"
        f"Lower --max_new_tokens, " + ("allow --grad_ckpt auto, " if True not in tries else "")
        + "use more GPUs, or a smaller model.")


def sampler_weights(model, infer):
    """The model the sampler should run, holding the policy's current weights. In one fp32 process
    that is the training model itself (infer is None). Otherwise `infer` is a plain, unsharded copy
    in the generation dtype, refreshed in place: under FSDP2 every parameter is all-gathered
    (common.inference_copy), so all ranks must call this together."""
    if infer is None:
        return model
    return inference_copy(model, into=infer)


def kv_budget(plan: MemoryPlan, device, gen_mem: float) -> tuple[int | None, str]:
    """The bytes the KV cache may take, and where that number comes from. On a GPU, what the memory
    plan left it (plan.kv_slots slots), or what is free now if less (another process on the GPU),
    measured with the allocator's cached blocks handed back first: torch counts them as used. On a
    CPU, --gen_mem of the RAM available; None where that cannot be known."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free = free_memory(device)
        if free < plan.kv_cache:
            return free, (f"{free / 2**20:.0f} MiB free on the GPU, less than the memory plan's "
                          f"{plan.kv_cache / 2**20:.0f}")
        return plan.kv_cache, "what the memory plan leaves after weights, optimizer and activations"
    budget = share_of_free_memory(device, gen_mem)
    if budget is None:
        return None, "no limit known"
    return budget, f"--gen_mem {gen_mem} of {budget / gen_mem / 2**20:.0f} MiB free"


def longest_slot(cfg, mem_bytes: int, dtype) -> int:
    """The largest max_len for which one slot fits in mem_bytes (0 if none does)."""
    fixed = slot_bytes(cfg, 0, dtype)
    return max(0, (mem_bytes - fixed) // (slot_bytes(cfg, 1, dtype) - fixed))


def make_cache(sampler, problems: list, prompt_ids: dict, max_new_tokens: int, max_slots: int,
               budget: int | None, source: str, cuda_graphs: bool = True) -> KVCache:
    """The run's one KV cache, in `budget` bytes (kv_budget: `source` says where they come from).
    Every slot holds the longest prompt plus a full response; there are as many slots (up to
    max_slots) as the budget holds. So one long prompt means fewer slots for all (said once), and a
    prompt that cannot fit at all, past the model's positions or past what one slot holds in the
    budget, is an error naming its row. cuda_graphs False: the decode step is not recorded as graphs."""
    p = next(sampler.parameters())
    limits = []  # (positions, what sets them)
    max_pos = getattr(sampler.hf_config, "max_position_embeddings", None)
    if max_pos:
        limits.append((max_pos, f"the model's {max_pos} positions (max_position_embeddings)"))
    if budget is not None:
        room = longest_slot(sampler.config, budget, p.dtype)
        limits.append((room, f"the {room} positions one KV-cache slot holds in the sampler's memory budget "
                             f"({budget / 2**20:.1f} MiB: {source})"))
    by_len = sorted(problems, key=lambda q: len(prompt_ids[q.id]), reverse=True)
    longest, n_prompt = by_len[0], len(prompt_ids[by_len[0].id])
    max_len = n_prompt + max_new_tokens
    for limit, what in limits:
        if max_new_tokens >= limit:
            raise UserError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in {what}")
        if max_len > limit:
            more = sum(len(prompt_ids[q.id]) + max_new_tokens > limit for q in by_len) - 1
            raise UserError(f"{longest.source} (id {longest.id!r}): the prompt is {n_prompt} tokens; "
                             f"with --max_new_tokens {max_new_tokens} it needs {max_len} positions, "
                             f"more than {what}"
                             + (f"; {more} more rows are too long too" if more else "")
                             + "; shorten or drop it, or lower --max_new_tokens")
    cache = KVCache.for_model(sampler, max_len=max_len, max_slots=max_slots, mem_bytes=budget,
                              graphs=None if cuda_graphs else False)
    if cache.n_slots < max_slots:
        print0(f"sampler: {cache.n_slots} slots, not --gen_slots {max_slots}: {source} "
               f"({budget / 2**20:.1f} MiB) holds no more at {max_len} positions a slot, a length set by the "
               f"longest prompt ({longest.source}, {n_prompt} tokens) plus --max_new_tokens")
    return cache


def generation_plan(cache: KVCache, rollouts: int, max_slots: int, source: str) -> str:
    """One line: the KV cache's slots on this rank against a training step's rollouts on it, the
    generation waves that makes, and why there are not more slots. (Continuous batching refills a
    slot as soon as it finishes, so a wave is a slot's turn rather than a barrier.)"""
    waves = -(-rollouts // cache.n_slots)
    line = (f"generation plan: {cache.n_slots} KV-cache slots per rank of {cache.max_len} positions | "
            f"{rollouts} rollouts per rank per step | {waves} wave{'s' if waves > 1 else ''} | "
            f"CUDA graphs {'on' if cache.use_graphs else 'off'}")
    if waves > 1:
        slot = slot_bytes(cache.config, cache.max_len, cache.dtype) / 2**30
        why = ("--gen_slots caps them" if cache.n_slots == max_slots else
               f"{source} holds no more, at {slot:.2f} GiB a slot (the longest prompt + --max_new_tokens); "
               f"more GPUs or a shorter --max_new_tokens give more")
        line += " | fewer slots than rollouts: " + why
    return line
