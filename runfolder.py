"""
The run's folder: one of the run's own, never the model's, one run at a time (a lock), and no
partial saves left lying about.
"""

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time

from checkpoint import CKPT_DIR, CKPT_FILE, find_checkpoint
from common import print0, raise_together
from errors import UserError


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
        resolved = f" (resolved: {out} and {model})" if (out, model) != (out_dir, model_path) else ""
        raise UserError(f"--out_dir {out_dir} {relation} the model {model_path}" + resolved
                        + ": the run writes config.json, checkpoints and policy/ into --out_dir, and must "
                          "not write into the model's folder. Choose an --out_dir outside it")
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
                        f"would mix their metrics and overwrite each other's checkpoints. Wait for it to "
                        f"end (or stop it), or choose another --out_dir") from None
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
