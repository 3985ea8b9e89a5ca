"""
Checkpoints. One process saves one file, checkpoint.pt; several save a folder, checkpoint/, with
torch.distributed.checkpoint (DCP), where each rank writes and reads only its own shards, so no rank
ever holds the whole model and optimizer. Either kind resumes on any number of processes. Both are
written under a temporary name and renamed when complete, so a crash or a full disk mid-save never
costs the last good one, and both are verified before anything is loaded from them. Everything
derives its randomness from (seed, step), so the saved position, weights, optimizer and HR buffer are
enough for a resumed run to continue identically. Also the metrics log's reading and truncation.
"""

import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import warnings
import zipfile

import torch
import torch.distributed as dist

from common import _gather, print0, raise_together
from errors import UserError


CKPT_FILE, CKPT_DIR = "checkpoint.pt", "checkpoint"


# Options that may change between a run and its resumption; any other change makes it another run.
RESUMABLE = {"total_steps", "max_steps_this_run", "eval_every", "eval_prompts", "eval_k", "save_every",
             "resume", "reward_workers", "eval_domains", "eval_humaneval", "sandbox", "gen_slots", "gen_mem",
             # memory knobs: the memory plan may pick others on another GPU
             "out_dir", "grad_ckpt", "micro_tokens",
             "accept_changed_data", "cuda_graphs"}  # cuda_graphs off: to get past a graph capture failure


def save_checkpoint(out_dir: str, model, opt, sched, position: dict, rank: int, cfg):
    """Weights, AdamW's state, the scheduler, the run's position (a dict: the step, the curriculum's
    state_dict), the options (cfg, a dataclass) and every rank's RNG: out_dir/checkpoint.pt from one
    process, out_dir/checkpoint/ (DCP shards) from several."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
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
    return OSError(f"could not save the checkpoint {path} ({error}); {free / 2**20:.1f} MiB are free on its "
                   f"disk. The partial checkpoint was removed and the previous one, if any, is kept: "
                   f"make room, then rerun the same command to resume from it")


def _describe(e: BaseException) -> str:
    # DCP gathers every rank's error into one exception whose text is their full tracebacks
    failures = getattr(e, "failures", None)
    if failures:
        return "; ".join(f"rank {r}: {_describe(f[0] if isinstance(f, tuple) else f)}"
                         for r, f in failures.items())
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
    found = [p for p in (os.path.join(out_dir, CKPT_FILE), os.path.join(out_dir, CKPT_DIR))
             if os.path.exists(p)]
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
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        damage = f"{type(e).__name__}: {e}"  # absent, empty or not a checkpoint
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
        was = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
        raise UserError(f"{path} belongs to a run with other options ({was}); continue it with its options, "
                        f"or start afresh with --no_resume or another --out_dir")
    # Copied off the mapping (the RNG states are tensors): a tensor kept from it would keep the file,
    # and its disk space, after the next save replaced it.
    small = copy.deepcopy({k: ck[k] for k in ("config", "state", "scheduler", "rng")})
    return small | {"has_optimizer_state": ck["has_optimizer_state"]}


def load_checkpoint(path: str, small: dict, model, opt, sched, rank: int) -> dict:
    """Fill model and optimizer from the checkpoint at path, whatever number of processes wrote it,
    and return the run's position as saved (the step, the curriculum's state_dict). `small` is what
    open_checkpoint returned."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
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
        ck = (torch.load(path, map_location="cpu", weights_only=False) if rank == 0
              else {"model": {}, "optimizer": {}})
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1)
        set_model_state_dict(model, ck["model"], options=options)
        if with_opt:
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
        shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise UserError(f"{path} names {len(missing)} prompt ids that are not in the data files "
                         f"({', '.join(data_files)}): {shown}; "
                         f"were the files regenerated since? Restore the ones the run began with, or start "
                         f"afresh with --no_resume or another --out_dir")


def row_digest(p) -> str:
    """The sha256 of what the run reads from a data row (datafile.Problem): its domain, question and
    reference."""
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


def truncate_metrics(path: str, step: int):
    """Keep what was logged up to the checkpoint at `step`: its step and eval records. Stage and
    epoch records at `step` were logged *after* it was saved, and are logged again on resume."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_metrics(path)
            if r["step"] < step or (r["step"] == step and r["type"] in ("step", "eval"))]
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
                raise UserError(f"{path}:{lineno}: not a JSON record ({e.msg}), and only the last line can "
                                f"be cut off by a crash; repair or delete that line, or start afresh with "
                                f"--no_resume or another --out_dir") from None
            print0(f"{path}:{lineno}: dropping the last line, cut off mid-write "
                   f"({len(line)} bytes: {line[:40]!r}...)")
    return records
