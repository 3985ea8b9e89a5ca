"""
Processes and collectives: the torch this code needs, one process or torchrun's (one per GPU with
FSDP2, or CPU processes over gloo), the policy built and sharded, and the few collectives the trainer
uses (sums, maxima, lists, an error raised on every rank at once). In one process each is a no-op.
Also what a process has to work with: the memory free on its device, and a whole (unsharded) copy of
a sharded policy for the sampler and the KL reference.
"""

import os
import sys

import torch
import torch.distributed as dist

from errors import UserError
from model import Transformer
from weights import load_hf_config, load_model


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
        return load_model(path, dtype=torch.float32, device=device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    with torch.device("meta"):
        model = Transformer(load_hf_config(path))
    shard_model(model, param_dtype=param_dtype)
    model.to_empty(device=device)  # this rank's shards, uninitialised until the broadcast below
    full, error = {}, None
    if rank == 0:
        try:
            full = load_model(path).state_dict()
        except (OSError, ValueError, ImportError) as e:  # unreadable weights: every rank must stop, not wait
            error = e
    raise_together(error)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
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
# Memory free on a device

def share_of_free_memory(device, fraction: float) -> int | None:
    """The sampler's memory budget where no memory plan sets one: `fraction` of the bytes free now
    on device (free_memory), or None where that cannot be known."""
    free = free_memory(device)
    return None if free is None else int(fraction * free)


def free_memory(device) -> int | None:
    """Bytes free now on device: the GPU's free memory, or on a CPU what the OS reports available
    (Linux's MemAvailable: free RAM plus caches it can drop; psutil elsewhere, if installed), and no
    more than a container's memory limit leaves. None where it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024  # the file says kB and means KiB
    except OSError:
        try:
            import psutil
            free = psutil.virtual_memory().available
        except ImportError:
            pass
    # In a container the OOM killer acts at the cgroup's limit, which MemAvailable (the host's) ignores.
    v1 = "/sys/fs/cgroup/memory/memory."
    cgroup_files = [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),   # cgroup v2
                    (v1 + "limit_in_bytes", v1 + "usage_in_bytes")]
    for limit_file, usage_file in cgroup_files:
        try:
            with open(limit_file) as f, open(usage_file) as g:
                limit, usage = f.read().strip(), int(g.read())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 1 << 60:  # v1 writes "no limit" as a huge number
            left = max(0, int(limit) - usage)
            free = left if free is None else min(free, left)
        break
    return free


# -----------------------------------------------------------------------------
# Whole weights for generation and the KL reference (FSDP2)


@torch.no_grad()
def inference_copy(model, into: Transformer | None = None, dtype=torch.bfloat16, device=None) -> Transformer:
    """A plain, unsharded, no-grad copy of `model` for generation, or `into` refreshed in place.
    `model` may be a plain Transformer or one wrapped by FSDP2's fully_shard, whose parameters are
    DTensor shards: each is cast to the copy's dtype and all-gathered with full_tensor(), one at a
    time (so at most one whole parameter is in flight), and copied into the copy. Under FSDP every
    rank must call this."""
    if into is None:
        p = next(model.parameters())
        device = device or (p.device_mesh.device_type if hasattr(p, "device_mesh") else p.device)
        with torch.device("meta"):  # no random initialisation: every weight is copied in below
            into = Transformer(model.hf_config)
        into = into.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    ours = into.state_dict()
    for name, t in model.state_dict().items():
        # Cast this rank's shard first, then gather: rounding each element commutes with putting the
        # shards together, so the result is the same as gathering fp32 and casting, for half the bytes
        # over the interconnect and no fp32 copy of the whole matrix.
        t = t.to(ours[name].dtype)
        if hasattr(t, "full_tensor"):   # a DTensor: gather the shards
            t = t.full_tensor()
        ours[name].copy_(t)
    return into
