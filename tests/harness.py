"""A tiny world for training-loop tests: a random 2-layer model, a tokenizer over digits, small
data files, and a reward that a random model sometimes earns (so advantages are not all zero).

Used in-process by tests/test_srpo.py and as a script, so a test can run (and SIGKILL) a real
training process:  python tests/harness.py RUN_DIR [srpo.py options...]
"""
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rewards  # noqa: E402
import run as runmod  # noqa: E402
import common  # noqa: E402
import srpo  # noqa: E402

def bench_module(name: str):
    """A script of bench/ as a module. Not through sys.path: bench/rewards.py would shadow rewards.py."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


VOCAB = ["<unk>", "<eos>"] + list("0123456789 ")  # everything else in a prompt reads as <unk>


def make_world(root: str, n_math=8, n_code=4, vocab_extra=0, math_answers=None):
    """Writes root/model (HF checkpoint + tokenizer) and root/{math,code}_{train,test}.jsonl."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from model import Transformer
    from weights import save_model
    os.makedirs(root, exist_ok=True)
    t = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(VOCAB) + vocab_extra, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=False, eos_token_id=1)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)  # bigger than default init: a less uniform policy
    save_model(model, os.path.join(root, "model"), tokenizer=tok)

    answers = math_answers or [str(i % 10) for i in range(n_math)]
    rows = lambda split, n, dom: [
        {"id": f"{dom}-{split}-{i}", "domain": dom, "question": f"What is {i} plus zero?",
         **({"answer": answers[i % len(answers)]} if dom == "math" else {"tests": f"assert f() == {i % 10}"})}
        for i in range(n)]
    for split in ("train", "test"):
        for dom, n in (("math", n_math), ("code", n_code)):
            with open(os.path.join(root, f"{dom}_{split}.jsonl"), "w") as f:
                for r in rows(split, n, dom):
                    f.write(json.dumps(r) + "\n")
    return root


def world_args(root: str, out: str, **over) -> list[str]:
    """srpo.py options for a short run in the tiny world."""
    opts = dict(model=f"{root}/model", math_train=f"{root}/math_train.jsonl", code_train=f"{root}/code_train.jsonl",
                math_test=f"{root}/math_test.jsonl", code_test=f"{root}/code_test.jsonl", out_dir=out,
                prompts_per_step=2, G=4, max_new_tokens=4, total_steps=4, stage1_steps=2, eval_prompts=2,
                eval_k=2, eval_every=0, save_every=0, lr=1e-2, reward_workers=1, micro_tokens=400,
                gen_slots=8, temperature=1.0,
                # The tiny world's code rows (`assert f() == 3`) are scored by contains_reference,
                # never run; a trivial program passes some of them, so the full check would refuse them.
                check_tests="static",
                # Tests run Triton in its CPU interpreter (~100x slower than torch): whole runs use
                # the torch reference; tests/test_srpo.py checks the kernel path in the update itself.
                reference_loss=True)
    opts.update(over)
    args = []
    for k, v in opts.items():
        if isinstance(v, bool):
            args.append(f"--{k}" if v else f"--no_{k}")
        else:
            args += [f"--{k}", str(v)]
    return args


def contains_reference(tok, problems, rolls, cfg):
    """The fork-it reward: correct iff the response contains the reference answer's text. A random
    policy over 13 tokens hits a single digit often enough to give mixed groups."""
    scores = []
    for r in rolls:
        text = tok.decode(r.tokens, skip_special_tokens=True)
        hit = float(problems[r.prompt_idx].reference in text)
        scores.append(rewards.Score(accuracy=hit, format=0.0, reward=hit))
    return scores


if __name__ == "__main__":
    # python tests/harness.py WORLD_DIR OUT_DIR [--pause_after_save STEP] [more srpo.py options]
    world, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    if "--pause_after_save" in argv:
        # Hold still right after the checkpoint of step N is on disk, so a test can SIGKILL the
        # run at a known point (between that checkpoint and the next step).
        i = argv.index("--pause_after_save")
        pause_step = int(argv[i + 1])
        del argv[i:i + 2]
        real_save = runmod.save_checkpoint

        def save_then_pause(path, model, opt, sched, position, rank, cfg):
            real_save(path, model, opt, sched, position, rank, cfg)
            if position["step"] == pause_step:
                print(f"PAUSED after checkpoint at step {pause_step}", flush=True)
                time.sleep(600)
        runmod.save_checkpoint = save_then_pause  # Run.save's name for it
    status = srpo.main(world_args(world, out) + argv, reward_fn=contains_reference)  # later options win
    common.exit_torchrun(status)
    sys.exit(status)
