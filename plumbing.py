"""
The plumbing of a training run, kept out of srpo.py so that srpo.py reads as the algorithm. A first
read can skip this file. In order:
  - the command line: a dataclass of options becomes argparse flags, each value checked against its rule;
  - the data files' reader, and the packing of rollouts into micro-batches for the update;
  - processes: one, or torchrun with FSDP2 (one process per GPU, or CPU processes over gloo);
  - precision and the memory plan, decided once at start-up;
  - the sampler's KV cache, sized for the longest prompt;
  - checkpoints (one file from one process, a DCP folder from several; verified before loading);
  - the run's folder (its own: new, empty or marked by an earlier run; locked, tidied after a crash)
    and stop signals answered with a checkpoint;
  - Run: all of the above put together for srpo.main, plus the metrics log;
  - the status line, the plot, the export in the Hugging Face format.
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
from dataclasses import dataclass

import torch

import rewards
import torch.distributed as dist

from errors import MissingFile, UserError
from kernels.logprob import CHUNK_BYTES, REFERENCE_CHUNK_BYTES
from kernels.utils import chunk_rows
from model import (Transformer, _packed_attention, load_hf_config, load_tokenizer, num_params,
                   require_compiled_flex, resolve_model_path)
from rollout import KVCache, free_memory, inference_copy, longest_slot, slot_bytes

# -----------------------------------------------------------------------------
# The torch this code needs, checked before anything is loaded: an older release would fail late (after
# the model loaded, or at the first decode step). Public FSDP2 (`torch.distributed.fsdp.fully_shard`)
# came in 2.6, dynamo's `recompile_limit` in 2.7; on 2.7.1 tests still fail (compiled flex attention on
# the CPU, its triton's interpreter), so the minimum is the release they pass on, as requirements.txt says.
TORCH_MIN = (2, 13)


def check_torch():
    """Raises a one-line error naming the torch needed and the one found if torch.__version__ is older."""
    found = str(torch.__version__)
    release = found.split("+")[0].split(".")[:2]   # "2.7.1+cu126" -> ["2", "7"]: compared as numbers
    need = ".".join(map(str, TORCH_MIN))
    if len(release) < 2 or not all(x.isdigit() for x in release):
        raise RuntimeError(f"srpo needs torch >= {need}; cannot read the installed version {found!r}")
    if tuple(map(int, release)) < TORCH_MIN:
        raise RuntimeError(f"srpo needs torch >= {need}, found torch {found}: install a newer one "
                           f"(README, requirements.txt)")


# -----------------------------------------------------------------------------
# The command line: every field of a Config dataclass is a flag; its metadata holds the help and the
# values it allows ("range" in interval notation, or "choices"), checked here.



def parse_options(cls, argv=None, description: str = ""):
    """An instance of the dataclass cls from the command line (argv, or sys.argv), every value checked."""
    p = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        if f.type is bool or isinstance(f.default, bool):
            # --hr / --no_hr style switches
            p.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=f.default, help=f.metadata["help"])
            p.add_argument(f"--no_{f.name}", dest=f.name, action="store_false")
        else:
            rule = f"range {f.metadata['range']}" if "range" in f.metadata else \
                f"one of {', '.join(f.metadata['choices'])}" if "choices" in f.metadata else ""
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                           help=f.metadata["help"] + (f"; {rule}" if rule else ""))
    cfg = cls(**vars(p.parse_args(argv)))
    # Every option against its rule, now: a bad value would otherwise surface late (temperature 0 as
    # a ZeroDivisionError after the first generation) or not at all (warmup_steps -1: a negative
    # learning rate, gradient ascent).
    for f in dataclasses.fields(cls):
        value = getattr(cfg, f.name)
        if "range" in f.metadata and not in_range(value, f.metadata["range"]):
            raise UserError(f"--{f.name}={value!r} is outside its range {f.metadata['range']} ({f.metadata['help']})")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise UserError(f"--{f.name}={value!r}: choose one of {', '.join(f.metadata['choices'])}")
    return cfg


def in_range(value, interval: str) -> bool:
    """interval as written in maths: "[0, 1)" holds 0 and not 1; "inf" is no bound, so a value must be
    finite. NaN is in no range (every comparison with it is False)."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


# -----------------------------------------------------------------------------
# Data files: JSONL, validated on load so that a bad row fails loudly, with file, line and field.


def read_rows(path: str, domain: str, required: tuple, limit: int = 0, max_level: int = 0) -> list[tuple[dict, str]]:
    """The rows of a JSONL prompt file, each with its "file:line", validated: UTF-8, JSON objects without
    a repeated key or a number that is not finite, the required fields non-empty strings, ids unique,
    the domain (if given) this file's, the level (when max_level filters on it) a number. Any other
    row stops the run with an error naming file, line and field."""
    if not os.path.exists(path):
        raise MissingFile(f"{domain} data file {path!r} does not exist (make it with: python data/make_data.py)")
    if os.path.isdir(path):
        raise UserError(f"{domain} data file {path!r} is a folder, not a JSONL file")
    problems, seen = [], {}  # seen: id -> its line
    # Read bytes and decode each line ourselves: a text-mode file would report bad bytes as a bare
    # UnicodeDecodeError at a byte offset of a buffer, with no file or line.
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{domain} data file {path!r} cannot be read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                f"JSONL files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_no_repeated_keys)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except KeyError as e:  # json keeps the last of two equal keys, silently
                raise UserError(f"{path}:{lineno}: field {e.args[0]!r} appears twice in the row") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: a row must be a JSON object")
            # Python's json reads NaN, Infinity and 1e999 (which JSON does not allow) as floats; a NaN
            # level would pass every comparison of --max_level as False.
            for key, value in row.items():
                if not _finite(value):
                    raise UserError(f"{path}:{lineno}: field {key!r} holds {value!r}: numbers must be finite")
            for key in required:
                if key == "tests" and isinstance(row.get(key), list):  # the stdin/stdout form: its shape here
                    try:
                        check_stdin_cases(row[key])
                    except ValueError as e:
                        raise ValueError(f"{path}:{lineno}: field 'tests': {e}") from None
                    continue
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise UserError(f"{path}:{lineno}: field {key!r} is missing or not a non-empty string")
            if row.get("domain", domain) != domain:
                raise UserError(f"{path}:{lineno}: field 'domain' is {row['domain']!r}, this file holds {domain!r}")
            if row["id"] in seen:
                raise UserError(f"{path}:{lineno}: field 'id' {row['id']!r} repeats an earlier row (line {seen[row['id']]})")
            seen[row["id"]] = lineno
            if max_level:  # 'level' is only read (so only checked) when --max_level filters on it
                level = row.get("level", 0)
                if isinstance(level, bool) or not isinstance(level, (int, float)):
                    raise UserError(f"{path}:{lineno}: field 'level' is {level!r}: --max_level needs a number "
                                     f"(or no 'level', to keep the row at every level)")
                if level > max_level:
                    continue
            problems.append((row, f"{path}:{lineno}"))
            if limit and len(problems) == limit:
                break
    if not problems:
        raise UserError(f"{domain} data file {path!r} is empty" + (f" at levels <= {max_level}" if max_level else ""))
    return problems


def check_stdin_cases(tests: list) -> None:
    """Raise ValueError unless `tests` has the shape of the stdin/stdout form of code tests: a
    non-empty list of {"input": str, "output": str}, the program's stdin and its expected stdout."""
    if not tests:
        raise ValueError("a list of stdin/stdout cases must hold at least one case")
    for i, case in enumerate(tests):
        if not (isinstance(case, dict) and set(case) == {"input", "output"}
                and isinstance(case["input"], str) and isinstance(case["output"], str)):
            raise ValueError(f"case {i} is not an object of exactly two strings, 'input' and 'output'")


def _no_repeated_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    for i, k in enumerate(keys):
        if k in keys[:i]:
            raise KeyError(k)
    return dict(pairs)


def _finite(value) -> bool:
    """No NaN or infinity anywhere in a JSON value."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, dict)):
        return all(map(_finite, value.values() if isinstance(value, dict) else value))
    return True


def check_unique_ids(*problem_lists: list):
    """A problem is known by its id alone (the prompt table, HR's buffer, checkpoints), so an id in
    two files makes one problem silently stand in for the other: a test question trained on with a
    train answer, a code problem replacing a math one. The same row read twice is no clash: a file
    given as both train and test data (evaluating on the training set) mixes nothing."""
    first = {}
    for p in (p for problems in problem_lists for p in problems):
        if p.id in first and first[p.id].source != p.source:
            raise UserError(f"{p.source}: field 'id' {p.id!r} is also the id of {first[p.id].source}; "
                             f"ids must be unique across all train and test files")
        first.setdefault(p.id, p)


# -----------------------------------------------------------------------------
# Packing rollouts into micro-batches for the update (srpo.policy_update): each rollout whole, or
# with shared prompts a prompt once and its responses after it. Samples are srpo.Sample.


@dataclass
class MicroBatch:
    ids: torch.Tensor       # (1, T) packed inputs: each sequence without its last token
    cu: torch.Tensor        # (n+1,) sequence boundaries in ids
    targets: torch.Tensor   # (N,) next tokens: N = T, or with shared prompts the response tokens
    mask: torch.Tensor      # (N,) 1.0 where the target is a sampled response token
    adv: torch.Tensor       # (N,) the sequence's advantage on each of its tokens
    logp_old: torch.Tensor  # (N,)
    samples: list           # indices into the step's samples
    logp_ref: torch.Tensor | None = None  # (N,) under the initial policy, only for the KL term
    # Shared prompts (make_shared_micro_batch): each sequence is a prompt (branch 0) and responses
    # (branches 1, 2, ...) that attend to it (model.Transformer.forward), and rows (N,) says which
    # input row predicts each target. None: every row predicts the next one.
    branches: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def pack_micro_batches(samples: list, budget: int) -> list[list[int]]:
    """Greedy first-fit in sample order: sequences are never split, so one longer than the
    budget gets a micro-batch of its own."""
    return first_fit([len(s.tokens) - 1 for s in samples], budget)


def first_fit(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices of `sizes`, in order, cut into runs whose sizes sum to at most budget (an item larger
    than the budget is a run of its own)."""
    groups, cur, used = [], [], 0
    for i, n in enumerate(sizes):
        if cur and used + n > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups


def make_micro_batch(samples: list, idx: list[int], device) -> MicroBatch:
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


def prompt_units(samples: list, budget: int) -> list[list[int]]:
    """The rollouts grouped by prompt, in order of first appearance: each unit (a list of sample
    indices) is one prompt and as many of its responses as fit the budget with it, at least one."""
    by_prompt = {}
    for i, s in enumerate(samples):
        by_prompt.setdefault(tuple(s.tokens[:s.n_prompt]), []).append(i)
    units = []
    for idx in by_prompt.values():
        P = samples[idx[0]].n_prompt
        rows = [len(samples[i].tokens) - P - 1 for i in idx]  # a response's input rows: all but its last token
        units += [[idx[k] for k in run] for run in first_fit(rows, budget - P)]
    return units


def pack_shared_micro_batches(samples: list, budget: int) -> list[list[list[int]]]:
    """prompt_units cut into micro-batches by first fit: each micro-batch is a list of units, and a
    unit costs its prompt's rows once plus each response's rows (all but its last token)."""
    units = prompt_units(samples, budget)
    sizes = [samples[u[0]].n_prompt + sum(len(samples[i].tokens) - samples[i].n_prompt - 1 for i in u)
             for u in units]
    return [[units[k] for k in g] for g in first_fit(sizes, budget)]


def make_shared_micro_batch(samples: list, units: list[list[int]], device) -> MicroBatch:
    """Each unit packed as [prompt, response 1 (less its last token), response 2, ...]: the prompt is
    computed once for all its responses. A response's first token is predicted at the prompt's
    last row, each later token at the row of the token before it."""
    ids, branches, rows, targets, adv, logp_old, lengths, order = [], [], [], [], [], [], [0], []
    for unit in units:
        P, base = samples[unit[0]].n_prompt, len(ids)
        ids += samples[unit[0]].tokens[:P]
        branches += [0] * P
        for b, i in enumerate(unit, 1):
            s = samples[i]
            resp, start = s.tokens[P:], len(ids)
            ids += resp[:-1]
            branches += [b] * (len(resp) - 1)
            rows += [base + P - 1] + list(range(start, start + len(resp) - 1))
            targets += resp
            adv += [s.adv] * len(resp)
            logp_old += list(s.logp_old)
        lengths.append(len(ids) - base)
        order += unit
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)
    return MicroBatch(t(ids, torch.long)[None], t(lengths, torch.int32).cumsum(0).to(torch.int32),
                      t(targets, torch.long), torch.ones(len(targets), device=device), t(adv, torch.float32),
                      t(logp_old, torch.float32), order, branches=t(branches, torch.long), rows=t(rows, torch.long))


def empty_micro_batch(device) -> MicroBatch:
    # A rank with fewer micro-batches than the others still has to join every FSDP collective:
    # it runs this two-token batch whose mask is zero, so it adds nothing to loss or gradients.
    z = torch.zeros
    return MicroBatch(z(1, 2, dtype=torch.long, device=device), torch.tensor([0, 2], dtype=torch.int32, device=device),
                      z(2, dtype=torch.long, device=device), z(2, device=device), z(2, device=device), z(2, device=device), [])


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


def together(fn, *args):
    """fn(*args) on every rank, for a check of what the user gave: a UserError on any rank is raised on
    all of them at once. Raised by one rank alone, it ends that process, and torchrun stops the others,
    rank 0 perhaps before it could say why."""
    try:
        result, error = fn(*args), None
    except UserError as e:
        result, error = None, e
    raise_together(error)
    return result


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


def all_sum(values: dict, device) -> dict:
    """Sum named numbers over ranks (metrics, token counts); in one process, the values as given.
    Every rank must pass the same names, in the same order."""
    if not dist.is_initialized():
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def all_max(x: int, device) -> int:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_lists(items: list) -> list:
    """Every rank's list, concatenated in rank order; the list itself in one process."""
    return [x for part in _gather(items) for x in part]

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
        return (f"memory plan per {'GPU' if self.capacity else 'process'}, GiB: weights {g(self.weights)} | grads {g(self.grads)} | AdamW {g(self.optimizer)} | "
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
    static = (16 * N) // world + casts + sampler + reference   # weights 4 + grads 4 + AdamW 8 bytes a parameter
    if capacity is not None and static > capacity:
        raise MemoryError(f"the weights, gradients, AdamW state and their copies alone take {static / 2**30:.1f} GiB "
                          f"per GPU, more than the {capacity / 2**30:.1f} GiB usable: use more GPUs (FSDP2 divides the "
                          f"first three by their number) or a smaller model")
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
        else:       # the torch reference: a chunk's fp32 log-softmax, in the forward and again in the backward;
            # of z, log_softmax, its exp and their product (or their gradients) three are live at once
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

# -----------------------------------------------------------------------------
# The sampler: its weights, its KV cache, its end-of-sequence tokens.


def sampler_weights(model, infer):
    """The model the sampler should run, holding the policy's current weights. In one fp32 process
    that is the training model itself (infer is None). Otherwise `infer` is a plain, unsharded copy
    in the generation dtype, refreshed in place: under FSDP2 every parameter is all-gathered
    (rollout.inference_copy), so all ranks must call this together."""
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
    free = free_memory(device)
    if free is None:
        return None, "no limit known"
    return int(gen_mem * free), f"--gen_mem {gen_mem} of {free / 2**20:.0f} MiB free"


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
            raise UserError(f"{longest.source} (id {longest.id!r}): the prompt is {n_prompt} tokens; with --max_new_tokens "
                             f"{max_new_tokens} it needs {max_len} positions, more than {what}"
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


def eos_ids(tok) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):  # chat models end turns with these
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None:
            ids.add(i)
    return sorted(ids)


# -----------------------------------------------------------------------------
# Checkpoints. One process saves one file, checkpoint.pt; several save a folder, checkpoint/, with
# torch.distributed.checkpoint (DCP), where each rank writes and reads only its own shards, so no
# rank ever holds the whole model and optimizer. Either kind resumes on any number of processes.
# Both are written under a temporary name and renamed when complete, so a crash or a full disk
# mid-save never costs the last good one, and both are verified before anything is loaded from them.
# Everything derives its randomness from (seed, step), so the saved position, weights, optimizer
# and HR buffer are enough for a resumed run to continue identically.

CKPT_FILE, CKPT_DIR = "checkpoint.pt", "checkpoint"


# Options that may change between a run and its resumption; any other change makes it another run.
RESUMABLE = {"total_steps", "max_steps_this_run", "eval_every", "eval_prompts", "eval_k", "save_every",
             "resume", "reward_workers", "eval_domains", "eval_humaneval", "sandbox", "gen_slots", "gen_mem",
             "out_dir", "grad_ckpt", "micro_tokens",  # memory knobs: the memory plan may pick others on another GPU
             "accept_changed_data", "cuda_graphs"}  # cuda_graphs off: to get past a graph capture failure


def save_checkpoint(out_dir: str, model, opt, sched, position: dict, rank: int, cfg):
    """Weights, AdamW's state, the scheduler, the run's position (a dict: the step, the curriculum's
    state_dict), the options (cfg, a dataclass) and every rank's RNG: out_dir/checkpoint.pt from one
    process, out_dir/checkpoint/ (DCP shards) from several."""
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
             "state": position,
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
    raise_together(None if damage is None else UserError(
        f"the checkpoint {path} is damaged ({damage}), so the run cannot resume from it. Start afresh with "
        f"--no_resume or another --out_dir (move the checkpoint away first if you want to keep it)"))


def open_checkpoint(path: str, cfg, rank: int, world: int) -> dict:
    """Verify the checkpoint, check that it belongs to this run, and return its small part: config,
    position and HR buffer, scheduler, RNG. The weights come later, straight into the model."""
    verify_checkpoint(path, rank, world)
    file = os.path.join(path, "train_state.pt") if os.path.isdir(path) else path
    ck = torch.load(file, map_location="cpu", mmap=True, weights_only=False)  # mmap: no weight is read
    changed = {k: (v, getattr(cfg, k)) for k, v in ck["config"].items()
               if k not in RESUMABLE and getattr(cfg, k, None) != v}
    if changed:
        raise UserError(f"{path} belongs to a run with other options ({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in changed.items())}); "
                         f"continue it with its options, or start afresh with --no_resume or another --out_dir")
    # Copied off the mapping (the RNG states are tensors): a tensor kept from it would keep the file,
    # and its disk space, after the next save replaced it.
    small = copy.deepcopy({k: ck[k] for k in ("config", "state", "scheduler", "rng")})
    return small | {"has_optimizer_state": ck.get("has_optimizer_state", True)}  # older ones always had it


def load_checkpoint(path: str, small: dict, model, opt, sched, rank: int) -> dict:
    """Fill model and optimizer from the checkpoint at path, whatever number of processes wrote it,
    and return the run's position as saved (the step, the curriculum's state_dict). `small` is what
    open_checkpoint returned."""
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
    return small["state"]


def check_resumed_ids(path: str, ids: set, by_id: dict, data_files: list[str]):
    """A checkpoint names its prompts by id (this epoch's order, HR's buffer). If the data files were
    regenerated since, say so now, not as a KeyError on a prompt id some steps later."""
    missing = sorted(ids - by_id.keys())
    if missing:
        raise UserError(f"{path} names {len(missing)} prompt ids that are not in the data files "
                         f"({', '.join(data_files)}): {', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''}; "
                         f"were the files regenerated since? Restore the ones the run began with, or start "
                         f"afresh with --no_resume or another --out_dir")


def row_digest(p) -> str:
    """The sha256 of what the run reads from a data row (srpo.Problem): its domain, question and reference."""
    return hashlib.sha256(json.dumps([p.domain, p.question, p.reference]).encode()).hexdigest()


def check_resumed_rows(path: str, saved: dict, now: dict, by_id: dict, accept: bool):
    """Rows rewritten under the same ids since the checkpoint was saved (saved and now: id -> row_digest)
    stop a resume, naming them: HR's buffer and dropped prompts would carry over to other problems.
    --accept_changed_data continues on them, and says so."""
    changed = sorted(pid for pid in saved.keys() & now.keys() if saved[pid] != now[pid])
    if not changed:
        return
    shown = ", ".join(f"{pid!r} ({by_id[pid].source})" for pid in changed[:5]) \
        + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    if not accept:
        raise UserError(f"{path} was trained on other content in {len(changed)} data rows with the same "
                        f"ids: {shown}. Restore the files the run began with, add --accept_changed_data to "
                        f"continue on the changed rows, or start afresh with --no_resume or another "
                        f"--out_dir")
    print0(f"--accept_changed_data: resuming on {len(changed)} changed data rows: {shown}")


def _rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate()}

# -----------------------------------------------------------------------------
# The run's folder, and stopping: a folder of the run's own, never the model's, one run at a time,
# no partial saves left lying about, and a signal (Ctrl-C, a scheduler's SIGTERM) answered with a
# checkpoint.

LOCK_FILE = "run.lock"
# The run's mark on its folder, written into a new or empty folder before anything else. A folder is
# an earlier run's by this mark alone: config.json or metrics.jsonl are names other tools write too
# (a Hugging Face checkpoint holds a config.json), and a run must never overwrite or delete their files.
MARKER = ".srpo-run"


def check_out_dir(out_dir: str, model_path: str, resume: bool) -> str:
    """What --out_dir is, checked before anything is written: "new", "empty", or "own" (an earlier
    run's, by its marker). Anything else is refused, naming what is there; so is an --out_dir that is,
    is inside, or holds the model (one equal to the model's folder once had the model's config.json
    overwritten before it was loaded; compared resolved, symlinks followed), and an own folder that
    has a run's metrics but no checkpoint to resume from: starting afresh there takes --no_resume."""
    if not out_dir.strip():
        raise UserError("--out_dir is empty: name the folder the run writes into")
    out, model = os.path.realpath(out_dir), os.path.realpath(model_path)
    common = os.path.commonpath([out, model])
    if common in (out, model):
        relation = "is" if out == model else "is inside" if common == model else "holds"
        raise UserError(f"--out_dir {out_dir} {relation} the model {model_path}"
                        + (f" (resolved: {out} and {model})" if (out, model) != (out_dir, model_path) else "")
                        + ": the run writes config.json, checkpoints and policy/ into --out_dir, and must not write "
                          "into the model's folder. Choose an --out_dir outside it")
    if os.path.islink(out_dir) and not os.path.exists(out_dir):
        raise UserError(f"--out_dir {out_dir} is a symbolic link that leads nowhere (a loop, or its target "
                        f"is gone)")
    if not os.path.exists(out_dir):
        parent = os.path.dirname(os.path.abspath(out_dir))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"--out_dir {out_dir} cannot be made: {parent} is "
                            + ("a file" if not os.path.isdir(parent) else "not writable"))
        return "new"
    if not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file, not a folder")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir {out_dir} is not writable (a read-only place?)")
    names = sorted(os.listdir(out_dir))
    if not names:
        return "empty"
    if MARKER not in names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise UserError(f"--out_dir {out_dir} holds what no srpo run put there ({shown}): a run writes only "
                        f"into a new or empty folder, or one of an earlier run of its own (marked by its "
                        f"{MARKER} file). Choose another --out_dir")
    marker = os.path.join(out_dir, MARKER)
    try:
        with open(marker) as f:
            mark = json.load(f)
    except (OSError, ValueError):
        mark = None
    if not isinstance(mark, dict) or mark.get("created_by") != "srpo":
        raise UserError(f"{marker} is not the mark an srpo run writes, so --out_dir {out_dir} is not known "
                        f"to be a run's own folder. Choose another --out_dir")
    resumable = find_checkpoint(out_dir) or os.path.isdir(os.path.join(out_dir, CKPT_DIR + ".old"))
    if resume and not resumable and os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        raise UserError(f"--out_dir {out_dir} holds an earlier run (its metrics.jsonl) but no checkpoint to "
                        f"resume from: add --no_resume to start afresh there (the run's own files are "
                        f"replaced, nothing else), or choose another --out_dir")
    return "own"


class RunFolder:
    """The run's hold on --out_dir (rank 0's; the other ranks hold nothing), for as long as it runs:
    made if new, marked as the run's own, locked (two runs in one folder would interleave their
    metrics and overwrite each other's checkpoints), then tidied of the partial checkpoints of a save
    that was cut off, under the lock. undo() after a failed start leaves a folder that was new or
    empty as it was found: no folder, or an empty one."""

    def __init__(self, out_dir: str, model_path: str, resume: bool, rank: int):
        self.out_dir, self.lock, self.made, self.fresh = out_dir, None, None, False
        error = None
        if rank == 0:
            try:
                # Checked again, now: the folder may have changed since Run checked it.
                state = check_out_dir(out_dir, model_path, resume)
                if state == "new":
                    self.made = _make_folders(out_dir)
                self.lock = lock_out_dir(out_dir)
                self.fresh = state != "own"  # everything in it from now on is this run's
                if self.fresh:
                    with open(os.path.join(out_dir, MARKER), "x") as f:
                        json.dump({"created_by": "srpo", "run_id": os.urandom(8).hex(),
                                   "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv}, f)
                remove_partial_checkpoints(out_dir)
            except (OSError, UserError) as e:
                error = e if isinstance(e, UserError) else \
                    UserError(f"--out_dir {out_dir}: cannot write there ({type(e).__name__}: {e})")
                self.undo()
        raise_together(error)  # and no rank looks for a checkpoint before rank 0 has tidied up

    def release(self):
        if self.lock is not None:
            self.lock.close()  # releases the lock
            self.lock = None

    def undo(self):
        """After a failed start, remove what the start put into a folder that was new or empty."""
        if self.fresh:
            for name in (MARKER, "config.json", LOCK_FILE):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.out_dir, name))
        self.release()
        if self.made:  # the folders made for the run, innermost first, while they are empty
            folder = os.path.abspath(self.out_dir)
            with contextlib.suppress(OSError):
                while True:
                    os.rmdir(folder)
                    if folder == self.made:
                        break
                    folder = os.path.dirname(folder)


def _make_folders(path: str) -> str:
    """os.makedirs(path); returns the outermost folder it made."""
    path, outer = os.path.abspath(path), None
    probe = path
    while not os.path.exists(probe):
        outer, probe = probe, os.path.dirname(probe)
    os.makedirs(path, exist_ok=True)
    return outer


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
        raise UserError(f"--out_dir {out_dir} is in use by another run ({holder}); two runs in one folder "
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
    the lock, so no save in progress is touched, and only in the run's own folder (RunFolder): in
    another tool's folder a checkpoint.tmp/ is not ours to delete."""
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
        return all_max(self.signum, device)



# -----------------------------------------------------------------------------
# Run: what srpo.main needs around the algorithm, in the order it needs it. Making one starts the
# processes and checks, writing nothing, the run's folder and the model's config; entering loads the
# tokenizer, claims the folder, catches the stop signals, decides the precision, verifies a checkpoint
# to resume from and loads the policy; prepare() sizes the rest for the data; resume() puts the run
# where its checkpoint left it; log_*() write the metrics; step_boundary() saves and stops; finish()
# ends it.


class Run:
    def __init__(self, cfg, argv=None):
        self.cfg, self.argv = cfg, sys.argv[1:] if argv is None else argv
        self.rank, self.world, self.device = setup_dist()
        self.model_path = together(self._check, cfg)
        self.metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.steps_this_run = 0
        self.begun = False  # a record logged: from then on the run's folder stays, however the run ends
        self.wandb = self.bar = self.folder = None
        self._exit = contextlib.ExitStack()

    def _check(self, cfg) -> str:
        """The model's path, its config.json and the run's folder, checked before anything is written
        or loaded (a folder refused now costs no wait). A GGUF file's config is read with its weights:
        parsing its metadata takes about as long again."""
        path = resolve_model_path(cfg.model)
        check_out_dir(cfg.out_dir, path, cfg.resume)
        if not path.endswith(".gguf"):
            load_hf_config(path)
        return path

    def __enter__(self):
        self.tok = together(load_tokenizer, self.model_path)  # still nothing written
        self.folder = RunFolder(self.cfg.out_dir, self.model_path, self.cfg.resume, self.rank)
        self.stop = self._exit.enter_context(StopSignals())
        try:
            self._start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, *exc):
        if self.bar is not None:
            self.bar.close()
        self._exit.close()  # the signals' handlers back
        if exc_type is not None and not self.begun:
            self.folder.undo()  # a failed start: a folder found new or empty is left so
        else:
            self.folder.release()

    def _start(self):
        cfg, rank, world = self.cfg, self.rank, self.world
        # Precision, decided once: bf16 compute over fp32 master weights on a GPU (cast by FSDP2 when
        # sharded, by autocast when not), fp32 on a CPU; generation runs in the same compute dtype.
        self.prec = decide_precision(self.device.type, world, sharded=world > 1, dtype=cfg.dtype)
        torch.set_float32_matmul_precision("high" if self.prec.tf32 else "highest")  # TF32 for what stays fp32
        print0("config:\n" + "\n".join(f"  {k} = {v}" for k, v in dataclasses.asdict(cfg).items()))
        # A checkpoint to resume from is verified and checked against these options before the weights load.
        self.ckpt = find_checkpoint(cfg.out_dir) if cfg.resume else None
        self.resumed = open_checkpoint(self.ckpt, cfg, rank, world) if self.ckpt else None
        # fp32 master weights, sharded if world > 1
        self.model = build_policy(self.model_path, self.device, rank, world, param_dtype=self.prec.compute)
        # On a GPU the update's packed attention runs flex_attention compiled or not at all: check it
        # compiles here, now, rather than run it eagerly out of memory at the first step.
        impl = _packed_attention(True, self.prec.compute) if self.device.type == "cuda" else "sdpa"
        if impl == "flex" or (impl == "flash" and cfg.shared_prompts):  # flash-attn has no mask for branches
            require_compiled_flex(self.device, self.prec.compute)
        if len(self.tok) > self.model.config.vocab_size:
            raise UserError(f"the tokenizer has {len(self.tok)} tokens but the model's vocabulary is "
                            f"{self.model.config.vocab_size}: they do not belong together")

    def prepare(self, problems: list, prompt_ids: dict, sandbox: str = ""):
        """For these prompts (every one the run will generate for): the memory plan, decided now (or a
        stop now, naming the option to change), the frozen reference policy for the KL term, the
        sampler's copy of the policy and its KV cache, the optimizer and its schedule. Prints the
        plan: memory, generation (slots, rollouts, waves), rewards (workers, the sandbox mode
        `sandbox` that main checked, "" when no code runs)."""
        cfg, model, gen_dtype = self.cfg, self.model, self.prec.compute
        # 10% of the GPU left for CUDA, NCCL and fragmentation
        usable = int(0.9 * torch.cuda.get_device_properties(self.device).total_memory) if self.device.type == "cuda" else None
        rollouts = -(-cfg.prompts_per_step // self.world) * cfg.G   # a step's rollouts on the busiest rank
        self.plan = plan_memory(model.config, num_params(model), self.prec, self.world,
                                max_len=max(map(len, prompt_ids.values())) + cfg.max_new_tokens, capacity=usable,
                                micro_tokens=cfg.micro_tokens, grad_ckpt=cfg.grad_ckpt, gen_slots=cfg.gen_slots,
                                rollouts=rollouts, kl_coef=cfg.kl_coef, reference_loss=cfg.reference_loss)
        print0(self.plan)
        model.grad_ckpt = self.plan.grad_ckpt
        if self.plan.micro_tokens != cfg.micro_tokens:
            print0(f"memory plan: --micro_tokens {cfg.micro_tokens} lowered to {self.plan.micro_tokens} to fit")
        self.ref_model = None
        if cfg.kl_coef > 0:  # a frozen copy of the initial policy, only when the KL term is asked for
            self.ref_model = inference_copy(model, dtype=gen_dtype, device=self.device)  # as loaded, before any resume
        # The sampler's copy: none in one fp32 process (it samples from the training model itself).
        self.infer = None
        if self.world > 1 or gen_dtype != torch.float32:
            self.infer = inference_copy(model, dtype=gen_dtype, device=self.device)
        # One KV cache for the whole run, sized once for the longest prompt plus a full response. On a
        # GPU its recorded CUDA graphs are reused from step to step, which is why it is not rebuilt.
        budget, source = kv_budget(self.plan, self.device, cfg.gen_mem)
        self.cache = make_cache(self.infer or model, problems, prompt_ids, cfg.max_new_tokens, cfg.gen_slots,
                                budget, source, cfg.cuda_graphs)
        print0(f"sampler: {self.cache.n_slots} slots of {self.cache.max_len} positions, {gen_dtype}")
        print0(generation_plan(self.cache, rollouts, cfg.gen_slots, source))
        # As srpo.score_responses starts them: --reward_workers, 0 = this rank's share of the node's CPUs
        checked = f"{sandbox} (--sandbox {cfg.sandbox}, checked at start-up)" if sandbox else "none, no code runs"
        print0(f"rewards: {cfg.reward_workers or rewards.default_workers()} worker processes per rank | code sandbox: {checked}")
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)

    def resume(self, curriculum, by_id: dict, data_files: list[str]) -> int:
        """Fresh (step 0, an empty metrics log), or where the last checkpoint left the weights, AdamW,
        the schedule, the RNG and the curriculum (the metrics logged after it are forgotten: those
        steps run again), on the same data: the same ids, each row's content unchanged (or, with
        --accept_changed_data, changed and said so). Returns the step."""
        step = 0
        self.digests = {pid: row_digest(p) for pid, p in by_id.items()}  # saved with each checkpoint
        if self.resumed:
            position = load_checkpoint(self.ckpt, self.resumed, self.model, self.opt, self.sched, self.rank)
            curriculum.load_state_dict(position)
            check_resumed_ids(self.ckpt, curriculum.prompt_ids(), by_id, data_files)
            check_resumed_rows(self.ckpt, position["rows"], self.digests, by_id, self.cfg.accept_changed_data)
            step = position["step"]
            print0(f"resumed from {self.ckpt} at step {step} (stage {curriculum.stage}, epoch {curriculum.epoch})")
            if self.rank == 0:
                _truncate_metrics(self.metrics_path, step)
        elif self.rank == 0:  # afresh: an earlier run's log and checkpoint go (a crash before the first
            # save would otherwise resume that run's checkpoint under this run's log)
            for path in (self.metrics_path, os.path.join(self.cfg.out_dir, CKPT_FILE)):
                if os.path.exists(path):
                    os.remove(path)
            shutil.rmtree(os.path.join(self.cfg.out_dir, CKPT_DIR), ignore_errors=True)
        if self.rank == 0:  # only now: a refused start or resume leaves the run's config.json as it was
            with open(os.path.join(self.cfg.out_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(self.cfg), f, indent=2)
        if self.cfg.wandb_project and self.rank == 0:
            try:
                import wandb
            except ImportError:
                raise ImportError("--wandb_project needs the wandb package: pip install wandb") from None
            self.wandb = wandb
            wandb.init(project=self.cfg.wandb_project, config=dataclasses.asdict(self.cfg),
                       name=os.path.basename(self.cfg.out_dir))
        return step

    def sampler(self):
        """The model to generate with, holding the current weights (every rank calls this together)."""
        return sampler_weights(self.model, self.infer)

    def log(self, record: dict):
        """One record (a dict with a "type" and a "step") to metrics.jsonl, and to W&B if asked."""
        self.begun = True
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb:
                self.wandb.log({f"{record['type']}/{k}": v for k, v in record.items() if k not in ("type", "step")},
                               step=record["step"])

    def log_events(self, events: list):
        """The curriculum's (line to print, record to log or None) events."""
        for line, record in events:
            print0(line)
            if record:
                self.log(record)

    def log_eval(self, tag: str, step: int, res: dict):
        print0(f"eval ({tag}) step {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in res.items()))
        self.log({"type": "eval", "step": step, "tag": tag, **res})

    def log_step(self, m: dict):
        """A step's record, and its status line under the progress bar."""
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=self.cfg.total_steps, initial=m["step"] - 1, disable=self.rank != 0,
                            desc="srpo", dynamic_ncols=True)
        self.log(m)
        self.bar.update(1)
        if self.rank == 0:
            self.bar.write(status_line(m))

    def save(self, step: int, curriculum):
        position = {"step": step, "rows": self.digests} | curriculum.state_dict()
        save_checkpoint(self.cfg.out_dir, self.model, self.opt, self.sched, position, self.rank, self.cfg)

    def step_boundary(self, step: int, curriculum) -> int | None:
        """Where a run may stop: on a signal (every rank stops after the same step) or after
        --max_steps_this_run, with a checkpoint; else a periodic checkpoint if one is due. Returns
        main's exit status if the run stops here (0, or 128 + N for signal N), else None."""
        cfg = self.cfg
        self.steps_this_run += 1
        signalled = self.stop.agreed(self.device)
        stop_early = cfg.max_steps_this_run and self.steps_this_run >= cfg.max_steps_this_run
        if signalled or stop_early or (cfg.save_every and step % cfg.save_every == 0 and step < cfg.total_steps):
            self.save(step, curriculum)
        if not (signalled or stop_early):
            return None
        if self.bar is not None:
            self.bar.close()
        why = signal.Signals(signalled).name if signalled else f"--max_steps_this_run {cfg.max_steps_this_run}"
        print0(f"stopped by {why} after step {step} ({self.steps_this_run} steps of this run); "
               f"checkpoint saved in {find_checkpoint(cfg.out_dir)}")
        if signalled:
            print0(f"to continue the run, rerun the same command, with the same options and --out_dir "
                   f"(any number of processes will do): "
                   f"{'torchrun --nproc_per_node ' + str(self.world) if self.world > 1 else 'python'} "
                   f"srpo.py {shlex.join(self.argv)}")
            return 128 + signalled
        return 0

    def finish(self, step: int, curriculum):
        """The last checkpoint, the policy exported in the Hugging Face format, the plot."""
        if self.bar is not None:
            self.bar.close()
        self.save(step, curriculum)
        policy = os.path.join(self.cfg.out_dir, "policy")
        export_policy(self.model, self.infer, self.tok, policy, self.rank)
        if self.rank == 0:
            plot_run(self.metrics_path, os.path.join(self.cfg.out_dir, "run.png"))
        print0(f"done: {step} steps; metrics in {self.metrics_path}; policy in {policy}")
        close_dist()

# -----------------------------------------------------------------------------
# The metrics log, the status line, the plot and the export

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
        ax[1, 1].bar([r["step"] for r in hr], [r["dropped"] for r in hr], label="all correct: dropped (or, HR off, would be)")
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
                raise UserError(f"{path}:{lineno}: not a JSON record ({e.msg}), and only the last line can be "
                                 f"cut off by a crash; repair or delete that line, or start afresh with --no_resume "
                                 f"or another --out_dir") from None
            print0(f"{path}:{lineno}: dropping the last line, cut off mid-write ({len(line)} bytes: {line[:40]!r}...)")
    return records
