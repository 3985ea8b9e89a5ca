"""
SRPO: two-Staged history-Resampling Policy Optimization, in one file you can read top to bottom.

SRPO (Kuaishou Kwaipilot, arXiv 2504.14286) is GRPO with two additions. What this script does:
  1. GRPO. Per prompt, sample a group of G responses; reward each with a rule (rewards.py); the
     advantage of a response is its reward normalised within its group, A_i = (R_i - mean) / (std + eps);
     maximise the clipped surrogate min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A),
     averaged over every response token of the batch (token-level, not per sequence). No KL, no
     reference model by default.
  2. Zero-advantage groups. A group whose rewards are all equal has A = 0 and teaches nothing. We
     count them every step (`zero_adv`): that fraction is the waste SRPO attacks.
  3. History resampling (HR). At the end of every epoch, prompts whose rollouts were *all correct*
     that epoch are dropped for the rest of the stage; prompts with mixed outcomes and prompts that
     were *all wrong* are kept (a later policy may solve them). No extra generation: it reuses the
     outcomes already recorded. `--no_hr` turns it off, which is plain GRPO, the baseline.
  4. Two stages. Stage 1 trains on math only, to elicit long reasoning; stage 2 adds code. The
     switch happens after a configured number of steps (or epochs); HR runs within each stage.

Run it:
  python srpo.py                                   # the demo on the embedded SmolLM2-135M-Instruct
  torchrun --nproc_per_node=8 srpo.py --model /path/to/Qwen2.5-7B ...   # one 8-GPU node (train.sh)
"""
import argparse
import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import rewards
from kernels import fused_grpo_loss, token_logprobs, token_logprobs_reference
from kernels.logprob import CHUNK_BYTES, REFERENCE_CHUNK_BYTES
from kernels.utils import chunk_rows
from model import Transformer, _packed_attention, load_hf_config, load_tokenizer, num_params, resolve_model_path
from rollout import KVCache, free_memory, generate, inference_copy, longest_slot, slot_bytes

# -----------------------------------------------------------------------------
# Config: every knob, with its default, why, and the values it allows ("range" in interval notation:
# "[0, 1)" holds 0 but not 1; or "choices"), checked at start-up. Printed and saved with each run.


@dataclass
class Config:
    # model and data
    model: str = field(default="default", metadata={"help": "HF checkpoint folder or .gguf file; 'default' = embedded SmolLM2-135M-Instruct"})
    math_train: str = field(default="data/math_train.jsonl", metadata={"help": "math prompts (JSONL: id, domain, question, answer)"})
    code_train: str = field(default="data/code_train.jsonl", metadata={"help": "code prompts (JSONL: id, domain, question, tests); used in stage 2"})
    math_test: str = field(default="data/math_test.jsonl", metadata={"help": "held-out math prompts for evaluation"})
    code_test: str = field(default="data/code_test.jsonl", metadata={"help": "held-out code prompts for evaluation"})
    max_prompts: int = field(default=0, metadata={"help": "use only the first N prompts of each train file (0 = all)", "range": "[0, inf)"})
    max_level: int = field(default=0, metadata={"help": "use only rows whose 'level' is <= N, train and test (rows without one always); 0 = all", "range": "[0, inf)"})
    out_dir: str = field(default="runs/srpo", metadata={"help": "metrics, checkpoints and the exported policy go here"})
    seed: int = field(default=1234, metadata={"help": "every random choice derives from (seed, step, rank)", "range": "[0, 2147483647]"})
    # GRPO
    prompts_per_step: int = field(default=64, metadata={"help": "prompts per step across all ranks (paper: 256)", "range": "[1, inf)"})
    G: int = field(default=8, metadata={"help": "rollouts per prompt, the group size (paper: 32); at least 2, for a mean and a spread", "range": "[2, inf)"})
    max_new_tokens: int = field(default=512, metadata={"help": "response length cap during training", "range": "[1, inf)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the loss divides the logits by the same, so not 0)", "range": "(0, inf)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling; < 1 makes the trainer recompute logp_old", "range": "(0, 1]"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling, 0 = off; > 0 makes the trainer recompute logp_old", "range": "[0, inf)"})
    eps_low: float = field(default=0.2, metadata={"help": "clip ratio below at 1 - eps_low", "range": "[0, 1)"})
    eps_high: float = field(default=0.2, metadata={"help": "clip ratio above at 1 + eps_high (> eps_low = DAPO's clip-higher)", "range": "[0, inf)"})
    adv_eps: float = field(default=1e-4, metadata={"help": "eps in (R - mean) / (std + eps)", "range": "[0, inf)"})
    kl_coef: float = field(default=0.0, metadata={"help": "KL penalty to the initial policy (k3 estimator); 0 = off, as in SRPO", "range": "[0, inf)"})
    format_coef: float = field(default=0.0, metadata={"help": "reward += format_coef * format reward (<think>/<answer> template); correctness alone decides HR", "range": "[0, inf)"})
    language_penalty: float = field(default=0.0, metadata={"help": "subtract this from the reward of mixed-language responses (the report's penalty); 0 = off", "range": "[0, inf)"})
    one_shot: bool = field(default=True, metadata={"help": "show one worked example (rewards.EXAMPLES) as an earlier chat turn; small models need it to find the template"})
    # optimisation
    lr: float = field(default=1e-6, metadata={"help": "AdamW learning rate (paper: constant 1e-6)", "range": "[0, inf)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps, then constant", "range": "[0, inf)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "range": "[0, inf)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)", "range": "[0, inf)"})
    update_epochs: int = field(default=1, metadata={"help": "update passes over each step's rollouts; > 1 recomputes logp_old with the trainer", "range": "[1, inf)"})
    micro_tokens: int = field(default=16384, metadata={"help": "token budget of one packed micro-batch (gradient accumulation over them); lowered at start-up if the memory plan says it does not fit the GPU", "range": "[1, inf)"})
    grad_ckpt: str = field(default="auto", metadata={"help": "activation checkpointing per transformer block (less memory, ~1/3 more compute): on, off, or auto = on when the start-up memory plan says the micro-batch would not fit the GPU", "choices": ("auto", "on", "off")})
    reference_loss: bool = field(default=False, metadata={"help": "plain-torch loss instead of the Triton kernels, for debugging (CPU tensors use it anyway)"})
    # SRPO
    hr: bool = field(default=True, metadata={"help": "history resampling at each epoch end; --no_hr = plain GRPO"})
    hr_return_after: int = field(default=0, metadata={"help": "a dropped prompt rejoins after this many epochs (0 = never, as in the report)", "range": "[0, inf)"})
    stage1_steps: int = field(default=100, metadata={"help": "steps of stage 1 (math) before code joins", "range": "[0, inf)"})
    stage1_epochs: int = field(default=0, metadata={"help": "if > 0, switch to stage 2 after this many stage-1 epochs instead", "range": "[0, inf)"})
    total_steps: int = field(default=200, metadata={"help": "steps in all (both stages)", "range": "[1, inf)"})
    # evaluation, logging, checkpoints
    eval_every: int = field(default=25, metadata={"help": "evaluate every N steps, plus before the first and after the last (0 = only those)", "range": "[0, inf)"})
    eval_prompts: int = field(default=100, metadata={"help": "held-out prompts per domain to evaluate on (0 = all)", "range": "[0, inf)"})
    eval_k: int = field(default=4, metadata={"help": "samples per eval prompt: pass@1 is their mean accuracy", "range": "[1, inf)"})
    eval_temperature: float = field(default=0.6, metadata={"help": "sampling temperature during evaluation (0 = greedy)", "range": "[0, inf)"})
    eval_domains: str = field(default="math,code", metadata={"help": "the domains evaluated", "choices": ("math,code", "math", "code")})
    wandb_project: str = field(default="", metadata={"help": "also log every record to this Weights & Biases project (needs `pip install wandb`); empty = off"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end); 0 = only at the end", "range": "[0, inf)"})
    resume: bool = field(default=True, metadata={"help": "continue from out_dir/checkpoint if one is there"})
    reward_workers: int = field(default=0, metadata={"help": "reward worker processes, 0 = number of CPU cores", "range": "[0, inf)"})
    sandbox: str = field(default="full", metadata={"help": "how generated code runs: full (namespaces, private root, a uid of its own, cgroup caps), namespaces (no cgroup), rlimits (trusted code only: the real filesystem and network); a mode that cannot run here stops the run, never falls back (README: the sandbox)", "choices": rewards.SANDBOX_MODES})
    dtype: str = field(default="auto", metadata={"help": "compute dtype of generation and the update: auto = bf16 on GPU, fp32 on CPU (weights, gradients and AdamW state stay fp32)", "choices": ("auto", "bf16", "fp32")})
    gen_slots: int = field(default=256, metadata={"help": "most sequences the sampler decodes at once (KV-cache slots)", "range": "[1, inf)"})
    gen_mem: float = field(default=0.25, metadata={"help": "fraction of the free memory (the GPU's; on a CPU, the RAM available) the KV cache may take, measured at start-up", "range": "(0, 1]"})
    max_steps_this_run: int = field(default=0, metadata={"help": "stop (with a checkpoint) after N steps of this process; 0 = run to total_steps", "range": "[0, inf)"})


def parse_config(argv=None) -> Config:
    p = argparse.ArgumentParser(description="SRPO training (see the docstring of srpo.py)")
    for f in dataclasses.fields(Config):
        if f.type is bool or isinstance(f.default, bool):
            # --hr / --no_hr style switches
            p.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=f.default, help=f.metadata["help"])
            p.add_argument(f"--no_{f.name}", dest=f.name, action="store_false")
        else:
            rule = f"range {f.metadata['range']}" if "range" in f.metadata else \
                f"one of {', '.join(f.metadata['choices'])}" if "choices" in f.metadata else ""
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                           help=f.metadata["help"] + (f"; {rule}" if rule else ""))
    cfg = Config(**vars(p.parse_args(argv)))
    # Every option against its rule, now: a bad value would otherwise surface late (temperature 0 as
    # a ZeroDivisionError after the first generation) or not at all (warmup_steps -1: a negative
    # learning rate, gradient ascent).
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if "range" in f.metadata and not in_range(value, f.metadata["range"]):
            raise ValueError(f"--{f.name}={value!r} is outside its range {f.metadata['range']} ({f.metadata['help']})")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ValueError(f"--{f.name}={value!r}: choose one of {', '.join(f.metadata['choices'])}")
    return cfg


def in_range(value, interval: str) -> bool:
    """interval as written in maths: "[0, 1)" holds 0 and not 1; "inf" is no bound, so a value must be
    finite. NaN is in no range (every comparison with it is False)."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below

# -----------------------------------------------------------------------------
# Distributed: one process, or torchrun with one process per GPU (or CPU processes over gloo).


def setup_dist():
    """Returns (rank, world, device). Without torchrun it is (0, 1, cuda or cpu)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def shard_model(model, param_dtype):
    """FSDP2: each transformer block is its own unit (all-gathered just before it runs, freed after),
    then the root takes the embeddings, final norm and lm_head. Master weights and gradient
    reduction stay fp32; compute runs in param_dtype (bf16 on GPUs)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def build_policy(path: str, device, rank: int, world: int, param_dtype) -> Transformer:
    """The policy, fp32 master weights. In one process, loaded whole. With several, built on the meta
    device (no memory, no random initialisation), sharded, then filled from rank 0, the only rank that
    reads the weights: each rank ends up holding its shard alone, not a whole CPU copy of the model."""
    if world == 1:
        return Transformer.from_pretrained(path, dtype=torch.float32, device=device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    with torch.device("meta"):
        model = Transformer(load_hf_config(path))
    shard_model(model, param_dtype=param_dtype)
    model.to_empty(device=device)  # this rank's shards, uninitialised until the broadcast below
    full, error = {}, None
    if rank == 0:
        try:
            full = Transformer.from_pretrained(path).state_dict()
        except (OSError, ValueError, ImportError) as e:  # unreadable weights: every rank must stop, not wait
            error = e
    raise_together(error)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def raise_together(error: Exception | None):
    """Raise `error` on every rank if any rank has one. A rank that raised alone would leave the
    others waiting in their next collective until a timeout, with the reason printed by one rank
    among many; and in one process this is simply `raise error`."""
    error = next((e for e in _gather(error) if e is not None), None)
    if error is not None:
        raise error


def _gather(obj) -> list:
    """obj from every rank, in rank order; [obj] in one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def close_dist():
    """Wait for every rank (rank 0 may still be writing), then tear the process group down."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_torchrun(status: int = 0):
    """Call last, under torchrun. After all work is done and saved, torch's gloo backend sometimes
    aborts in its C++ destructors at interpreter exit ("terminate called without an active
    exception", about 1 run in 30 on torch 2.13 CPU, after the last line of the script had run),
    which torchrun reports as a failed run. Leave without running them, with main's exit status."""
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over ranks (metrics, token counts); a no-op in one process."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()

# -----------------------------------------------------------------------------
# Precision and memory: decided once at start-up, from the device, the world and the model's shape.


@dataclass(frozen=True)
class Precision:
    """How this process computes. Master weights, gradients and AdamW's state are fp32 whatever it says."""
    device_type: str       # "cuda" or "cpu"
    compute: torch.dtype   # matmuls and attention: the update, trainer_logp and generation
    autocast: bool         # the update casts the fp32 weights with torch.autocast (one unsharded process);
                           # a sharded model is cast by FSDP2's policy instead, shard_model(param_dtype=compute)
    tf32: bool             # the fp32 matmuls that remain run on TF32 tensor cores

    def cast(self):
        """The context the update's forwards run in: autocast to the compute dtype, or nothing."""
        return torch.autocast(self.device_type, dtype=self.compute, enabled=self.autocast)


def decide_precision(device_type: str, world: int, sharded: bool, dtype: str = "auto") -> Precision:
    """--dtype auto computes in bf16 on a GPU and fp32 on a CPU. Who casts depends on sharding alone,
    not on whether torch.distributed is up: torchrun on one GPU makes a process group of one and
    does not shard, and must still get bf16 (it once trained in fp32, and sent fp32 to flash-attn)."""
    if world > 1 and not sharded:
        raise ValueError(f"{world} processes that each hold the whole model: training shards it whenever world > 1")
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
    kv_cache: int         # --gen_mem of the memory free when it is made, at most --gen_slots slots
    act_plain: int        # one micro-batch's forward + backward without activation checkpointing
    act_ckpt: int         # with it
    grad_ckpt: bool
    micro_tokens: int
    capacity: int | None

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
        return (f"memory plan per {'GPU' if self.capacity else 'process'}, GiB: weights {g(self.weights)} | grads {g(self.grads)} | AdamW {g(self.optimizer)} | "
                f"casts {g(self.casts)} | sampler {g(self.sampler)} | reference {g(self.reference)} | "
                f"KV cache {g(self.kv_cache)} | activations {g(self.activations)} at {self.micro_tokens} tokens "
                f"(checkpointed {g(self.act_ckpt)}, not {g(self.act_plain)}; checkpointing "
                f"{'on' if self.grad_ckpt else 'off'}) | total {g(self.total)} {room}")


def plan_memory(mc, n_params: int, cfg: Config, prec: Precision, world: int, max_len: int,
                capacity: int | None) -> MemoryPlan:
    """What each GPU will hold (model config mc of n_params parameters, samples of up to max_len
    tokens), and the settings that make it fit in capacity bytes: as asked if that fits; else, with
    --grad_ckpt auto, activation checkpointing (it keeps the micro-batch asked for); else
    --micro_tokens halved until it fits. Past that, a MemoryError that names what to change.
    tests/test_gpu_ready.py holds the activation estimate to measured peaks on a CPU."""
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
    reference = c * N if cfg.kl_coef > 0 else 0
    static = (16 * N) // world + casts + sampler + reference   # weights 4 + grads 4 + AdamW 8 bytes a parameter
    if capacity is not None and static > capacity:
        raise MemoryError(f"the weights, gradients, AdamW state and their copies alone take {static / 2**30:.1f} GiB "
                          f"per GPU, more than the {capacity / 2**30:.1f} GiB usable: use more GPUs (FSDP2 divides the "
                          f"first three by their number) or a smaller model")
    # The KV cache takes --gen_mem of the memory free when it is made (make_cache), which is after
    # the master weights and the sampler's copy, before gradients and AdamW state: at most this.
    kv = cfg.gen_slots * slot_bytes(mc, max_len, prec.compute)
    if capacity is not None:
        kv = min(kv, int(cfg.gen_mem * (capacity - 4 * N // world - sampler - reference)))

    fused = prec.device_type == "cuda" and not cfg.reference_loss   # the Triton loss, else the torch reference
    dense_mask = _packed_attention(prec.device_type == "cuda", prec.compute) == "sdpa"
    r = 4 if prec.autocast else c   # the residual stream: fp32 under autocast (as the weights are)
    # Saved for the backward, bytes per token of one block. Each RMSNorm keeps its input in fp32
    # and the normalised x; a Linear keeps its input, under autocast one bf16 cast per consumer
    # (q, k, v; gate, up); attention keeps q, k, v, its output (and o_proj a copy) and the row
    # log-sum-exp; the MLP keeps gate, up, silu(gate) and their product.
    norms = 16 * H + 5 * c * H if prec.autocast else 8 * H + 4 * c * H
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
        else:       # the torch reference: a chunk's fp32 log-softmax, in the forward and again in the backward
            head = 4 * 4 * min(chunk_rows(T, V, 4, REFERENCE_CHUNK_BYTES), T) * V   # fp32 z, log_softmax, exp, product
        block = T * (grad_tmp + (layer if ckpt else 0))
        return T * per_token + mask + max(head, block)   # the loss's or a block's backward on top

    def plan(ckpt: bool, T: int) -> MemoryPlan:
        # a sample is never split, so the largest micro-batch holds max(T, max_len) tokens
        Tmax = max(T, max_len)
        return MemoryPlan(4 * N // world, 4 * N // world, 8 * N // world, casts, sampler, reference, kv,
                          activations(Tmax, False), activations(Tmax, True), ckpt, T, capacity)

    if capacity is None:
        return plan(cfg.grad_ckpt == "on", cfg.micro_tokens)
    tries = [ckpt for ckpt in (False, True) if cfg.grad_ckpt in ("auto", "on" if ckpt else "off")]
    T = cfg.micro_tokens
    while True:
        for ckpt in tries:
            p = plan(ckpt, T)
            if p.total <= capacity:
                return p
        if T <= max_len:   # a shorter budget would not shrink the longest micro-batch
            raise MemoryError(
                f"a step does not fit in the GPU's memory even at --micro_tokens {T} (the longest sample: prompt + "
                f"--max_new_tokens = {max_len} tokens){' with activation checkpointing' if True in tries else ''}:\n  {p}\n"
                f"Lower --gen_mem (the KV cache), --max_new_tokens or --gen_slots, "
                + ("allow --grad_ckpt auto, " if True not in tries else "") + "use more GPUs, or a smaller model.")
        T = max(T // 2, max_len)

# -----------------------------------------------------------------------------
# Data: JSONL prompt files, validated on load so a bad row fails loudly, with file, line and field.


@dataclass
class Problem:
    id: str
    domain: str       # "math" or "code"
    question: str
    reference: str    # math: the answer; code: the test code
    source: str = ""  # "file:line" of its row, for errors that must point at it


REQUIRED = {"math": ("id", "question", "answer"), "code": ("id", "question", "tests")}


def load_problems(path: str, domain: str, limit: int = 0, max_level: int = 0) -> list[Problem]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{domain} data file {path!r} does not exist (make it with: python data/make_data.py)")
    problems, seen = [], {}  # seen: id -> its line
    # Read bytes and decode each line ourselves: a text-mode file would report bad bytes as a bare
    # UnicodeDecodeError at a byte offset of a buffer, with no file or line.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 f"JSONL files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: a row must be a JSON object")
            for key in REQUIRED[domain]:
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{path}:{lineno}: field {key!r} is missing or not a non-empty string")
            if row.get("domain", domain) != domain:
                raise ValueError(f"{path}:{lineno}: field 'domain' is {row['domain']!r}, this file holds {domain!r}")
            if row["id"] in seen:
                raise ValueError(f"{path}:{lineno}: field 'id' {row['id']!r} repeats an earlier row (line {seen[row['id']]})")
            seen[row["id"]] = lineno
            if max_level:  # 'level' is only read (so only checked) when --max_level filters on it
                level = row.get("level", 0)
                if isinstance(level, bool) or not isinstance(level, (int, float)):
                    raise ValueError(f"{path}:{lineno}: field 'level' is {level!r}: --max_level needs a number "
                                     f"(or no 'level', to keep the row at every level)")
                if level > max_level:
                    continue
            ref = row["answer"] if domain == "math" else row["tests"]
            problems.append(Problem(row["id"], domain, row["question"], ref, source=f"{path}:{lineno}"))
            if limit and len(problems) == limit:
                break
    if not problems:
        raise ValueError(f"{domain} data file {path!r} is empty" + (f" at levels <= {max_level}" if max_level else ""))
    return problems


def check_unique_ids(*problem_lists: list[Problem]):
    """A problem is known by its id alone (the prompt table, HR's buffer, checkpoints), so an id in
    two files makes one problem silently stand in for the other: a test question trained on with a
    train answer, a code problem replacing a math one. The same row read twice is no clash: a file
    given as both train and test data (evaluating on the training set) mixes nothing."""
    first = {}
    for p in (p for problems in problem_lists for p in problems):
        if p.id in first and first[p.id].source != p.source:
            raise ValueError(f"{p.source}: field 'id' {p.id!r} is also the id of {first[p.id].source}; "
                             f"ids must be unique across all train and test files")
        first.setdefault(p.id, p)


def encode_prompt(tok, p: Problem, one_shot: bool) -> list[int]:
    """The R1-Zero instructions (rewards.format_prompt) in the model's chat template, if it has one,
    optionally after one worked example of the same domain as an earlier exchange."""
    turns = []
    if one_shot:
        q, a = rewards.EXAMPLES[p.domain]
        turns = [("user", rewards.format_prompt(q, p.domain)), ("assistant", a)]
    turns.append(("user", rewards.format_prompt(p.question, p.domain)))
    if tok.chat_template:
        return list(tok.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    # A base model without a chat template reads a plain transcript, as in the R1-Zero paper.
    return tok("".join(f"{'User' if r == 'user' else 'Assistant'}: {c}\n" for r, c in turns) + "Assistant:")["input_ids"]

# -----------------------------------------------------------------------------
# The curriculum: history resampling (HR), the in-memory buffer of this epoch's outcomes and the
# epoch-end filter, and the Curriculum that walks the stages and epochs with it. All of SRPO's data
# schedule is here; the loop in train() only asks for prompts and reports outcomes.


@dataclass
class History:
    outcomes: dict = field(default_factory=dict)  # prompt id -> [correct?] of every rollout this epoch
    dropped: dict = field(default_factory=dict)   # prompt id -> the first epoch without it

    def record(self, pid: str, correct: list[bool]):
        self.outcomes.setdefault(pid, []).extend(correct)

    def resample(self, epoch_ids: list[str], next_epoch: int = 0, return_after: int = 0) -> tuple[list[str], dict]:
        """The next epoch's prompts: drop all-correct ones, keep mixed and all-wrong ones.
        Prompts without outcomes this epoch (never reached) are kept, as nothing is known of them.
        Dropped prompts stay out for the rest of the stage, or, with return_after = N > 0, rejoin
        after N epochs: the policy may have forgotten them (an extension; the report never returns them)."""
        kept, stats = [], {"dropped": 0, "kept_mixed": 0, "kept_all_wrong": 0, "kept_unseen": 0, "returned": 0}
        for pid in epoch_ids:
            seen = self.outcomes.get(pid)
            if seen and all(seen):
                self.dropped[pid] = next_epoch  # too easy now: zero advantage, nothing to learn
                stats["dropped"] += 1
                continue
            kept.append(pid)
            key = "kept_unseen" if not seen else "kept_all_wrong" if not any(seen) else "kept_mixed"
            stats[key] += 1
        if return_after:
            back = [pid for pid, e in self.dropped.items() if next_epoch - e >= return_after]
            for pid in back:
                del self.dropped[pid]
            kept += back
            stats["returned"] = len(back)
        self.outcomes = {}
        return kept, stats


def epoch_order(ids: list[str], seed: int, stage: int, epoch: int) -> list[str]:
    # Shuffled by a seed of its own, so a resumed run sees exactly the same order.
    order = sorted(ids)
    random.Random(f"{seed}-{stage}-{epoch}").shuffle(order)
    return order


@dataclass
class Curriculum:
    """Where the run is in SRPO's data: the stage (1: math, 2: math + code), the epoch, this epoch's
    prompt order and position in it, and HR's buffer. The loop asks it for each step's prompts
    (next_batch) and tells it each step's outcomes (record); the stage switch and the epoch end, with
    HR's resampling, happen inside next_batch, which returns what it did as (line, record) events
    for the loop to print and log."""
    stage_ids: dict = field(default_factory=dict)  # stage -> the prompt ids of that stage
    per_step: int = 1                              # prompts per step
    seed: int = 0
    hr: bool = True                                # --no_hr: every epoch holds every prompt of the stage
    return_after: int = 0                          # --hr_return_after
    stage1_steps: int = 0
    stage1_epochs: int = 0                         # if > 0, the switch counts epochs, not steps
    # Where the run is: what a checkpoint saves (state_dict), the same layout as before this class
    stage: int = field(default=1, init=False)
    epoch: int = field(default=0, init=False)
    order: list = field(default_factory=list, init=False)  # this epoch's prompt ids, in order
    pos: int = field(default=0, init=False)                # next index into order
    history: History = field(default_factory=History, init=False)

    def __post_init__(self):
        self.order = epoch_order(self.stage_ids.get(1, []), self.seed, 1, 0)

    def next_batch(self, step: int) -> tuple[list[str] | None, list[tuple[str, dict | None]]]:
        """This step's prompt ids, or None when stage 2 ran dry (the run ends), and the events on the
        way: (line to print, record to log or None)."""
        events = []  # returned, not printed here: only the loop knows the rank and the metrics file
        while True:  # an epoch end may be followed by a stage switch, or by empty epochs (return_after)
            # --- stage switch: math only -> math + code, with a fresh HR buffer
            if self.stage == 1 and ((self.stage1_epochs and self.epoch >= self.stage1_epochs)
                                    or (not self.stage1_epochs and step >= self.stage1_steps)):
                events.append(self._begin_stage2(step))
            if self.pos < len(self.order):
                batch = self.order[self.pos:self.pos + self.per_step]
                self.pos += len(batch)
                return batch, events
            # --- epoch end: history resampling builds the next epoch's prompt list
            if self.hr:
                kept, hr = self.history.resample(self.order, self.epoch + 1, self.return_after)
            else:
                kept, hr = list(self.stage_ids[self.stage]), {}
            self.epoch, self.pos = self.epoch + 1, 0
            self.order = epoch_order(kept, self.seed, self.stage, self.epoch)
            events.append((f"step {step}: epoch {self.epoch} of stage {self.stage}, {len(kept)} prompts"
                           + ("" if not hr else " | " + " | ".join(f"{k} {v}" for k, v in hr.items())),
                           {"type": "epoch", "step": step, "stage": self.stage, "epoch": self.epoch,
                            "prompts": len(kept), **hr}))
            if not self.order and not (self.return_after and self.history.dropped):  # else: empty epochs until some return
                events.append((f"history resampling dropped every prompt of stage {self.stage}: "
                               f"nothing left to learn there", None))
                if self.stage == 2:
                    return None, events
                events.append(self._begin_stage2(step))

    def record(self, outcomes: list[tuple[str, list[bool]]]):
        """This step's (prompt id, [correct?] per rollout), for HR at the epoch end. Recorded with
        --no_hr too (unused then), as before."""
        for pid, correct in outcomes:
            self.history.record(pid, correct)

    def _begin_stage2(self, step: int) -> tuple[str, dict]:
        self.stage, self.epoch, self.pos, self.history = 2, 0, 0, History()  # HR starts afresh on the new set
        self.order = epoch_order(self.stage_ids[2], self.seed, 2, 0)
        return (f"step {step}: stage 2 begins, math + code, {len(self.order)} prompts",
                {"type": "stage", "step": step, "stage": 2, "prompts": len(self.order)})

    def state_dict(self) -> dict:
        return {"stage": self.stage, "epoch": self.epoch, "order": list(self.order), "pos": self.pos,
                "history": {"outcomes": copy.deepcopy(self.history.outcomes), "dropped": dict(self.history.dropped)}}

    def load_state_dict(self, s: dict):
        dropped = s["history"]["dropped"]  # a list of ids in checkpoints older than --hr_return_after
        self.stage, self.epoch, self.order, self.pos = s["stage"], s["epoch"], s["order"], s["pos"]
        self.history = History(outcomes=s["history"]["outcomes"],
                               dropped=dropped if isinstance(dropped, dict) else dict.fromkeys(dropped, 0))

# -----------------------------------------------------------------------------
# Advantages: normalise rewards within each group of G rollouts of one prompt.


def group_advantages(rewards_: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards_: (P, G). Returns adv (P, G) and a (P,) bool mask of zero-advantage groups."""
    mean = rewards_.mean(dim=1, keepdim=True)                 # (P, 1)
    std = rewards_.std(dim=1, keepdim=True)                   # (P, 1), unbiased as in GRPO's paper code
    adv = (rewards_ - mean) / (std + eps)                     # (P, G)
    zero = (rewards_ == rewards_[:, :1]).all(dim=1)           # all rewards equal -> A = 0 exactly
    adv[zero] = 0.0
    return adv, zero

# -----------------------------------------------------------------------------
# The policy update: packed micro-batches by token budget, the fused clipped loss, one optimizer step.


@dataclass
class Sample:
    """One rollout, as the update needs it."""
    tokens: list[int]      # prompt + response
    n_prompt: int
    logp_old: list[float]  # per response token: log-prob under the policy that sampled it
    adv: float


@dataclass
class MicroBatch:
    ids: torch.Tensor       # (1, T) packed inputs: each sequence without its last token
    cu: torch.Tensor        # (n+1,) sequence boundaries in ids
    targets: torch.Tensor   # (T,) next tokens
    mask: torch.Tensor      # (T,) 1.0 where the target is a sampled response token
    adv: torch.Tensor       # (T,) the sequence's advantage on each of its tokens
    logp_old: torch.Tensor  # (T,)
    samples: list           # indices into the step's samples
    logp_ref: torch.Tensor | None = None  # (T,) under the initial policy, only for the KL term


def pack_micro_batches(samples: list[Sample], budget: int) -> list[list[int]]:
    """Greedy first-fit in sample order: sequences are never split, so one longer than the
    budget gets a micro-batch of its own."""
    groups, cur, used = [], [], 0
    for i, s in enumerate(samples):
        n = len(s.tokens) - 1
        if cur and used + n > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups


def make_micro_batch(samples: list[Sample], idx: list[int], device) -> MicroBatch:
    ids, targets, mask, adv, logp_old, lengths = [], [], [], [], [], [0]
    for i in idx:
        s = samples[i]
        n = len(s.tokens) - 1
        ids += s.tokens[:-1]
        targets += s.tokens[1:]
        # target j is token j+1 of the sequence: a response token iff j+1 >= n_prompt
        is_resp = [1.0 if j + 1 >= s.n_prompt else 0.0 for j in range(n)]
        mask += is_resp
        adv += [s.adv] * n
        logp_old += [0.0] * (s.n_prompt - 1) + list(s.logp_old)
        lengths.append(n)
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)
    return MicroBatch(t(ids, torch.long)[None], t(lengths, torch.int32).cumsum(0).to(torch.int32),
                      t(targets, torch.long), t(mask, torch.float32), t(adv, torch.float32),
                      t(logp_old, torch.float32), idx)


def empty_micro_batch(device) -> MicroBatch:
    # A rank with fewer micro-batches than the others still has to join every FSDP collective:
    # it runs this two-token batch whose mask is zero, so it adds nothing to loss or gradients.
    z = torch.zeros
    return MicroBatch(z(1, 2, dtype=torch.long, device=device), torch.tensor([0, 2], dtype=torch.int32, device=device),
                      z(2, dtype=torch.long, device=device), z(2, device=device), z(2, device=device), z(2, device=device), [])


def trainer_logp(model, mb: MicroBatch, cfg: Config, prec: Precision) -> torch.Tensor:
    """Per-token log-probs (T,) under `model`, no grad: logp_old for off-policy passes and
    truncated sampling, and logp_ref under the frozen initial policy for the KL term. In the
    update's precision: an fp32 model without autocast would also send fp32 to flash-attn."""
    fn = token_logprobs_reference if cfg.reference_loss else token_logprobs
    with torch.no_grad(), prec.cast():
        return model(mb.ids, cu_seqlens=mb.cu, head=lambda h, W: fn(
            h[0], W.to(h.dtype), mb.targets, temperature=cfg.temperature)).float()


def policy_update(model, opt, samples: list[Sample], cfg: Config, device, ref_model=None, world=1,
                  prec: Precision | None = None) -> dict:
    """Update passes over one step's rollouts (this rank's share). The loss is the token-level mean
    over *every* response token of the global batch, so each micro-batch's mean is re-weighted by
    its token count over the global count (and by `world`, because FSDP averages over ranks).
    prec: main's decision; by default the one main would make (sharded iff world > 1)."""
    prec = prec or decide_precision(torch.device(device).type, world, world > 1, cfg.dtype)
    # A zero advantage makes every term of a rollout's surrogate zero: it adds nothing to the
    # gradient, so its forward and backward are skipped (unless a KL term gives it a gradient).
    # Its tokens still count in n_tokens: the loss is a mean over *all* response tokens.
    trained = [s for s in samples if s.adv != 0.0 or cfg.kl_coef > 0]
    n_tokens, n_trained = all_sum([sum(len(s.tokens) - s.n_prompt for s in samples),
                                   sum(len(s.tokens) - s.n_prompt for s in trained)], device)  # global
    local = pack_micro_batches(trained, cfg.micro_tokens)
    n_micro = _all_max(len(local), device)
    mbs = [make_micro_batch(trained, g, device) for g in local]
    mbs += [empty_micro_batch(device) for _ in range(n_micro - len(mbs))]
    for mb in mbs:
        if cfg.kl_coef > 0:
            mb.logp_ref = trainer_logp(ref_model, mb, cfg, prec)
        if cfg.update_epochs > 1 or cfg.top_p < 1.0 or cfg.top_k > 0:
            # The sampler's log-probs are of the *truncated* distribution when top-p/top-k is on;
            # with several passes the ratio must start from the trainer's own numbers.
            mb.logp_old = trainer_logp(model, mb, cfg, prec)

    def head(mb):
        def loss_fn(h, W):  # runs inside model.forward, where FSDP2 has the lm_head weight whole
            # Under autocast the final norm hands back fp32 h; the kernels' matmuls run in the
            # dtype they are given, so hand them the compute dtype (bf16: the tensor-core rate).
            dt = prec.compute if prec.autocast else h.dtype
            return fused_grpo_loss(h[0].to(dt), W.to(dt), mb.targets, mb.logp_old, mb.adv, mb.mask,
                                   eps_low=cfg.eps_low, eps_high=cfg.eps_high, temperature=cfg.temperature,
                                   kl_coef=cfg.kl_coef, logp_ref=mb.logp_ref, reference=cfg.reference_loss)
        return loss_fn

    stats = {"loss": 0.0, "clip_frac": 0.0, "ratio_mean": 1.0, "approx_kl": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    for _ in range(cfg.update_epochs):
        opt.zero_grad(set_to_none=True)
        totals = torch.zeros(5, dtype=torch.float64, device=device)
        for mb in mbs:
            weight = mb.mask.sum() / max(n_tokens, 1.0) * world  # this micro-batch's share of the mean
            with prec.cast():   # bf16 compute over fp32 master weights, in one process (FSDP2 casts when sharded)
                loss, st = model(mb.ids, cu_seqlens=mb.cu, head=head(mb))
            (loss * weight).backward()
            ntok = mb.mask.sum()
            totals += torch.stack([loss.detach() * ntok, st.clip_frac * ntok, st.ratio_mean * ntok,
                                   st.approx_kl * ntok, st.entropy * ntok]).double()
        totals = all_sum(totals.tolist(), device)
        loss_val = totals[0] / max(n_tokens, 1.0)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
            # Stop before the optimizer step: the weights stay as the last good checkpoint has them.
            raise FloatingPointError(f"non-finite loss ({loss_val}) or gradient norm ({grad_norm}); "
                                     f"stopping without applying this update")
        opt.step()
        stats["loss"] = loss_val
        if n_trained:  # the diagnostics describe the tokens that were trained on
            for k, v in zip(("clip_frac", "ratio_mean", "approx_kl", "entropy"), totals[1:]):
                stats[k] = v / n_trained
        stats["grad_norm"] = grad_norm
    stats["tokens"], stats["tokens_trained"] = n_tokens, n_trained
    return stats


def _all_max(x: int, device) -> int:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())

# -----------------------------------------------------------------------------
# Generation and scoring


def sampler_weights(model, infer):
    """The model the sampler should run, holding the policy's current weights. In one fp32 process
    that is the training model itself (infer is None). Otherwise `infer` is a plain, unsharded copy
    in the generation dtype, refreshed in place: under FSDP2 every parameter is all-gathered
    (rollout.inference_copy), so all ranks must call this together."""
    if infer is None:
        return model
    return inference_copy(model, into=infer)


def sample_responses(sampler, cache, tok, problems: list[Problem], prompt_ids: dict, n: int, temperature: float,
                     cfg: Config, seed: int) -> list:
    """n responses per problem, ordered problem-major: entries [i*n, (i+1)*n) belong to problems[i]."""
    if not problems:
        return []
    return generate(sampler, [prompt_ids[p.id] for p in problems], n=n, max_new_tokens=cfg.max_new_tokens,
                    temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k, eos_ids=eos_ids(tok),
                    seed=seed, cache=cache)


def make_cache(sampler, problems: list[Problem], prompt_ids: dict, max_new_tokens: int, max_slots: int,
               mem_fraction: float) -> KVCache:
    """The run's one KV cache. Every slot holds the longest prompt plus a full response; there are as
    many slots (up to max_slots) as mem_fraction of the free memory holds, measured once, here. So
    one long prompt means fewer slots for all (said once), and a prompt that cannot fit at all, past
    the model's positions or past what one slot holds in the budget, is an error naming its row."""
    p = next(sampler.parameters())
    free = free_memory(p.device)
    budget = None if free is None else int(mem_fraction * free)
    limits = []  # (positions, what sets them)
    max_pos = getattr(sampler.hf_config, "max_position_embeddings", None)
    if max_pos:
        limits.append((max_pos, f"the model's {max_pos} positions (max_position_embeddings)"))
    if budget is not None:
        room = longest_slot(sampler.config, budget, p.dtype)
        limits.append((room, f"the {room} positions one KV-cache slot holds in the sampler's memory budget "
                             f"({budget / 2**20:.1f} MiB: --gen_mem {mem_fraction} of {free / 2**20:.0f} MiB free)"))
    by_len = sorted(problems, key=lambda q: len(prompt_ids[q.id]), reverse=True)
    longest, n_prompt = by_len[0], len(prompt_ids[by_len[0].id])
    max_len = n_prompt + max_new_tokens
    for limit, what in limits:
        if max_new_tokens >= limit:
            raise ValueError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in {what}")
        if max_len > limit:
            more = sum(len(prompt_ids[q.id]) + max_new_tokens > limit for q in by_len) - 1
            raise ValueError(f"{longest.source} (id {longest.id!r}): the prompt is {n_prompt} tokens; with --max_new_tokens "
                             f"{max_new_tokens} it needs {max_len} positions, more than {what}"
                             + (f"; {more} more rows are too long too" if more else "")
                             + "; shorten or drop it, or lower --max_new_tokens")
    cache = KVCache.for_model(sampler, max_len=max_len, max_slots=max_slots, mem_bytes=budget)
    if cache.n_slots < max_slots:
        print0(f"sampler: {cache.n_slots} slots, not --gen_slots {max_slots}: --gen_mem {mem_fraction} of the "
               f"free memory ({budget / 2**20:.1f} MiB) holds no more at {max_len} positions a slot, a length set "
               f"by the longest prompt ({longest.source}, {n_prompt} tokens) plus --max_new_tokens")
    return cache


def score_responses(tok, problems: list[Problem], rolls: list, cfg: Config) -> list:
    """Rule-based rewards for every rollout at once, in parallel worker processes. A crashed or
    timed-out worker scores 0 for that rollout only, with Score.error saying why."""
    if not rolls:
        return []
    texts = [tok.decode(r.tokens, skip_special_tokens=True) for r in rolls]
    probs = [problems[r.prompt_idx] for r in rolls]
    return rewards.score_batch(texts, [p.domain for p in probs], [p.reference for p in probs],
                               workers=cfg.reward_workers or os.cpu_count(), language_penalty=cfg.language_penalty,
                               sandbox=cfg.sandbox)


def eos_ids(tok) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):  # chat models end turns with these
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None:
            ids.add(i)
    return sorted(ids)


def evaluate(sampler, cache, tok, tests: dict, prompt_ids: dict, cfg: Config, rank: int, world: int, device, seed: int,
             reward_fn=score_responses) -> dict:
    """pass@1 per domain, averaged over eval_k samples per held-out prompt (as the paper reports)."""
    out = {}
    for domain, problems in tests.items():
        mine = problems[rank::world]
        rolls = sample_responses(sampler, cache, tok, mine, prompt_ids, cfg.eval_k, cfg.eval_temperature, cfg, seed)
        scores = reward_fn(tok, mine, rolls, cfg)
        correct, count = all_sum([sum(s.accuracy for s in scores), len(scores)], device)
        out[f"pass1_{domain}"] = correct / max(count, 1)
    return out

# -----------------------------------------------------------------------------
# Checkpoints. One process saves one file, checkpoint.pt; several save a folder, checkpoint/, with
# torch.distributed.checkpoint (DCP), where each rank writes and reads only its own shards, so no
# rank ever holds the whole model and optimizer. Either kind resumes on any number of processes.
# Both are written under a temporary name and renamed when complete, so a crash or a full disk
# mid-save never costs the last good one, and both are verified before anything is loaded from them.
# Everything derives its randomness from (seed, step), so the saved position, weights, optimizer
# and HR buffer are enough for a resumed run to continue identically.

CKPT_FILE, CKPT_DIR = "checkpoint.pt", "checkpoint"


@dataclass
class TrainState:
    step: int = 0
    curriculum: Curriculum = field(default_factory=Curriculum)  # stage, epoch, position, HR buffer


# Options that may change between a run and its resumption; any other change makes it another run.
RESUMABLE = {"total_steps", "max_steps_this_run", "eval_every", "eval_prompts", "eval_k", "save_every",
             "resume", "reward_workers", "eval_domains", "sandbox", "gen_slots", "gen_mem", "out_dir",
             "grad_ckpt", "micro_tokens"}  # memory knobs: the memory plan may pick others on another GPU


def save_checkpoint(out_dir: str, model, opt, sched, state: TrainState, rank: int, cfg: Config):
    """Weights, AdamW's state, the scheduler, the run's position and HR buffer, and every rank's RNG:
    out_dir/checkpoint.pt from one process, out_dir/checkpoint/ (DCP shards) from several."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    world = dist.get_world_size() if dist.is_initialized() else 1
    # One process saves whole tensors, on the CPU; several save each rank's shards, as they are.
    options = StateDictOptions(full_state_dict=world == 1, cpu_offload=world == 1)
    tensors = {"model": get_model_state_dict(model, options=options)}
    # AdamW has no state until a step has had gradients (in one process, a step whose groups all had
    # zero advantage has none). Asked for its state then, torch makes one up by a step on zero
    # gradients, which changes the next update: so there is none to save, and none is loaded.
    if opt.state:
        tensors["optimizer"] = get_optimizer_state_dict(model, opt, options=options)
    small = {"scheduler": sched.state_dict(), "config": dataclasses.asdict(cfg), "rng": _gather(_rng_state()),
             "state": {"step": state.step} | state.curriculum.state_dict(),
             "has_optimizer_state": "optimizer" in tensors}
    if world == 1:
        _save_file(os.path.join(out_dir, CKPT_FILE), tensors | small)
        stale = os.path.join(out_dir, CKPT_DIR)  # a checkpoint of earlier, multi-process steps of this run
    else:
        _save_folder(os.path.join(out_dir, CKPT_DIR), tensors, small, rank, world)
        stale = os.path.join(out_dir, CKPT_FILE)
    if rank == 0 and os.path.exists(stale):
        shutil.rmtree(stale) if os.path.isdir(stale) else os.remove(stale)
    if dist.is_initialized():
        dist.barrier()


def _save_file(path: str, payload: dict):
    tmp = path + ".tmp"
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)  # torch's default, and what verify_checkpoint reads
    try:
        torch.save(payload, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # a full disk: torch says only "unexpected pos 576 vs 534"
        if os.path.exists(tmp):
            os.remove(tmp)
        raise _save_failed(path, _describe(e)) from e
    finally:
        torch.serialization.set_crc32_options(crc)
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one


def _save_folder(path: str, tensors: dict, small: dict, rank: int, world: int):
    """DCP writes each rank's shards into checkpoint.tmp/ and each rank hashes a share of the files;
    rank 0 adds the small part, train_state.pt, and manifest.json (every file's sha256), last."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    tmp, hashes, error = path + ".tmp", {}, None
    try:
        dcp.save(tensors, checkpoint_id=tmp)  # collective: a failed write on any rank raises on all
        hashes = _sha256_share(tmp, sorted(os.listdir(tmp)), rank, world)
    except (OSError, RuntimeError, CheckpointException) as e:
        error = _describe(e)
    shares = _gather((hashes, error))
    error = next((e for _, e in shares if e), None)
    if rank == 0 and error is None:
        try:
            torch.save(small, os.path.join(tmp, "train_state.pt"))
            hashes = {name: h for share, _ in shares for name, h in share.items()}
            hashes |= _sha256_share(tmp, ["train_state.pt"], 0, 1)
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump({"sha256": hashes}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _replace_folder(tmp, path)
        except OSError as e:
            error = _describe(e)
    error = next((e for e in _gather(error) if e), None)  # every rank learns of rank 0's error too
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failed(path, error)


def _replace_folder(tmp: str, path: str):
    """Put the complete folder tmp in place of path. A folder cannot be renamed over another, so the
    previous checkpoint steps aside first, as checkpoint.old/, and goes only once the new one is in
    place; start-up puts it back if a crash came between the two renames."""
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _save_failed(path: str, error: str) -> OSError:
    disk = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(disk):  # (a folder the failed save was to make)
        disk = os.path.dirname(disk)
    free = shutil.disk_usage(disk).free
    return OSError(f"could not save the checkpoint {path} ({error}); {free / 2**20:.1f} MiB are free on its disk. "
                   f"The partial checkpoint was removed and the previous one, if any, is kept: make room, then "
                   f"rerun the same command to resume from it")


def _describe(e: BaseException) -> str:
    # DCP gathers every rank's error into one exception whose text is their full tracebacks
    failures = getattr(e, "failures", None)
    if failures:
        return "; ".join(f"rank {r}: {_describe(f[0] if isinstance(f, tuple) else f)}" for r, f in failures.items())
    return f"{type(e).__name__}: {e}"


def _sha256_share(folder: str, names: list[str], rank: int, world: int) -> dict:
    """The sha256 of this rank's share of the files `names` in folder: the ranks read them in parallel."""
    out = {}
    for name in names[rank::world]:
        h = hashlib.sha256()
        with open(os.path.join(folder, name), "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


def find_checkpoint(out_dir: str) -> str | None:
    """The checkpoint to resume from, if any. Both kinds are there only if a save that changed the
    number of processes was cut off before it removed the older kind: the newer one is the run's."""
    found = [p for p in (os.path.join(out_dir, CKPT_FILE), os.path.join(out_dir, CKPT_DIR)) if os.path.exists(p)]
    return max(found, key=os.path.getmtime, default=None)


def verify_checkpoint(path: str, rank: int, world: int):
    """One clear error for a damaged checkpoint (empty, truncated, garbage, flipped bytes) before
    anything is loaded from it. A file: the CRC-32 that torch.save stores with each of its records
    (torch.load never checks them). A folder: each file's sha256 in manifest.json, the ranks sharing
    the reading. Either way every byte of data is read once."""
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, "manifest.json")) as f:
                expected = json.load(f)["sha256"]
            got = _sha256_share(path, sorted(expected), rank, world)
            bad = [name for name, h in got.items() if h != expected[name]]
            damage = f"{', '.join(bad)}: not the sha256 recorded in its manifest.json" if bad else None
        elif rank == 0:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            damage = None if bad is None else f"its record {bad} fails its CRC-32 check"
        else:
            damage = None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:  # absent, empty or not a checkpoint
        damage = f"{type(e).__name__}: {e}"
    raise_together(None if damage is None else RuntimeError(
        f"the checkpoint {path} is damaged ({damage}), so the run cannot resume from it. Start afresh with "
        f"--no_resume or another --out_dir (move the checkpoint away first if you want to keep it)"))


def open_checkpoint(path: str, cfg: Config, rank: int, world: int) -> dict:
    """Verify the checkpoint, check that it belongs to this run, and return its small part: config,
    position and HR buffer, scheduler, RNG. The weights come later, straight into the model."""
    verify_checkpoint(path, rank, world)
    file = os.path.join(path, "train_state.pt") if os.path.isdir(path) else path
    ck = torch.load(file, map_location="cpu", mmap=True, weights_only=False)  # mmap: no weight is read
    changed = {k: (v, getattr(cfg, k)) for k, v in ck["config"].items()
               if k not in RESUMABLE and getattr(cfg, k, None) != v}
    if changed:
        raise ValueError(f"{path} belongs to a run with other options ({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in changed.items())}); "
                         f"continue it with its options, or start afresh with --no_resume or another --out_dir")
    # Copied off the mapping (the RNG states are tensors): a tensor kept from it would keep the file,
    # and its disk space, after the next save replaced it.
    small = copy.deepcopy({k: ck[k] for k in ("config", "state", "scheduler", "rng")})
    return small | {"has_optimizer_state": ck.get("has_optimizer_state", True)}  # older ones always had it


def load_checkpoint(path: str, small: dict, model, opt, sched, rank: int, curriculum: Curriculum | None = None) -> TrainState:
    """Fill model and optimizer from the checkpoint at path, whatever number of processes wrote it,
    and return the run's position (the step, and curriculum, or a bare one, filled in). `small` is
    what open_checkpoint returned."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    world = dist.get_world_size() if dist.is_initialized() else 1
    with_opt = small["has_optimizer_state"]  # else AdamW stays as it is: without state, as it was at the save
    if os.path.isdir(path):
        # DCP: each rank reads just the pieces of its own shards, resharded if the number of
        # processes changed. It loads in place, into state dicts shaped like this run's.
        import torch.distributed.checkpoint as dcp
        tensors = {"model": get_model_state_dict(model)}
        if with_opt:
            tensors["optimizer"] = get_optimizer_state_dict(model, opt)
        with warnings.catch_warnings():  # that one process reads it is no surprise: it resumes on one
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(tensors, checkpoint_id=path)
        set_model_state_dict(model, tensors["model"])
        if with_opt:
            set_optimizer_state_dict(model, opt, tensors["optimizer"])
    else:
        # One file: rank 0 reads it and hands each rank its shards; the others read nothing. Not
        # memory-mapped: AdamW would keep the mapped tensors as its state, and with them the file's disk
        # space after the next save replaced it.
        ck = torch.load(path, map_location="cpu", weights_only=False) if rank == 0 else {"model": {}, "optimizer": {}}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1)
        set_model_state_dict(model, ck["model"], options=options)
        if with_opt and world == 1 and isinstance(ck["optimizer"]["param_groups"][0]["params"][0], int):
            opt.load_state_dict(ck["optimizer"])  # a checkpoint from before DCP: AdamW's state keyed by index
        elif with_opt:
            set_optimizer_state_dict(model, opt, ck["optimizer"], options=options)
    sched.load_state_dict(small["scheduler"])
    rng = small["rng"][rank] if rank < len(small["rng"]) else small["rng"][0]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    curriculum = curriculum or Curriculum()
    curriculum.load_state_dict(small["state"])
    return TrainState(step=small["state"]["step"], curriculum=curriculum)


def check_resumed_ids(path: str, cur: Curriculum, by_id: dict, data_files: list[str]):
    """A checkpoint names its prompts by id (this epoch's order, HR's buffer). If the data files were
    regenerated since, say so now, not as a KeyError on a prompt id some steps later."""
    ids = set(cur.order) | set(cur.history.outcomes) | set(cur.history.dropped)
    missing = sorted(ids - by_id.keys())
    if missing:
        raise ValueError(f"{path} names {len(missing)} prompt ids that are not in the data files "
                         f"({', '.join(data_files)}): {', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''}; "
                         f"were the files regenerated since? Restore the ones the run began with, or start "
                         f"afresh with --no_resume or another --out_dir")


def _rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate()}

# -----------------------------------------------------------------------------
# The run's folder, and stopping: never the model's folder, one run at a time, no partial saves
# left lying about, and a signal (Ctrl-C, a scheduler's SIGTERM) answered with a checkpoint.

LOCK_FILE = "run.lock"


def check_out_dir(out_dir: str, model_path: str):
    """Refuse an --out_dir that is, is inside, or holds the model: the run writes config.json,
    checkpoints and policy/ into --out_dir (an --out_dir equal to the model's folder once had the
    model's config.json overwritten before it was loaded). Compared resolved, symlinks followed."""
    out, model = os.path.realpath(out_dir), os.path.realpath(model_path)
    common = os.path.commonpath([out, model])
    if common not in (out, model):
        return
    relation = "is" if out == model else "is inside" if common == model else "holds"
    raise ValueError(f"--out_dir {out_dir} {relation} the model {model_path}"
                     + (f" (resolved: {out} and {model})" if (out, model) != (out_dir, model_path) else "")
                     + ": the run writes config.json, checkpoints and policy/ into --out_dir, and must not write "
                       "into the model's folder. Choose an --out_dir outside it")


@contextlib.contextmanager
def claimed_out_dir(out_dir: str, rank: int):
    """This run's hold on out_dir, for as long as it runs: an exclusive lock (two runs in one folder
    would interleave their metrics and overwrite each other's checkpoints), under which the partial
    checkpoints of a save that was cut off are then removed. Rank 0 holds it for all ranks."""
    lock, error = None, None
    if rank == 0:
        try:
            os.makedirs(out_dir, exist_ok=True)
            lock = lock_out_dir(out_dir)
            remove_partial_checkpoints(out_dir)
        except (OSError, RuntimeError) as e:
            error = e
            if lock is not None:
                lock.close()
    raise_together(error)  # and no rank looks for a checkpoint before rank 0 has tidied up
    try:
        yield
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def lock_out_dir(out_dir: str):
    """flock on out_dir/run.lock, which names its holder. The kernel drops a flock when the process
    ends, however it ends (SIGKILL included), so the lock cannot outlive its run. Returns the open
    lock file: the lock lasts until it is closed."""
    f = open(os.path.join(out_dir, LOCK_FILE), "a+")  # "a+": opening must not wipe the holder's name
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "its process has not written its name yet"
        f.close()
        raise RuntimeError(f"--out_dir {out_dir} is in use by another run ({holder}); two runs in one folder "
                           f"would mix their metrics and overwrite each other's checkpoints. Wait for it to end "
                           f"(or stop it), or choose another --out_dir") from None
    f.truncate(0)  # writes in "a+" mode go to the end, which is now the start
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{shlex.join(sys.argv)}\n")
    f.flush()
    return f


def remove_partial_checkpoints(out_dir: str):
    """A save cut off by a kill leaves checkpoint.pt.tmp or checkpoint.tmp/, as large as a checkpoint,
    until the next save: remove them. One cut off between the two renames of a folder checkpoint
    leaves the previous checkpoint as checkpoint.old/ with no checkpoint/: put it back. Called under
    the lock, so no save in progress is touched."""
    old, folder = os.path.join(out_dir, CKPT_DIR + ".old"), os.path.join(out_dir, CKPT_DIR)
    if os.path.isdir(old) and not os.path.exists(folder):
        os.replace(old, folder)
    for name in (CKPT_FILE + ".tmp", CKPT_DIR + ".tmp", CKPT_DIR + ".old"):
        path = os.path.join(out_dir, name)
        if not os.path.lexists(path):
            continue
        tree = os.path.isdir(path) and not os.path.islink(path)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) if tree \
            else os.lstat(path).st_size
        print0(f"removing {path} ({size / 2**20:.1f} MiB): what is left of a save that was cut off")
        shutil.rmtree(path) if tree else os.remove(path)


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (what a cluster scheduler sends before it preempts a job) and SIGHUP
    (the terminal went away) ask the run to stop at the end of the current step, with a checkpoint.
    A second signal ends the process at once, as that signal would have without this class. Not
    within a second of the first, though: under torchrun a Ctrl-C or a scheduler's SIGTERM reaches
    every worker twice, from the terminal or scheduler and again forwarded by torchrun."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.signum = 0  # the signal received; 0 while none has been
        self.since = 0.0
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # the only thread Python lets handle signals
            self.previous = {s: signal.signal(s, self._stop) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _stop(self, signum, frame):
        if not self.signum:
            self.signum, self.since = signum, time.monotonic()
            if not dist.is_initialized() or dist.get_rank() == 0:
                # os.write, not print: the handler may have interrupted a print, and sys.stdout is not re-entrant
                os.write(2, f"\n{signal.Signals(signum).name}: stopping at the end of this step, with a checkpoint; "
                            f"send a second signal to stop at once, without one\n".encode())
        elif time.monotonic() - self.since > 1.0:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # the default action now: the process ends, by that signal

    def agreed(self, device) -> int:
        """The signal to stop for, the same on every rank (any rank's), or 0 to go on. Called by all
        ranks at each step boundary, so that they all stop after the same step."""
        return _all_max(self.signum, device)


# -----------------------------------------------------------------------------
# The training loop


def main(argv=None, reward_fn=score_responses) -> int:
    """Start-up, then train(): the run's folder is checked against the model's and locked, and the
    stop signals are caught, for the length of the run. Returns the exit status: 0, or 128 + N when
    signal N stopped the run (with a checkpoint, as a shell reports a process killed by N).
    reward_fn(tok, problems, rolls, cfg) -> list[rewards.Score] scores rollouts, in training and in
    evaluation: a fork passes its own here (README, "Fork it")."""
    cfg = parse_config(argv)
    rank, world, device = setup_dist()
    check_out_dir(cfg.out_dir, resolve_model_path(cfg.model))
    with claimed_out_dir(cfg.out_dir, rank), StopSignals() as stop:
        status = train(cfg, rank, world, device, stop, reward_fn)
    if status:
        args = shlex.join(sys.argv[1:] if argv is None else argv)
        print0(f"to continue the run, rerun the same command, with the same options and --out_dir "
               f"(any number of processes will do): {'torchrun --nproc_per_node ' + str(world) if world > 1 else 'python'} "
               f"srpo.py {args}")
    return status


def train(cfg: Config, rank: int, world: int, device, stop: "StopSignals", reward_fn=score_responses) -> int:
    """The run: set-up, resume, the epoch/step loop, the final evaluation and export. Returns main's
    exit status."""
    # Precision, decided once: bf16 compute over fp32 master weights on a GPU (cast by FSDP2 when
    # sharded, by autocast when not), fp32 on a CPU; generation runs in the same compute dtype.
    prec = decide_precision(device.type, world, sharded=world > 1, dtype=cfg.dtype)
    gen_dtype = prec.compute
    torch.set_float32_matmul_precision("high" if prec.tf32 else "highest")  # TF32 for what stays fp32
    print0("config:\n" + "\n".join(f"  {k} = {v}" for k, v in dataclasses.asdict(cfg).items()))
    # A checkpoint to resume from is verified and checked against these options first: a refused
    # resume must leave the run's config.json as it was.
    ckpt = find_checkpoint(cfg.out_dir) if cfg.resume else None
    resumed = open_checkpoint(ckpt, cfg, rank, world) if ckpt else None
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    # --- the policy, its tokenizer, the data
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    model = build_policy(path, device, rank, world, param_dtype=gen_dtype)  # fp32 master weights, sharded if world > 1
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}: they do not belong together")
    stage_problems = {1: load_problems(cfg.math_train, "math", cfg.max_prompts, cfg.max_level)}
    stage_problems[2] = stage_problems[1] + load_problems(cfg.code_train, "code", cfg.max_prompts, cfg.max_level)
    tests = {d: load_problems(p, d, cfg.eval_prompts, cfg.max_level)
             for d, p in (("math", cfg.math_test), ("code", cfg.code_test)) if d in cfg.eval_domains.split(",")}
    check_unique_ids(stage_problems[2], *tests.values())
    by_id = {p.id: p for p in stage_problems[2]}
    every_prompt = stage_problems[2] + sum(tests.values(), [])
    prompt_ids = {p.id: encode_prompt(tok, p, cfg.one_shot) for p in every_prompt}
    if "code" in tests or cfg.stage1_epochs or cfg.total_steps > cfg.stage1_steps:
        # Generated code will run: the sandbox mode asked for must work here, checked now rather
        # than at stage 2. It never falls back to a weaker one (rewards.check_sandbox).
        print0(f"code sandbox: {rewards.check_sandbox(cfg.sandbox)}")

    # --- the memory plan: what each GPU will hold, with activation checkpointing and a micro-batch
    # budget that fit it, decided now (or a stop now, naming the option to change)
    usable = int(0.9 * torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else None
    plan = plan_memory(model.config, num_params(model), cfg, prec, world,  # 10% left for CUDA, NCCL, fragmentation
                       max_len=max(map(len, prompt_ids.values())) + cfg.max_new_tokens, capacity=usable)
    print0(plan)
    model.grad_ckpt = plan.grad_ckpt
    if plan.micro_tokens != cfg.micro_tokens:
        print0(f"memory plan: --micro_tokens {cfg.micro_tokens} lowered to {plan.micro_tokens} to fit")
        cfg = dataclasses.replace(cfg, micro_tokens=plan.micro_tokens)

    ref_model = None
    if cfg.kl_coef > 0:  # a frozen copy of the initial policy, only when the KL term is asked for
        ref_model = inference_copy(model, dtype=gen_dtype, device=device)  # the weights as loaded, before any resume
    # The sampler's copy: none in one fp32 process (it samples from the training model itself).
    infer = None
    if world > 1 or gen_dtype != torch.float32:
        infer = inference_copy(model, dtype=gen_dtype, device=device)
    # One KV cache for the whole run, sized for the longest prompt plus a full response. On a GPU
    # its recorded CUDA graphs are reused from step to step, which is why it is not rebuilt.
    cache = make_cache(infer or model, every_prompt, prompt_ids,
                       cfg.max_new_tokens, cfg.gen_slots, cfg.gen_mem)
    print0(f"sampler: {cache.n_slots} slots of {cache.max_len} positions, {gen_dtype}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)

    # --- where we are: fresh, or resumed from the last checkpoint
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    cur = Curriculum({s: [p.id for p in ps] for s, ps in stage_problems.items()}, cfg.prompts_per_step, cfg.seed,
                     cfg.hr, cfg.hr_return_after, cfg.stage1_steps, cfg.stage1_epochs)
    if resumed:
        st = load_checkpoint(ckpt, resumed, model, opt, sched, rank, cur)
        check_resumed_ids(ckpt, cur, by_id, [cfg.math_train, cfg.code_train])
        print0(f"resumed from {ckpt} at step {st.step} (stage {cur.stage}, epoch {cur.epoch})")
        if rank == 0:  # forget metrics logged after that checkpoint: those steps run again
            _truncate_metrics(metrics_path, st.step)
    else:
        st = TrainState(curriculum=cur)
        if rank == 0 and os.path.exists(metrics_path):
            os.remove(metrics_path)

    wandb = None
    if cfg.wandb_project and rank == 0:
        try:
            import wandb
        except ImportError:
            raise ImportError("--wandb_project needs the wandb package: pip install wandb") from None
        wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), name=os.path.basename(cfg.out_dir))

    def log(record: dict):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if wandb:
                wandb.log({f"{record['type']}/{k}": v for k, v in record.items() if k not in ("type", "step")},
                          step=record["step"])

    def run_eval(tag):
        sampler = sampler_weights(model, infer)
        res = evaluate(sampler, cache, tok, tests, prompt_ids, cfg, rank, world, device, seed=cfg.seed + 7919,
                       reward_fn=reward_fn)
        print0(f"eval ({tag}) step {st.step} | " + " | ".join(f"{k} {v:.3f}" for k, v in res.items()))
        log({"type": "eval", "step": st.step, "tag": tag, **res})

    if st.step == 0:
        run_eval("before")
    from tqdm import tqdm
    bar = tqdm(total=cfg.total_steps, initial=st.step, disable=rank != 0, desc="srpo", dynamic_ncols=True)
    steps_this_run = 0
    while st.step < cfg.total_steps:
        # --- 0. this step's prompts; the stage switch and the epoch end (HR) happen in there
        batch, events = cur.next_batch(st.step)
        for line, record in events:
            print0(line)
            if record:
                log(record)
        if batch is None:  # stage 2 ran dry: nothing left to learn
            break
        # --- 1. generate G rollouts for each of this rank's prompts
        t0 = time.time()
        mine = [by_id[pid] for pid in batch[rank::world]]
        sampler = sampler_weights(model, infer)
        seed = cfg.seed * 1_000_003 + st.step * 1009 + rank
        rolls = sample_responses(sampler, cache, tok, mine, prompt_ids, cfg.G, cfg.temperature, cfg, seed)
        t1 = time.time()
        # --- 2. score them
        scores = reward_fn(tok, mine, rolls, cfg)
        probs = [mine[r.prompt_idx] for r in rolls]
        t2 = time.time()
        # --- 3. group-normalised advantages
        # Correctness (acc) decides history resampling; the reward R_i adds the optional format
        # bonus and language penalty (Score.reward is accuracy less that penalty).
        acc = torch.tensor([s.accuracy for s in scores]).view(-1, cfg.G)             # (P, G)
        reward = torch.tensor([s.reward + cfg.format_coef * s.format for s in scores]).view(-1, cfg.G)
        adv, zero = group_advantages(reward, cfg.adv_eps)                            # (P, G), (P,)
        samples = [Sample(prompt_ids[probs[i].id] + r.tokens, len(prompt_ids[probs[i].id]), r.logprobs,
                          float(adv.view(-1)[i])) for i, r in enumerate(rolls)]
        # HR's buffer must be the same on every rank: share this step's outcomes
        outcomes = [(p.id, [bool(a) for a in acc[i].tolist()]) for i, p in enumerate(mine)]
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, outcomes)
            outcomes = [o for part in everyone for o in part]
        cur.record(outcomes)
        # --- 4. the policy update
        up = policy_update(model, opt, samples, cfg, device, ref_model, world, prec)
        sched.step()
        t3 = time.time()

        # --- 5. metrics: summed over ranks, one status line, one JSONL record
        resp_len = [len(r.tokens) for r in rolls]
        dom = [p.domain for p in probs]
        sums = all_sum([reward.sum().item(), len(scores), float(zero.sum()), float(len(zero)), sum(resp_len),
                        sum(s.accuracy for s, d in zip(scores, dom) if d == "math"), dom.count("math"),
                        sum(s.accuracy for s, d in zip(scores, dom) if d == "code"), dom.count("code"),
                        sum(1 for s in scores if s.error)], device)
        st.step += 1
        steps_this_run += 1
        n = max(sums[1], 1)
        m = {"type": "step", "step": st.step, "stage": cur.stage, "epoch": cur.epoch,
             "reward": sums[0] / n, "acc_math": sums[5] / max(sums[6], 1), "acc_code": sums[7] / max(sums[8], 1),
             "n_code": sums[8], "zero_adv": sums[2] / max(sums[3], 1), "resp_len": sums[4] / n,
             "reward_errors": sums[9], "gen_tokens": sums[4], "tokens": up["tokens"],
             "tokens_trained": up["tokens_trained"], "loss": up["loss"], "clip_frac": up["clip_frac"],
             "ratio": up["ratio_mean"], "kl": up["approx_kl"], "entropy": up["entropy"], "grad_norm": up["grad_norm"],
             "lr": sched.get_last_lr()[0], "t_gen": t1 - t0, "t_score": t2 - t1, "t_update": t3 - t2,
             "tok_s": sums[4] / max(t3 - t0, 1e-9)}
        log(m)
        bar.update(1)
        if rank == 0:
            bar.write(status_line(m))

        if cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < cfg.total_steps:
            run_eval("periodic")
        # --- 6. a step boundary: where a run may stop, on a signal or after --max_steps_this_run
        signalled = stop.agreed(device)  # every rank stops at the same step
        stop_early = cfg.max_steps_this_run and steps_this_run >= cfg.max_steps_this_run
        if signalled or stop_early or (cfg.save_every and st.step % cfg.save_every == 0 and st.step < cfg.total_steps):
            save_checkpoint(cfg.out_dir, model, opt, sched, st, rank, cfg)
        if signalled or stop_early:
            bar.close()
            why = signal.Signals(signalled).name if signalled else f"--max_steps_this_run {cfg.max_steps_this_run}"
            print0(f"stopped by {why} after step {st.step} ({steps_this_run} steps of this run); "
                   f"checkpoint saved in {find_checkpoint(cfg.out_dir)}")
            return 128 + signalled if signalled else 0
    bar.close()
    run_eval("after")
    save_checkpoint(cfg.out_dir, model, opt, sched, st, rank, cfg)
    export_policy(model, infer, tok, os.path.join(cfg.out_dir, "policy"), rank)
    if rank == 0:
        plot_run(metrics_path, os.path.join(cfg.out_dir, "run.png"))
    print0(f"done: {st.step} steps; metrics in {metrics_path}; policy in {os.path.join(cfg.out_dir, 'policy')}")
    close_dist()
    return 0


def status_line(m: dict) -> str:
    code = f" code {m['acc_code']:.2f}" if m["n_code"] else ""
    return (f"step {m['step']} | stage {m['stage']} | epoch {m['epoch']} | reward {m['reward']:.3f} | "
            f"acc math {m['acc_math']:.2f}{code} | zero_adv {m['zero_adv']:.2f} | len {m['resp_len']:.0f} | "
            f"clip {m['clip_frac']:.3f} | ent {m['entropy']:.2f} | gen/score/upd {m['t_gen']:.1f}/{m['t_score']:.1f}/"
            f"{m['t_update']:.1f}s | {m['tok_s']:.0f} tok/s")


def export_policy(model, infer, tok, out: str, rank: int):
    """The final policy in the Hugging Face format, loadable by transformers and serving engines."""
    if dist.is_initialized():
        full = sampler_weights(model, infer)  # every rank joins the all-gathers
        if rank == 0:
            full.save_pretrained(out, tokenizer=tok)
        dist.barrier()
    else:
        model.save_pretrained(out, tokenizer=tok)


def plot_run(metrics_path: str, png_path: str):
    """Four panels from the metrics JSONL: reward and held-out pass@1, accuracy per domain, response
    length, and what history resampling did at each epoch end. matplotlib is only needed here."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print0("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    recs = [json.loads(line) for line in open(metrics_path)]
    steps = [r for r in recs if r["type"] == "step"]
    x = [r["step"] for r in steps]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot(x, [r["reward"] for r in steps], label="train reward")
    ax[0, 0].plot(x, [r["zero_adv"] for r in steps], label="zero-advantage groups", alpha=0.7)
    for dom in ("math", "code"):
        ev = [r for r in recs if r["type"] == "eval" and f"pass1_{dom}" in r]
        ax[0, 0].plot([r["step"] for r in ev], [r[f"pass1_{dom}"] for r in ev], "o-", label=f"held-out pass@1 {dom}")
        pts = [(r["step"], r[f"acc_{dom}"]) for r in steps if dom == "math" or r["n_code"]]
        if pts:
            ax[0, 1].plot(*zip(*pts), label=f"train accuracy {dom}")
    ax[1, 0].plot(x, [r["resp_len"] for r in steps])
    hr = [r for r in recs if r["type"] == "epoch" and "dropped" in r]
    if hr:
        ax[1, 1].bar([r["step"] for r in hr], [r["dropped"] for r in hr], label="dropped (all correct)")
        ax[1, 1].bar([r["step"] for r in hr], [r["kept_all_wrong"] for r in hr], bottom=[r["dropped"] for r in hr],
                     label="kept, all wrong")
        ax[1, 1].bar([r["step"] for r in hr], [r["kept_mixed"] for r in hr],
                     bottom=[r["dropped"] + r["kept_all_wrong"] for r in hr], label="kept, mixed")
    for r in recs:
        if r["type"] == "stage":
            for a in ax.flat:
                a.axvline(r["step"], color="gray", ls="--", lw=0.8)
    titles = ["reward, zero-advantage fraction, held-out pass@1", "training accuracy per domain",
              "mean response length (tokens)", "history resampling at epoch ends (prompts)"]
    for a, t in zip(ax.flat, titles):
        a.set_title(t, fontsize=10)
        a.set_xlabel("step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _truncate_metrics(path: str, step: int):
    """Keep what was logged up to the checkpoint at `step`: its step and eval records. Stage and
    epoch records at `step` were logged *after* it was saved, and are logged again on resume."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_metrics(path) if r["step"] < step or (r["step"] == step and r["type"] in ("step", "eval"))]
    with open(path + ".tmp", "w") as f:  # then renamed: a crash while rewriting must not lose the log
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics JSONL file. A last line cut off mid-write (a full disk, a killed
    run) is dropped, with a note: the resumed run logs that record again. A bad line before the last
    one is damage that no crash explains: an error naming the line."""
    with open(path, errors="replace") as f:
        lines = f.readlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno < len(lines):
                raise ValueError(f"{path}:{lineno}: not a JSON record ({e.msg}), and only the last line can be "
                                 f"cut off by a crash; repair or delete that line, or start afresh with --no_resume "
                                 f"or another --out_dir") from None
            print0(f"{path}:{lineno}: dropping the last line, cut off mid-write ({len(line)} bytes: {line[:40]!r}...)")
    return records


if __name__ == "__main__":
    status = main()
    exit_torchrun(status)
    sys.exit(status)
