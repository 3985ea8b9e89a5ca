"""The run's folder is its own or empty, nothing is written before everything is checked, and a user's
mistake is one line (issue 27). Each test once failed on the code before: a run overwrote the files of
a folder it had not made, wrote into --out_dir before its data were checked, loaded the model before
a data error surfaced, and printed a traceback for every mistake."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

import harness
import run as runmod
import runfolder
import srpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
MARKER = ".srpo-run"  # the file that marks a run's folder, by the name the README gives it (runfolder.MARKER)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return harness.make_world(str(tmp_path_factory.mktemp("world")))


@pytest.fixture
def no_weights(monkeypatch):
    """The policy's weights must not load: a check that runs after them fails the test here."""
    def build_policy(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the check that should have stopped "
                             "the run")
    monkeypatch.setattr(runmod, "build_policy", build_policy)


def run(world, out, **over) -> int:
    """srpo.main in this process: a one-step run in the tiny world, unless over says otherwise."""
    return srpo.main(harness.world_args(world, str(out), **{"total_steps": 1} | over),
                     reward_fn=harness.contains_reference)


def snapshot(folder) -> dict:
    """Every file, folder and link under folder: a file's sha256, "folder", or where a link points."""
    seen = {}
    for d, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(d, name)
            if os.path.islink(path):
                seen[os.path.relpath(path, folder)] = "link to " + os.readlink(path)
            elif os.path.isdir(path):
                seen[os.path.relpath(path, folder)] = "folder"
            else:
                with open(path, "rb") as f:
                    seen[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return seen


def foreign_folder(world, path):
    """What another tool left: a Hugging Face checkpoint (config.json), someone's metrics, a plot, a
    policy/ and the checkpoint.tmp/ that a run once deleted as "what is left of a save"."""
    shutil.copytree(f"{world}/model", path)
    (path / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    (path / "run.png").write_bytes(b"\x89PNG not really")
    (path / "policy").mkdir()
    (path / "policy" / "config.json").write_text('{"theirs": true}\n')
    (path / "checkpoint.tmp").mkdir()
    (path / "checkpoint.tmp" / "__0_0.distcp").write_bytes(os.urandom(1024))
    return path


def bad_math(world, tmp_path) -> str:
    rows = [json.loads(line) for line in open(f"{world}/math_train.jsonl")]
    rows[2].pop("answer")
    path = tmp_path / "math_bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)

# -----------------------------------------------------------------------------
# The folder is the run's own, or new, or empty


def test_a_folder_of_something_else_is_refused_untouched_before_the_model_loads(world, tmp_path, no_weights):
    """A folder no srpo run made is refused, naming what is there, every byte left as it was (issue 27).

    A fresh run overwrote another checkpoint's config.json, metrics.jsonl, run.png and policy/config.json
    and deleted its checkpoint.tmp/."""
    out = foreign_folder(world, tmp_path / "theirs")
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"--out_dir \S*theirs holds what no srpo run put there \(.*config"):
        run(world, out)
    assert snapshot(out) == before, "a refused run changed a folder it does not own"


def test_a_refused_start_in_a_new_folder_leaves_no_folder(world, tmp_path, no_weights):
    """Bad data with a new --out_dir stops before the model loads and leaves no folder behind (issue 27).

    Every failed run left its --out_dir behind, with config.json and run.lock, after loading the model."""
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match=r"math_bad.jsonl:3: field 'answer'"):
        run(world, out, math_train=bad_math(world, tmp_path))
    assert not (tmp_path / "new").exists(), f"a failed start left {sorted(os.listdir(tmp_path / 'new'))}"


def test_a_failed_start_in_an_empty_folder_leaves_it_empty(world, tmp_path):
    """A start that fails after claiming an empty folder (unreadable weights) leaves it empty (issue 27)."""
    model = tmp_path / "model"
    shutil.copytree(f"{world}/model", model)
    (model / "model.safetensors").write_bytes(b"not safetensors" * 10)
    out = tmp_path / "empty"
    out.mkdir()
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        run(world, out, model=str(model))
    assert os.listdir(out) == [], f"a failed start left {os.listdir(out)} in a folder it found empty"


def test_a_run_resumes_in_its_own_folder_and_starts_afresh_only_when_asked(world, tmp_path):
    """An earlier run's folder (its marker) resumes; with no checkpoint only --no_resume starts afresh."""
    out = tmp_path / "own"
    assert run(world, out) == 0
    assert json.loads((out / MARKER).read_text())["created_by"] == "srpo", "the run must mark its folder"
    (out / "notes.txt").write_text("mine")  # the user's own file in the run's folder
    (out / "checkpoint.pt").unlink()        # as if the run had been killed before its first save
    with pytest.raises(ValueError, match=r"holds an earlier run .* no checkpoint .*--no_resume"):
        run(world, out)
    assert run(world, out, resume=False) == 0, "--no_resume must start afresh over the run's own folder"
    assert (out / "notes.txt").read_text() == "mine", "starting afresh touched a file the run did not make"
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in lines if r["type"] == "step"] == [1], "the earlier run's metrics must go"


def test_a_foreign_marker_is_not_a_runs_own(world, tmp_path, no_weights):
    """A marker file that is not srpo's (not its JSON) does not make the folder the run's own (issue 27)."""
    out = tmp_path / "odd"
    out.mkdir()
    (out / MARKER).write_text("hello")
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"\.srpo-run is not the mark an srpo run writes"):
        run(world, out)
    assert snapshot(out) == before

# -----------------------------------------------------------------------------
# Bad --out_dir values: one clear error each, before anything loads


@pytest.mark.parametrize("case", ["file", "symlink_loop", "empty_string", "read_only_proc", "inside_a_file"])
def test_bad_out_dir_is_named(world, tmp_path, no_weights, case):
    """Each bad --out_dir gets a message naming it and what is wrong (issue 27).

    An existing file or a symlink loop gave "FileExistsError: [Errno 17] File exists", "" gave
    "FileNotFoundError: ''", a read-only place "OSError: [Errno 30]"."""
    target, want = {
        "file": (tmp_path / "f", r"--out_dir \S+/f is a file, not a folder"),
        "symlink_loop": (tmp_path / "loop", r"--out_dir \S+/loop is a symbolic link that leads nowhere"),
        "empty_string": ("", r"--out_dir is empty"),
        "read_only_proc": ("/proc/srpo-test-run", r"--out_dir /proc/srpo-test-run: cannot write there"),
        "inside_a_file": (tmp_path / "f" / "run", r"--out_dir \S+/f/run cannot be made: \S+/f is a file"),
    }[case]
    (tmp_path / "f").write_text("a file")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=want):
        run(world, target)
    assert snapshot(tmp_path) == before


def test_read_only_out_dir_is_named(world, tmp_path, no_weights):
    """A read-only --out_dir (a read-only mount: root may write anywhere else) is named as such (issue 27)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        with pytest.raises(ValueError, match=r"--out_dir \S+/ro is not writable"):
            run(world, ro)
        with pytest.raises(ValueError, match=r"--out_dir \S+/ro/run cannot be made: \S+/ro is not writable"):
            run(world, ro / "run")
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=True)

# -----------------------------------------------------------------------------
# Data and model files: every row and the model's config checked before the weights load


@pytest.mark.parametrize("damage", ["folder", "nan_level", "infinity", "huge", "repeated_key"])
def test_bad_data_file_is_named_before_the_model_loads(world, tmp_path, no_weights, damage):
    """A data file that is a folder, a non-finite number, a repeated key: named, and early (issue 27).

    A folder gave a bare IsADirectoryError; "level": NaN and duplicate keys (the last wins) were accepted."""
    good = open(f"{world}/math_train.jsonl").read().splitlines()
    row = '{"id": "x", "question": "q", "answer": "1", "level": %s}'
    bad_line = {"nan_level": row % "NaN", "infinity": row % "-Infinity", "huge": row % "1e999",
                "repeated_key": '{"id": "x", "question": "q", "answer": "1", "answer": "2"}'}.get(damage)
    path = tmp_path / "math.jsonl"
    if damage == "folder":
        path.mkdir()
        want = r"math data file \S+math.jsonl' is a folder"
    else:
        path.write_text("\n".join(good[:2] + [bad_line] + good[2:]) + "\n")
        want = r"math.jsonl:3: field 'answer' appears twice" if damage == "repeated_key" else \
            r"math.jsonl:3: field 'level' holds -?(nan|inf).*must be finite"
    with pytest.raises(ValueError, match=want):
        run(world, tmp_path / "out", math_train=str(path))
    assert not (tmp_path / "out").exists(), "a refused start must leave no --out_dir"


@pytest.mark.parametrize("damage", ["wrong_type", "not_json"])
def test_bad_model_config_names_the_file_before_the_weights_load(world, tmp_path, no_weights, damage):
    """A model config.json with "hidden_size": "big", or not JSON, is named before the weights load (27).

    It named the field, not the file, and came after the run had written into --out_dir."""
    model = tmp_path / "model"
    shutil.copytree(f"{world}/model", model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["hidden_size"] = "big"
    (model / "config.json").write_text(json.dumps(cfg) if damage == "wrong_type" else "{not json")
    want = rf"{model}/config.json: .*" + ("hidden_size" if damage == "wrong_type" else "")
    with pytest.raises(ValueError, match=want):
        run(world, tmp_path / "out", model=str(model))
    assert not (tmp_path / "out").exists(), "a refused start must leave no --out_dir"

# -----------------------------------------------------------------------------
# A resume checks the data's content, not only its ids


def test_resume_on_rewritten_rows_is_refused_naming_them_unless_accepted(world, tmp_path, capsys):
    """Rows rewritten under the same ids stop a resume, naming them; --accept_changed_data goes on, saying so.

    Issue 27: every math row rewritten under the same ids resumed without a word, HR's state carried
    over to other problems."""
    train = tmp_path / "math_train.jsonl"
    shutil.copy(f"{world}/math_train.jsonl", train)
    out = tmp_path / "run"
    assert run(world, out, math_train=str(train)) == 0
    rows = [json.loads(line) for line in open(train)]
    for r in rows:
        r["question"] = "What is " + r["question"]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = r"checkpoint.pt was trained on other content in 8 data rows with the same ids: " \
           r"'math-train-0' \(\S+math_train.jsonl:1\), .* and 3 more"
    with pytest.raises(ValueError, match=want):
        run(world, out, math_train=str(train), total_steps=2)
    capsys.readouterr()
    assert run(world, out, math_train=str(train), total_steps=2, accept_changed_data=True) == 0
    assert "--accept_changed_data: resuming on 8 changed data rows" in capsys.readouterr().out
    assert run(world, out, math_train=str(train), total_steps=3) == 0, \
        "after an accepted change, the checkpoint should record the rows it now trains on"

# -----------------------------------------------------------------------------
# One line for every user mistake


def srpo_cli(world, out, *opts, env=ENV) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(ROOT, "srpo.py"), *harness.world_args(world, str(out)), *opts]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_a_user_mistake_is_one_line_and_exit_status_2(world, tmp_path):
    """srpo.py says a user's mistake in one line `srpo: error: ...`, exit status 2, no traceback (issue 27).

    Every mistake, even a well-worded one, printed a full Python traceback first. SRPO_DEBUG=1 shows it."""
    (tmp_path / "f").write_text("a file")
    p = srpo_cli(world, tmp_path / "f")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, f"exit status {p.returncode}:\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr and len(lines) == 1, f"not one line on stderr:\n{p.stderr[-3000:]}"
    assert lines[0].startswith("srpo: error: --out_dir ") and "is a file, not a folder" in lines[0], lines[0]
    debug = srpo_cli(world, tmp_path / "f", env=dict(ENV, SRPO_DEBUG="1"))
    assert debug.returncode == 2 and "Traceback" in debug.stderr, "SRPO_DEBUG=1 should show the traceback"


@pytest.mark.parametrize("case", ["option", "data", "model", "out_dir", "busy"])
def test_every_kind_of_mistake_is_one_line(world, tmp_path, capsys, case):
    """Options, data, model files and folders: each mistake is one line naming it, exit status 2 (27)."""
    from errors import exit_on_user_error
    model = tmp_path / "model"
    shutil.copytree(f"{world}/model", model)
    (model / "tokenizer.json").write_text("{")
    over, want = {
        "option": ({"temperature": 0}, "--temperature=0"),
        "data": ({"math_train": bad_math(world, tmp_path)}, "math_bad.jsonl:3: field 'answer'"),
        "model": ({"model": str(model)}, f"{model}/tokenizer.json: not valid JSON"),
        "out_dir": ({"out_dir": ""}, "--out_dir is empty"),
        "busy": ({}, "is in use by another run"),
    }[case]
    out = tmp_path / "out"
    holder = None
    if case == "busy":
        out.mkdir()
        (out / MARKER).write_text('{"created_by": "srpo"}')
        holder = runfolder.lock_out_dir(str(out))  # another run holds the folder
    try:
        status = exit_on_user_error("srpo", srpo.main, harness.world_args(world, str(out), **over),
                                    reward_fn=harness.contains_reference)
    finally:
        if holder:
            holder.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, f"status {status}, stderr {err}"
    assert err[0].startswith("srpo: error: ") and want in err[0], err[0]


@pytest.mark.slow
def test_under_torchrun_the_mistake_is_said_once(world, tmp_path):
    """Under torchrun every rank stops on a user's mistake with status 2, and rank 0 alone says it (27)."""
    cmd = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.join(ROOT, "srpo.py"), *harness.world_args(world, str(tmp_path / "out")),
           "--math_train", bad_math(world, tmp_path)]
    p = subprocess.run([sys.executable, *cmd], env=ENV, capture_output=True, text=True, timeout=600)
    said = (p.stdout + p.stderr).count("srpo: error: ")
    assert p.returncode != 0 and said == 1, f"status {p.returncode}, said {said} times:\n{p.stderr[-3000:]}"
    assert "exitcode  : 2" in p.stderr or "exitcode: 2" in p.stderr.replace(" ", ""), p.stderr[-3000:]
    assert not (tmp_path / "out").exists(), "a refused start must leave no --out_dir"
