"""The trainer against what happens to real runs: a signal to stop (Ctrl-C, a scheduler's SIGTERM), a
full disk, a damaged checkpoint, a badly chosen or shared --out_dir, a save cut off mid-write, and a
checkpoint resumed on another number of processes."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import harness
import checkpoint
import runfolder
import curriculum
import srpo
from errors import UserError
from weights import load_model
from common import inference_copy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tests", "harness.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# 8 math prompts, 2 a step: HR acts at step 4, stage 2 begins at step 3, evaluations at steps 2 and 4.
COMMON = ["--total_steps", "5", "--stage1_steps", "3", "--eval_every", "2"]
# Some tests write the folder checkpoint of several processes from this one process, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return harness.make_world(str(tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """The out_dir of a finished 2-step run, to copy: step 2 trains (step 1 does not), so its
    checkpoint holds AdamW's state too."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run(world, out, total_steps=2)
    return out


def copy_run(trained, out):
    shutil.copytree(trained, out)
    return out


def run(world, out, reward=harness.contains_reference, **over) -> list[dict]:
    """srpo.main in this process, with the harness's reward; the run's metrics records."""
    status = srpo.main(harness.world_args(world, str(out), **over), reward_fn=reward)
    assert status == 0, f"the run ended with status {status}"
    return records(out)


def records(out) -> list[dict]:
    """metrics.jsonl without the timings, which differ from run to run."""
    timing = {"t_gen", "t_score", "t_update", "tok_s"}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in f]


def launch(world, out, *opts, procs=1) -> subprocess.Popen:
    """A real training process (tests/harness.py, under torchrun if procs > 1), stdout and stderr in
    one pipe, in a process group of its own (as a terminal's foreground job or a scheduler's job is)."""
    cmd = [HARNESS, world, str(out), *opts]
    if procs > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--standalone"] + cmd
    return subprocess.Popen([sys.executable] + cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def read_until(p: subprocess.Popen, text: str) -> str:
    """p's output up to and including the first line that holds text."""
    seen = []
    for line in p.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"the run ended (status {p.wait()}) without printing {text!r}:\n{''.join(seen)[-3000:]}")


def finish(world, out, *opts):
    """Run harness.py to the end, in a subprocess; its output."""
    p = subprocess.run([sys.executable, HARNESS, world, str(out), *opts], env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"the run failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def step_of(out) -> int:
    """The step of out's checkpoint, whichever kind it is."""
    path = checkpoint.find_checkpoint(str(out))
    return torch.load(os.path.join(path, "train_state.pt") if os.path.isdir(path) else path, weights_only=False)["state"]["step"]


def as_folder_checkpoint(out):
    """Rewrite out/checkpoint.pt as the folder of DCP shards that several processes save (written by
    one here, which DCP allows)."""
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["has_optimizer_state"], "the run should have trained, so that AdamW's state is in the folder too"
    checkpoint._save_folder(str(out / "checkpoint"), {"model": ck["model"], "optimizer": ck["optimizer"]},
                      {k: ck[k] for k in ("scheduler", "config", "state", "rng", "has_optimizer_state")}, rank=0, world=1)
    (out / "checkpoint.pt").unlink()

# -----------------------------------------------------------------------------
# 15.9: stopping on a signal


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_resumes_the_same_run(world, tmp_path):
    """A SIGTERM finishes the step and saves; resumed, the run equals an uninterrupted one (issue 15.9).

    SIGTERM (a scheduler's notice before preemption) ended the run silently, saving nothing. It must
    finish the step, save, say how to resume and exit 143; resumed, the run equals an uninterrupted one."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    finish(world, whole, *COMMON)
    p = launch(world, cut, *COMMON)
    read_until(p, "step 1 |")
    p.send_signal(signal.SIGTERM)
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 128 + signal.SIGTERM, f"exit status {p.returncode}, expected 143:\n{text[-3000:]}"
    k = step_of(cut)
    assert 1 <= k < 5, f"the run should have stopped mid-way, not at step {k}"
    assert f"stopped by SIGTERM after step {k}" in text and "rerun the same command" in text, text[-2000:]
    assert str(cut) in text.split("rerun the same command")[1], "the resume hint must carry the run's --out_dir"
    assert [r["step"] for r in records(cut) if r["type"] == "step"] == list(range(1, k + 1)), \
        "the checkpoint must hold the last step that was logged"
    assert not (cut / "policy").exists(), "a stopped run must not export as if it had finished"
    finish(world, cut, *COMMON)
    assert records(cut) == records(whole), "the stopped and resumed run differs from the uninterrupted one"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_and_sighup_stop_with_a_checkpoint_too(world, tmp_path, sig):
    """Ctrl-C (SIGINT) and SIGHUP stop like SIGTERM: a checkpoint, exit 128 + N, no traceback (issue 15.9).

    Ctrl-C printed a raw traceback and saved nothing; SIGHUP (the terminal closed) ended the run
    silently. Both must stop like SIGTERM: a checkpoint, exit 128 + N."""
    out = tmp_path / "run"
    p = launch(world, out, *COMMON)
    read_until(p, "step 1 |")
    p.send_signal(sig)
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 128 + sig, f"exit status {p.returncode}:\n{text[-3000:]}"
    assert "Traceback" not in text, f"a signal must not end the run with a traceback:\n{text[-3000:]}"
    assert f"stopped by {sig.name} after step {step_of(out)}" in text


@pytest.mark.slow
def test_a_second_signal_ends_the_run_at_once(world, tmp_path):
    """A second signal ends the process at once, even while it is stuck after a save (issue 15.9).

    The first signal asks for a stop at the end of the step; a second one must end the process at
    once, even while it is stuck (here asleep right after a save)."""
    p = launch(world, tmp_path / "run", *COMMON, "--save_every", "1", "--pause_after_save", "1")
    try:
        read_until(p, "PAUSED")
        p.send_signal(signal.SIGTERM)
        read_until(p, "send a second signal to stop at once")
        time.sleep(1.5)  # within a second, it would count as the first one delivered twice (see the next test)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -signal.SIGTERM, f"the second signal should have ended the process, status {p.returncode}"


@pytest.mark.slow
def test_two_processes_stop_at_one_step_and_resume_in_one_process(world, tmp_path):
    """SIGTERM to a 2-process job stops both ranks after one step, and one process resumes (issues 15.9, 11.4).

    Under torchrun a scheduler's SIGTERM reaches every process of the job, and each worker again from
    torchrun; taken as one request, the ranks agree on the step to stop after and save one checkpoint
    of DCP shards, which a single process then resumes and finishes."""
    out = tmp_path / "two"
    p = launch(world, out, *COMMON, procs=2)
    read_until(p, "step 1 |")
    os.killpg(p.pid, signal.SIGTERM)  # torchrun and both workers, as a scheduler (or Ctrl-C: SIGINT) does
    text = p.communicate(timeout=300)[0]
    assert p.returncode != 0, "a stopped run must not report success"
    folder = out / "checkpoint"
    assert (folder / "manifest.json").exists() and not (out / "checkpoint.pt").exists(), os.listdir(out)
    k = step_of(out)
    assert text.count(f"stopped by SIGTERM after step {k}") == 1, f"rank 0 alone should report the stop:\n{text[-3000:]}"
    resumed = finish(world, out, *COMMON)
    assert f"resumed from {folder} at step {k}" in resumed, resumed[-2000:]
    assert [r["step"] for r in records(out) if r["type"] == "step"] == [1, 2, 3, 4, 5]
    assert (out / "checkpoint.pt").exists() and not folder.exists(), "one process saves a file, replacing the folder"

# -----------------------------------------------------------------------------
# 11.4: loading without whole copies on every rank; checkpoints between process counts


def test_building_the_model_draws_no_random_initialisation(world):
    """Building a model to load into draws no random numbers, and its rotary table is still right (issue 11.4).

    Every model (the policy, the sampler's copy) was first built with random weights on the CPU, a
    whole throwaway copy, then overwritten. Built on the meta device, it draws no random numbers, and
    the rotary table (computed, not loaded) is still right."""
    state = torch.get_rng_state()
    model = load_model(f"{world}/model")
    copy = inference_copy(model, dtype=torch.float32)
    assert torch.equal(torch.get_rng_state(), state), "building a model to load into drew random numbers"
    assert torch.equal(copy.rotary.inv_freq, model.rotary.inv_freq) and model.rotary.inv_freq.device.type == "cpu"
    ids = torch.randint(0, 13, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), copy(ids)), "the sampler's copy computes something else"


def test_a_save_before_adamw_has_state_leaves_it_without(world, tmp_path):
    """Saving, or resuming, before AdamW has state leaves the optimizer without state, as it was.

    AdamW has no state until a step has had gradients (every group of the steps so far had zero
    advantage). Asked for its state then, torch makes one up by a step on zero gradients, which
    changed the next update of a run that had saved, and of one resumed from that save."""
    model = load_model(f"{world}/model")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = srpo.Config()
    checkpoint.save_checkpoint(str(tmp_path), model, opt, sched, {"step": 1} | curriculum.Curriculum().state_dict(), 0, cfg)
    assert not opt.state, "saving gave the running optimizer a state"
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.load_checkpoint(path, checkpoint.open_checkpoint(path, cfg, 0, 1), model, opt, sched, 0)
    assert not opt.state, "resuming gave the optimizer a state it did not have when saved"


@pytest.mark.slow
def test_checkpoints_move_exactly_between_process_counts(world, tmp_path):
    """A checkpoint moves between 1 and 2 processes with its weights and AdamW state bit for bit (issue 11.4).

    A checkpoint of 2 processes (a folder of DCP shards) resumes on 1, and one of 1 (a file, which
    rank 0 alone reads and broadcasts) on 2."""
    from dist_checkpoint_check import check
    script = os.path.join(ROOT, "tests", "dist_checkpoint_check.py")

    def go(procs, out, mode):
        state = tmp_path / f"{out.name}-{mode}-{procs}.pt"
        if procs == 1:  # in this process: one less start-up of python, torch and transformers
            check(f"{world}/model", str(out), mode, str(state))
        else:
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                                "--standalone", script, f"{world}/model", str(out), mode, str(state)],
                               env=ENV, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, f"{mode} on {procs} processes failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        return torch.load(state, weights_only=False)

    two, one = tmp_path / "two", tmp_path / "one"
    for saved_by, loaded_by, out in ((2, 1, two), (1, 2, one)):
        saved, loaded = go(saved_by, out, "save"), go(loaded_by, out, "load")
        what = f"saved by {saved_by}, loaded by {loaded_by}"
        for name, w in saved["model"].items():
            assert torch.equal(w, loaded["model"][name]), f"{what}: weight {name} differs"
        for name, s in saved["optimizer"]["state"].items():
            for k, v in s.items():
                assert torch.equal(v, loaded["optimizer"]["state"][name][k]), f"{what}: AdamW {k} of {name} differs"
        same = lambda groups: json.loads(json.dumps(groups))  # a broadcast may turn betas' tuple into a list
        assert same(saved["optimizer"]["param_groups"]) == same(loaded["optimizer"]["param_groups"]), what
        assert loaded["sched_steps"] == saved["sched_steps"] == 1, what
    assert (two / "checkpoint" / "manifest.json").exists() and (one / "checkpoint.pt").exists()
    start = load_model(f"{world}/model").state_dict()
    assert any(not torch.equal(start[k], w) for k, w in saved["model"].items()), "no step was taken: vacuous"

# -----------------------------------------------------------------------------
# 15.10: a full disk, and the metrics log it tears


def test_torn_last_metrics_line_is_dropped_on_resume(world, trained, tmp_path, capsys):
    """A torn last line of metrics.jsonl is dropped on resume, and the drop is reported (issue 15.10).

    A full disk tore the last line of metrics.jsonl, and every later resume failed on it."""
    out = copy_run(trained, tmp_path / "torn")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "step", "step": 3, "rew')  # what a write cut off by ENOSPC leaves
    recs = run(world, out, total_steps=3)
    assert [r["step"] for r in recs if r["type"] == "step"] == [1, 2, 3]
    assert "dropping the last line, cut off mid-write" in capsys.readouterr().out, "the dropped line must be reported"


def test_damaged_metrics_line_before_the_last_names_file_and_line(world, trained, tmp_path):
    """Issue 15.10: only the last line can be torn by a crash; a bad line before it is an error naming file:line."""
    out = copy_run(trained, tmp_path / "bad")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    (out / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        run(world, out, total_steps=3)


@contextlib.contextmanager
def small_disk(path, size: int):
    """A tmpfs of `size` bytes mounted at path: a disk that fills up. Mounting needs root."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_during_a_save_names_path_and_free_space_and_keeps_the_last_checkpoint(world, trained, tmp_path):
    """A save on a full disk says where and how much is free, and keeps the previous checkpoint (issue 15.10).

    A full disk mid-save raised torch's bare "unexpected pos 576 vs 534" and left the partial
    checkpoint.pt.tmp behind. Both kinds of checkpoint must say where and how much space is free,
    remove the partial one and keep the previous one."""
    first = trained
    size = (first / "checkpoint.pt").stat().st_size
    with small_disk(tmp_path / "disk", size * 3 // 2) as disk:  # room for one checkpoint, not for a second
        out = disk / "run"
        out.mkdir()
        for name in ("checkpoint.pt", "metrics.jsonl", "config.json", runfolder.MARKER):
            shutil.copy(first / name, out / name)
        before = (out / "checkpoint.pt").read_bytes()
        full = r"could not save the checkpoint .*{} \(.*\); [0-9.]+ MiB are free on its disk.*previous one, if any, is kept"
        with pytest.raises(OSError, match=full.format("checkpoint.pt")):
            run(world, out, total_steps=3, save_every=1)
        assert (out / "checkpoint.pt").read_bytes() == before, "the previous checkpoint must survive a failed save"
        assert not (out / "checkpoint.pt.tmp").exists(), "the partial checkpoint must be removed"
        assert step_of(out) == 2
        # The folder that several processes save: the same, for DCP's errors
        ck = torch.load(first / "checkpoint.pt", weights_only=False)
        with pytest.raises(OSError, match=full.format("checkpoint")):
            checkpoint._save_folder(str(out / "checkpoint"), {"model": ck["model"], "optimizer": ck["optimizer"]},
                              {"state": ck["state"]}, rank=0, world=1)
        assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint").exists()

# -----------------------------------------------------------------------------
# 15.11: damaged checkpoints


def flip_a_byte_in(path, tensor: torch.Tensor):
    """Flip one bit in the middle of tensor's bytes where they lie in the file at path."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.numpy().tobytes())
    assert at >= 0, "the tensor's bytes are not in the file"
    data[at + tensor.numel() * tensor.element_size() // 2] ^= 0x40
    path.write_bytes(data)


@pytest.mark.parametrize("damage", ["flipped", "empty", "garbage", "truncated"])
def test_damaged_checkpoint_file_is_refused_with_one_clear_message(world, trained, tmp_path, damage):
    """A damaged checkpoint file is refused by name, with a way to start afresh that works (issue 15.11).

    A checkpoint with a flipped byte in AdamW's state loaded silently; an empty, garbage or truncated
    one failed deep inside torch.load. All must be refused by name, saying how to start afresh."""
    out = copy_run(trained, tmp_path / damage)
    ck = out / "checkpoint.pt"
    if damage == "flipped":
        state = torch.load(ck, weights_only=False)["optimizer"]["state"]
        flip_a_byte_in(ck, next(iter(state.values()))["exp_avg"])
    else:
        data = ck.read_bytes()
        ck.write_bytes({"empty": b"", "garbage": os.urandom(4096), "truncated": data[:len(data) // 2]}[damage])
    with pytest.raises(UserError, match=r"the checkpoint \S*checkpoint.pt is damaged .*--no_resume or another --out_dir"):
        run(world, out, total_steps=3)
    if damage == "empty":
        assert [r["step"] for r in run(world, out, total_steps=1, resume=False) if r["type"] == "step"] == [1], \
            "--no_resume, the way out the message names, must work"


def test_damaged_checkpoint_folder_is_refused_naming_the_file(world, trained, tmp_path):
    """A folder checkpoint with a corrupt shard or no manifest is refused, naming the file (issue 15.11).

    The same for the folder of DCP shards that several processes save: a shard with a flipped byte,
    or a folder without its manifest, is refused before anything is loaded from it."""
    out = copy_run(trained, tmp_path / "folder")
    as_folder_checkpoint(out)
    shard = next(p for p in (out / "checkpoint").iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(data)
    with pytest.raises(UserError, match=rf"checkpoint is damaged \({shard.name}: not the sha256 recorded"):
        run(world, out, total_steps=3)
    (out / "checkpoint" / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"checkpoint is damaged \(FileNotFoundError.*manifest.json"):
        run(world, out, total_steps=3)

# -----------------------------------------------------------------------------
# 15.12, 15.13, 15.14, 15.20: the run's folder


@pytest.mark.parametrize("where", ["equal", "inside", "symlink", "holds"])
def test_out_dir_overlapping_the_model_is_refused_and_the_model_untouched(world, tmp_path, where):
    """An --out_dir overlapping the model's folder is refused before anything is written there (issue 15.12).

    --out_dir equal to the model's folder overwrote the model's config.json before the model was
    loaded, destroying it. An --out_dir that is, is inside, links to or holds the model's folder
    must be refused, with nothing written there."""
    model = tmp_path / "m" / "model"
    shutil.copytree(f"{world}/model", model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    out = {"equal": model, "inside": model / "run", "symlink": tmp_path / "link", "holds": tmp_path / "m"}[where]
    if where == "symlink":
        out.symlink_to(model)
    with pytest.raises(ValueError, match=r"must not write into the model's folder"):
        run(world, out, model=str(model))
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before, "the model's folder was written to"


def test_refused_resume_leaves_config_json_as_it_was(world, trained, tmp_path):
    """A resume refused for changed options leaves the run's config.json as it was (issue 15.13).

    Such a resume still overwrote config.json with the changed options."""
    out = copy_run(trained, tmp_path / "r")
    before = (out / "config.json").read_text()
    with pytest.raises(ValueError, match=r"other options \(prompts_per_step: 2 then, 3 now\)"):
        run(world, out, total_steps=2, prompts_per_step=3)
    assert (out / "config.json").read_text() == before, "a refused resume rewrote the run's config.json"


@pytest.mark.slow
def test_a_second_run_in_the_same_out_dir_is_refused_until_the_first_is_gone(world, tmp_path):
    """A second run in a busy --out_dir is refused, naming the first; the lock dies with it (issue 15.14).

    Two runs could share an --out_dir, doubling its metrics. The second (here the same command) must
    stop, naming the first one's process; the lock must go with that process, even when it is
    killed by SIGKILL."""
    out = tmp_path / "shared"
    same = dict(total_steps=5, stage1_steps=3, eval_every=2)
    p = launch(world, out, *COMMON, "--save_every", "1", "--pause_after_save", "1")
    try:
        read_until(p, "PAUSED")
        with pytest.raises(UserError, match=rf"in use by another run \(pid {p.pid} on .*harness.py"):
            run(world, out, **same)
    finally:
        p.kill()
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    recs = run(world, out, **same)  # the lock went with the killed process
    assert [r["step"] for r in recs if r["type"] == "step"] == [1, 2, 3, 4, 5]


def test_partial_checkpoints_of_a_killed_save_are_removed_at_start(world, tmp_path):
    """The partial checkpoints of a killed save (file or folder) are removed when a run starts (issue 15.20).

    A save killed mid-write left checkpoint.pt.tmp (up to 1.6 GB) until the next save."""
    out = tmp_path / "o"
    out.mkdir()
    (out / runfolder.MARKER).write_text('{"created_by": "srpo"}')  # the folder of an earlier run
    (out / "checkpoint.pt.tmp").write_bytes(os.urandom(1 << 16))
    (out / "checkpoint.tmp").mkdir()
    (out / "checkpoint.tmp" / "__0_0.distcp").write_bytes(os.urandom(1 << 16))
    seen = []

    def reward(tok, problems, rolls, cfg):  # first called by the evaluation before step 1: before any save
        seen.append(sorted(os.listdir(out)))
        return harness.contains_reference(tok, problems, rolls, cfg)
    run(world, out, reward=reward, total_steps=1)
    assert "checkpoint.pt.tmp" not in seen[0] and "checkpoint.tmp" not in seen[0], f"still there at start: {seen[0]}"


def test_folder_checkpoint_cut_off_between_its_renames_is_put_back(world, trained, tmp_path, capsys):
    """A folder checkpoint left as checkpoint.old/ by a crash between its renames is put back and resumed.

    A folder checkpoint cannot be renamed over its predecessor, which steps aside first as
    checkpoint.old/; a crash before the new one is renamed in must not lose both."""
    out = copy_run(trained, tmp_path / "o")
    as_folder_checkpoint(out)
    os.rename(out / "checkpoint", out / "checkpoint.old")
    (out / "checkpoint.tmp").mkdir()  # the new one, never finished
    recs = run(world, out, total_steps=3)
    assert f"resumed from {out / 'checkpoint'} at step 2" in capsys.readouterr().out
    assert [r["step"] for r in recs if r["type"] == "step"] == [1, 2, 3]
