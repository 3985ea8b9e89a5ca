"""Bad input stops the run at once, with an error that names what is wrong: the option and its range,
the data file, line and field, the model file. Each test once failed on the code before its fix."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import harness
import datafile
import srpo
from weights import load_model, load_tokenizer
import common
from rollout import KVCache


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return harness.make_world(str(tmp_path_factory.mktemp("world")))


def run(world, out, **over):
    """srpo.main in this process on the tiny world, with the harness's reward."""
    srpo.main(harness.world_args(world, str(out), **over), reward_fn=harness.contains_reference)


def rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def write_rows(path, rows_) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows_)
    return str(path)


def mem_available() -> int:
    """The free memory the sampler's CPU budget is a fraction of (--gen_mem of it)."""
    free = common.free_memory("cpu")
    if free is None:
        pytest.skip("this machine does not say how much memory is available")
    return free


def tiny_slot_bytes(max_len: int) -> int:
    """One KV-cache slot of the harness model (2 layers, 2 KV heads of 8, fp32, 13 tokens), by hand."""
    return 2 * 2 * 2 * 8 * 4 * max_len + 6 * 4 * 13 + 12 * (max_len + 1)

# -----------------------------------------------------------------------------
# 15: the KV cache is sized from available memory on a CPU too; a prompt that cannot fit names its row


def test_cpu_cache_slots_follow_available_memory(world):
    """On a CPU the KV cache takes as many slots as its share of free memory holds, not max_slots (issue 15).

    The cache took max_slots slots whatever their size (one long prompt: ~64 GB, OOM-killed)."""
    if os.path.exists("/proc/meminfo"):  # the measure itself: Linux's MemAvailable, or less in a container
        line = next(x for x in open("/proc/meminfo") if x.startswith("MemAvailable:"))
        assert 0 < mem_available() <= int(line.split()[1]) * 1024, "free memory should be at most MemAvailable"
    model = load_model(f"{world}/model")
    per_slot = tiny_slot_bytes(64)
    frac = 10.5 * per_slot / mem_available()      # about 10 slots' worth of what is available now
    cache = KVCache.for_model(model, max_len=64, max_slots=256, mem_fraction=frac)
    assert 5 <= cache.n_slots <= 20, f"expected ~10 slots in a budget of ~10 slots, got {cache.n_slots} (max_slots 256)"
    with pytest.raises(ValueError, match="max_slots"):
        KVCache.for_model(model, max_len=64, max_slots=0)  # was a TypeError formatting its own message


def test_prompt_beyond_the_models_positions_names_its_row(world, tmp_path):
    """A prompt longer than max_position_embeddings is refused, naming its file:line, id and the limit (issue 15).

    Such a prompt was decoded past the trained positions, silently."""
    r = rows(f"{world}/math_train.jsonl")
    r[1]["question"] = "1 " * 1000                  # ~2700 tokens with the template; the model has 2048
    train = write_rows(tmp_path / "math_train.jsonl", r)
    with pytest.raises(ValueError, match=r"(?s)math_train.jsonl:2 .*math-train-1.*2048"):
        run(world, tmp_path / "out", math_train=train)


def test_prompt_longer_than_one_slot_of_the_budget_names_its_row(world, tmp_path):
    """Issue 15: a prompt no KV-cache slot can hold within the memory budget must be an error naming the row."""
    r = rows(f"{world}/math_train.jsonl")
    r[1]["question"] = "1 " * 700                   # ~1700 positions: under 2048, over the budget below
    train = write_rows(tmp_path / "math_train.jsonl", r)
    gen_mem = tiny_slot_bytes(1000) / mem_available()  # one slot of ~1000 positions; the others need ~400
    with pytest.raises(ValueError, match=r"(?s)math_train.jsonl:2 .*math-train-1.*--gen_mem"):
        run(world, tmp_path / "out", math_train=train, one_shot=False, gen_mem=gen_mem)


def test_fewer_slots_than_asked_is_said_once(world, tmp_path, capsys):
    """Issue 15: when the budget holds fewer slots than --gen_slots, the run says so, once, and still runs."""
    gen_mem = 3.5 * tiny_slot_bytes(918) / mem_available()  # the longest prompt (code) + 4 new tokens: 918
    run(world, tmp_path / "out", gen_mem=gen_mem, gen_slots=8, total_steps=1)
    said = [line for line in capsys.readouterr().out.splitlines() if "--gen_slots 8" in line]
    assert len(said) == 1, f"expected one line about --gen_slots 8 not fitting, got {said}"
    assert "code_train.jsonl:" in said[0], f"the line should name the longest prompt's row: {said[0]}"

# -----------------------------------------------------------------------------
# 16: ids are unique across every train and test file


@pytest.mark.parametrize("clash", ["train_and_test", "math_and_code"])
def test_an_id_in_two_files_names_both_files_and_lines(world, tmp_path, clash):
    """An id in two data files is refused, naming both files and both lines (issue 16).

    A shared id silently mixed problems (the test question trained with the train answer)."""
    if clash == "train_and_test":
        name, other, line, their_line = "math_test", "math_train", 1, 3
    else:
        name, other, line, their_line = "code_train", "math_train", 2, 1
    r = rows(f"{world}/{name}.jsonl")
    r[line - 1]["id"] = rows(f"{world}/{other}.jsonl")[their_line - 1]["id"]
    path = write_rows(tmp_path / f"{name}.jsonl", r)
    want = rf"(?s){other}.jsonl:{their_line}\b.*{name}.jsonl:{line}\b|{name}.jsonl:{line}\b.*{other}.jsonl:{their_line}\b"
    with pytest.raises(ValueError, match=want):
        run(world, tmp_path / "out", **{name: path})


def test_the_same_file_as_train_and_test_is_not_a_clash(world, tmp_path):
    """Issue 16's check must not refuse evaluating on the training file itself (same rows, nothing mixed)."""
    run(world, tmp_path / "out", math_test=f"{world}/math_train.jsonl", total_steps=1)

# -----------------------------------------------------------------------------
# 17: every option is checked at parse time, against a range written beside it in Config

# Free text, checked where it is used (paths when opened, the wandb project by wandb).
FREE_TEXT = {"model", "math_train", "code_train", "math_test", "code_test", "out_dir", "wandb_project"}

BAD = [("max_prompts", -1), ("max_level", -1), ("seed", -1), ("seed", 2**40), ("prompts_per_step", 0), ("G", 1),
       ("max_new_tokens", 0), ("max_new_tokens", -1), ("temperature", 0), ("temperature", -1), ("temperature", "nan"),
       ("top_p", 0), ("top_p", 1.5), ("top_k", -1), ("eps_low", 1.5), ("eps_low", 1.0), ("eps_low", -0.1),
       ("eps_high", -0.1), ("adv_eps", -1), ("kl_coef", -1), ("format_coef", -1), ("language_penalty", -1),
       ("lr", -1), ("lr", "inf"), ("warmup_steps", -1), ("weight_decay", -1), ("grad_clip", -1), ("update_epochs", 0),
       ("micro_tokens", 0), ("grad_ckpt", "yes"), ("hr_return_after", -1), ("stage1_steps", -1), ("stage1_epochs", -1), ("total_steps", 0),
       ("eval_every", -1), ("eval_prompts", -1), ("eval_k", 0), ("eval_temperature", -1), ("save_every", -1),
       ("reward_workers", -1), ("check_tests", "none"), ("hr_rule", "sometimes"), ("hr_tau", 0), ("hr_tau", 1), ("hr_q", 1), ("hr_q", -0.1), ("sandbox", "none"), ("eval_domains", "chess"), ("dtype", "fp16"), ("gen_slots", 0), ("gen_mem", 0), ("gen_mem", 1.5),
       ("max_steps_this_run", -1), ("eval_humaneval", -1), ("eval_humaneval", 165)]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_option_is_refused_naming_option_and_range(name, value):
    """A bad option value is refused at parse time, naming the option and its range or choices (issue 17).

    Bad options were accepted and failed late (ZeroDivisionError) or silently (negative lr)."""
    f = {f.name: f for f in dataclasses.fields(srpo.Config)}[name]
    with pytest.raises(ValueError) as e:
        srpo.parse_config([f"--{name}", str(value)])
    msg = str(e.value)
    rule = f.metadata.get("range") or ", ".join(f.metadata.get("choices", ()))
    assert f"--{name}" in msg and rule and rule in msg, f"the error should name --{name} and its rule {rule!r}: {msg}"


def test_every_option_has_a_rule_and_a_bad_value_here():
    """Every option but flags and free text has a range or choices in Config, and a bad value in BAD (issue 17).

    A new numeric option without a range (or missing from BAD above) would go unchecked."""
    tested = {n for n, _ in BAD}
    for f in dataclasses.fields(srpo.Config):
        if f.type is bool or f.name in FREE_TEXT:
            continue
        assert "range" in f.metadata or "choices" in f.metadata, f"Config.{f.name} has no range or choices"
        assert f.name in tested, f"Config.{f.name} has no bad value in BAD"


def test_defaults_and_edge_values_pass():
    """Issue 17's ranges must not refuse the defaults, nor the meaningful edges (greedy eval, top_p 1, eps 0)."""
    assert srpo.parse_config([]) == srpo.Config()
    srpo.parse_config(["--eval_temperature", "0", "--top_p", "1", "--eps_low", "0", "--eps_high", "0", "--lr", "0",
                       "--gen_mem", "1", "--stage1_steps", "0", "--max_steps_this_run", "0", "--seed", "0"])


def test_help_shows_every_range(capsys):
    """Issue 17: --help must say what each option allows, the same rule the check applies."""
    with pytest.raises(SystemExit):
        srpo.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
    for f in dataclasses.fields(srpo.Config):
        if f.type is bool or f.name in FREE_TEXT:
            continue
        rule = f"range {f.metadata.get('range')}" if "choices" not in f.metadata else \
            f"one of {', '.join(f.metadata['choices'])}"
        assert rule in text, f"--help should show --{f.name}'s rule ({rule})"

# -----------------------------------------------------------------------------
# 18: data errors name the file, the line and the field


def test_non_utf8_row_names_file_and_line(tmp_path):
    """A data row that is not valid UTF-8 is an error naming its file and line (issue 18).

    Bytes that are not UTF-8 raised a bare UnicodeDecodeError, no file or line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "1", "question": "q", "answer": "1"}\n{"id": "2", "question": "q\xff", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid UTF-8"):
        datafile.load_problems(str(bad), "math")


@pytest.mark.parametrize("level", ["easy", None, True])
def test_level_that_is_not_a_number_names_file_line_and_field(tmp_path, level):
    """Under --max_level a 'level' that is not a number is an error naming file, line and field (issue 18).

    A string or null 'level' raised a bare TypeError under --max_level."""
    bad = write_rows(tmp_path / "bad.jsonl", [{"id": "1", "question": "q", "answer": "1", "level": 1},
                                              {"id": "2", "question": "q", "answer": "2", "level": level}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'level'"):
        datafile.load_problems(bad, "math", max_level=2)
    assert len(datafile.load_problems(bad, "math")) == 2, "without --max_level the field is not used, so not checked"


def test_resume_on_regenerated_data_names_checkpoint_ids_and_files(world, tmp_path):
    """A resume on data without the checkpoint's ids is refused, naming the checkpoint, files and ids (issue 18).

    Resuming after the data was regenerated with other ids was a KeyError on a prompt id."""
    train = write_rows(tmp_path / "math_train.jsonl", rows(f"{world}/math_train.jsonl"))
    out = tmp_path / "out"
    run(world, out, math_train=train, total_steps=2, stage1_steps=10)
    write_rows(train, [r | {"id": r["id"].replace("math-train", "m2")} for r in rows(train)])
    with pytest.raises(ValueError, match=r"(?s)checkpoint.pt.*math_train.jsonl.*'math-train-\d'"):
        run(world, out, math_train=train, total_steps=4, stage1_steps=10)

# -----------------------------------------------------------------------------
# 19: a broken model file is named, with what is wrong with it


def test_truncated_gguf_names_the_file(tmp_path):
    """A truncated GGUF, or a file that is not GGUF at all, is an error naming the file and the fault (issue 19).

    A truncated GGUF failed with numpy's "cannot reshape array", no file named."""
    import gguf
    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) - 1000])    # an interrupted download
    for load in (load_tokenizer, load_model):
        with pytest.raises(ValueError, match=r"tiny.gguf.*truncated"):
            load(path)
    open(path, "wb").write(b"<html>404 Not Found</html>")  # an error page saved under the model's name
    with pytest.raises(ValueError, match=r"tiny.gguf.*not a GGUF file"):
        load_model(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_broken_safetensors_names_the_file(world, tmp_path, damage):
    """A truncated, garbage or empty model.safetensors is an error naming the file (issue 19).

    Truncated or garbage safetensors failed with "Error while deserializing header", no file named."""
    folder = tmp_path / "ck"
    shutil.copytree(f"{world}/model", folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"not safetensors at all" * 50,
                         "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"ck/model.safetensors.*(truncated|not a safetensors)"):
        load_model(str(folder))


def test_folder_without_a_tokenizer_says_so(world, tmp_path):
    """A model folder with only config.json says it has no tokenizer and no *.safetensors weights (issue 19).

    A folder with only config.json gave a message about sentencepiece."""
    folder = tmp_path / "only_config"
    folder.mkdir()
    shutil.copy(f"{world}/model/config.json", folder)
    with pytest.raises(FileNotFoundError, match=r"only_config.*no tokenizer.*tokenizer.json"):
        load_tokenizer(str(folder))
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weights in .*only_config"):
        load_model(str(folder))


def test_damaged_tokenizer_json_names_the_file(world, tmp_path):
    """A truncated tokenizer.json is an error naming the file as not valid JSON (issue 19).

    A truncated tokenizer.json failed as a bare JSONDecodeError, no file named."""
    folder = tmp_path / "ck"
    shutil.copytree(f"{world}/model", folder)
    text = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match=r"ck/tokenizer.json: not valid JSON"):
        load_tokenizer(str(folder))
