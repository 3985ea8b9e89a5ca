"""srpo.py: the algorithm's pieces against their definitions, then whole runs of the tiny world."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import harness
import memory
import rewards
import curriculum
import srpo
from test_rewards import crashing_workers  # noqa: F401  (a fixture: workers that die on its reference)
from weights import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32 = memory.decide_precision("cpu", 1, sharded=False)  # how one CPU process computes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return harness.make_world(str(tmp_path_factory.mktemp("world")))


def run(world, out, reward=harness.contains_reference, **over):
    """srpo.main in this process, with the fork-it reward of the harness (or another)."""
    srpo.main(harness.world_args(world, str(out), **over), reward_fn=reward)
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]

# -----------------------------------------------------------------------------
# The pieces


def test_history_resampling_drops_all_correct_keeps_mixed_and_all_wrong():
    """HR drops a prompt only if every rollout of the epoch was correct, and empties its buffer for the next."""
    h = curriculum.History()
    h.record("easy", [True, True, True, True])
    h.record("mixed", [True, False, False, True])
    h.record("hard", [False] * 4)
    h.record("split", [True, True])      # two steps' worth of outcomes for one prompt
    h.record("split", [False, True])
    kept, stats = h.resample(["easy", "mixed", "hard", "split", "unseen"])
    assert kept == ["mixed", "hard", "split", "unseen"], f"HR kept {kept}"
    assert stats == {"dropped": 1, "kept_mixed": 2, "kept_all_wrong": 1, "kept_unseen": 1, "returned": 0,
                     "kept_all_correct": 0}, stats
    assert set(h.dropped) == {"easy"} and h.outcomes == {}, "the buffer must reset for the next epoch"


def test_dropped_prompts_return_after_n_epochs_only_when_asked():
    """A dropped prompt stays out for the stage, unless --hr_return_after N brings it back after N epochs."""
    for return_after, back_at in ((0, None), (2, 3)):   # dropped for epoch 1: back at 1 + 2 = 3
        h = curriculum.History()
        h.record("easy", [True] * 4)
        h.record("hard", [False] * 4)
        order, _ = h.resample(["easy", "hard"], next_epoch=1, return_after=return_after)
        assert order == ["hard"], f"epoch 1 must not hold the all-correct prompt: {order}"
        for epoch in (2, 3):
            h.record("hard", [False] * 4)
            order, stats = h.resample(order, next_epoch=epoch, return_after=return_after)
            want = ["hard", "easy"] if epoch == back_at else ["hard"]
            assert order == want, f"return_after={return_after}, epoch {epoch}: {order}, expected {want}"
            assert stats["returned"] == len(want) - 1, stats


def test_group_advantages_follow_the_formula_and_zero_groups():
    """A = (R - mean) / (std + eps) within a group; a group of equal rewards is flagged and gets exactly 0."""
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.1, 0.9, 0.5]])
    adv, zero = srpo.group_advantages(r, eps=1e-4)
    expect = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    assert zero.tolist() == [False, True, True, False], "all-equal groups must be flagged"
    assert torch.allclose(adv[[0, 3]], expect[[0, 3]]), "advantage != (R - mean) / (std + eps)"
    assert torch.equal(adv[[1, 2]], torch.zeros(2, 4)), "a zero-advantage group must give exactly 0"


def test_micro_batches_hold_every_response_token_once():
    """Packing keeps every sample once, within budget, with targets, mask, logp_old and advantage aligned."""
    samples = [srpo.Sample(list(range(10 + i)), 4 + i % 3, [-0.1 * j for j in range(6 + i - i % 3)], float(i))
               for i in range(7)]
    groups = srpo.pack_micro_batches(samples, budget=25)
    assert sorted(i for g in groups for i in g) == list(range(7)), "a sample was lost or repeated"
    for g in groups:
        assert len(g) == 1 or sum(len(samples[i].tokens) - 1 for i in g) <= 25, "budget exceeded"
        mb = srpo.make_micro_batch(samples, g, "cpu")
        T = mb.ids.shape[1]
        assert mb.cu[-1] == T and mb.targets.shape == (T,)
        for k, i in enumerate(g):
            s, a, b = samples[i], int(mb.cu[k]), int(mb.cu[k + 1])
            assert mb.ids[0, a:b].tolist() == s.tokens[:-1] and mb.targets[a:b].tolist() == s.tokens[1:]
            resp = mb.mask[a:b].bool()
            assert resp.sum() == len(s.tokens) - s.n_prompt, "mask must cover exactly the response"
            assert mb.targets[a:b][resp].tolist() == s.tokens[s.n_prompt:], "mask on the wrong tokens"
            assert torch.allclose(mb.logp_old[a:b][resp], torch.tensor(s.logp_old)), "logp_old misaligned"
            assert (mb.adv[a:b] == s.adv).all()


def naive_loss(model, samples, eps_low, eps_high):
    """The SRPO objective written directly from the report (arXiv 2504.14286): full logits, per-token ratio, clipped
    surrogate, one mean over all response tokens of the batch."""
    num, den = 0.0, 0
    for s in samples:
        ids = torch.tensor(s.tokens)
        logp = F.log_softmax(model(ids[None])[0, :-1], -1).gather(1, ids[1:, None])[:, 0]
        logp = logp[s.n_prompt - 1:]
        ratio = torch.exp(logp - torch.tensor(s.logp_old))
        surr = torch.minimum(ratio * s.adv, ratio.clamp(1 - eps_low, 1 + eps_high) * s.adv)
        num = num - surr.sum()
        den += len(s.logp_old)
    return num / den


def test_update_equals_the_naive_objective_across_micro_batches(world):
    """policy_update over micro-batches equals the loss and gradients of the objective written out naively."""
    from dist_update_check import global_batch
    cfg = srpo.Config(micro_tokens=20, lr=1e-2, grad_clip=0.0, eps_low=0.2, eps_high=0.28)
    a = load_model(f"{world}/model")
    b = load_model(f"{world}/model")
    samples = global_batch(a.config.vocab_size)
    samples[1].adv = samples[4].adv = 0.0  # a zero-advantage group: skipped, but in the mean's denominator
    assert len(srpo.pack_micro_batches(samples, cfg.micro_tokens)) > 2, "test needs several micro-batches"
    # SGD, not Adam: Adam turns float-noise-sized gradients into lr-sized steps, hiding the comparison.
    opt_a = torch.optim.SGD(a.parameters(), lr=cfg.lr)
    stats = srpo.policy_update(a, opt_a, samples, cfg, FP32, "cpu")
    opt_b = torch.optim.SGD(b.parameters(), lr=cfg.lr)
    loss = naive_loss(b, samples, cfg.eps_low, cfg.eps_high)
    loss.backward()
    assert abs(stats.loss - loss.item()) < 1e-5, f"loss {stats.loss} vs naive {loss.item()}"
    assert stats.clip_frac > 0, "the test batch should clip some tokens"
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-4), f"gradient of {n} differs from naive"
    opt_b.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), f"updated {n} differs"


@pytest.mark.parametrize("variant", [{}, {"kl_coef": 0.1}, {"update_epochs": 2}, {"micro_tokens": 12}],
                         ids=["plain", "kl", "two-passes", "prompt-fills-the-budget"])
def test_shared_prompt_update_equals_unshared(world, variant):
    """The shared-prompt update's loss, statistics, gradients and new weights equal the unshared update's (fp32).

    Zero-advantage groups included (skipped, or trained under KL); with a budget no larger than the
    longest prompt, each response is a unit of its own. Tolerance: 1e-6 relative (matmul shapes differ)."""
    from dist_update_check import grouped_batch
    base = load_model(f"{world}/model")
    samples = grouped_batch(base.config.vocab_size)
    out = {}
    for shared in (False, True):
        cfg = srpo.Config(lr=1e-2, grad_clip=0.0, reference_loss=True, shared_prompts=shared,
                          **({"micro_tokens": 64} | variant))
        m = load_model(f"{world}/model")
        stats = srpo.policy_update(m, torch.optim.SGD(m.parameters(), lr=cfg.lr), samples,
                                   cfg, FP32, "cpu", ref_model=base)
        out[shared] = stats, {n: (p.grad, p.detach()) for n, p in m.named_parameters()}
    (a, pa), (b, pb) = out[False], out[True]
    assert (a.tokens, a.tokens_trained) == (b.tokens, b.tokens_trained) == (54, 54 if variant.get("kl_coef") else 36)
    for k in ("loss", "clip_frac", "ratio", "kl", "entropy", "grad_norm"):
        assert getattr(b, k) == pytest.approx(getattr(a, k), rel=1e-6, abs=1e-7), f"{k}: {b} vs unshared {a}"
    for n in pa:
        assert torch.allclose(pb[n][0], pa[n][0], rtol=1e-5, atol=1e-7), f"gradient of {n}"
        assert torch.allclose(pb[n][1], pa[n][1], rtol=0, atol=1e-7), f"updated weight {n}"
    assert a.grad_norm > 0, "nothing trained: the comparison would be vacuous"
    # (with two passes the trainer recomputes logp_old, so the last pass starts at ratio 1 and clips nothing)
    assert a.clip_frac > 0 or "update_epochs" in variant, "the batch should clip some tokens"


def test_shared_micro_batches_predict_every_response_token_from_the_right_row():
    """A shared micro-batch holds each prompt once; each response token is predicted at its predecessor's row."""
    from dist_update_check import grouped_batch
    samples = grouped_batch(50)
    units = srpo.prompt_units(samples, budget=20)
    assert sorted(i for u in units for i in u) == list(range(12)), "a sample was lost or repeated"
    mb = srpo.make_shared_micro_batch(samples, units, "cpu")
    ids, rows = mb.ids[0], mb.rows
    for k, i in enumerate(mb.samples):
        s = samples[i]
        at = sum(len(samples[j].tokens) - samples[j].n_prompt for j in mb.samples[:k])
        resp = s.tokens[s.n_prompt:]
        assert mb.targets[at:at + len(resp)].tolist() == resp
        # the predicting rows: the prompt's last token, then the response's own tokens but its last
        assert ids[rows[at:at + len(resp)]].tolist() == [s.tokens[s.n_prompt - 1]] + resp[:-1]
        assert torch.allclose(mb.logp_old[at:at + len(resp)], torch.tensor(s.logp_old))
    assert mb.ids.shape[1] == sum(samples[u[0]].n_prompt for u in units) + sum(
        len(s.tokens) - s.n_prompt - 1 for s in samples), "each unit's prompt once, each response less its last token"


@pytest.mark.gpu
def test_gpu_update_close_to_cpu_fp32(world):
    """The GPU update (bf16, flex_attention, fused Triton loss) matches the fp32 CPU update's loss and gradients.

    Same batch on both: the loss within 2%, each parameter's gradient at cosine > 0.99."""
    from dist_update_check import global_batch
    cfg = srpo.Config(micro_tokens=20, lr=1e-2, grad_clip=0.0)
    cpu = load_model(f"{world}/model")
    gpu = load_model(f"{world}/model", device="cuda")
    samples = global_batch(cpu.config.vocab_size)
    ref = srpo.policy_update(cpu, torch.optim.SGD(cpu.parameters(), lr=cfg.lr), samples, cfg, FP32, "cpu")
    got = srpo.policy_update(gpu, torch.optim.SGD(gpu.parameters(), lr=cfg.lr), samples, cfg,
                             memory.decide_precision("cuda", 1, False), "cuda")
    assert abs(got.loss - ref.loss) < 2e-2 * abs(ref.loss) + 1e-4, (got, ref)
    for (n, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        cos = F.cosine_similarity(pc.grad.flatten(), pg.grad.float().cpu().flatten(), dim=0).item()
        assert cos > 0.99, f"gradient of {n}: cosine {cos:.4f} to the fp32 CPU gradient"


@pytest.mark.parametrize("one_mode,two_mode,batch", [("shared", "shared", "global"),
                                                      ("unshared", "shared", "grouped")])
def test_two_fsdp_processes_equal_one(world, tmp_path, one_mode, two_mode, batch):
    """One step on 2 CPU processes (FSDP2 over gloo) equals one process on the same global batch.

    Also: the shared-prompt update on 2 processes equals the unshared update in one, on grouped responses."""
    script = os.path.join(ROOT, "tests", "dist_update_check.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, script, f"{world}/model", str(one), one_mode, batch], check=True, env=env,
                   timeout=300)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        script, f"{world}/model", str(two), two_mode, batch], env=env, timeout=300,
                       capture_output=True, text=True)
    assert p.returncode == 0, f"the 2-process run failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    r1, r2 = torch.load(one), torch.load(two)
    assert abs(r1["stats"]["loss"] - r2["stats"]["loss"]) < 1e-6, (r1["stats"], r2["stats"])
    assert abs(r1["stats"]["grad_norm"] - r2["stats"]["grad_norm"]) < 1e-5
    for n in r1["weights"]:
        assert torch.allclose(r1["grads"][n], r2["grads"][n], atol=1e-6, rtol=1e-4), f"gradient of {n}"
        assert torch.allclose(r1["weights"][n], r2["weights"][n], atol=1e-6), f"updated weight {n}"
    moved = max((r1["weights"][n] - w).abs().max().item()
                for n, w in load_model(f"{world}/model").named_parameters())
    assert moved > 1e-4, "the update did not change the weights: the comparison would be vacuous"

# -----------------------------------------------------------------------------
# Whole runs


@pytest.fixture(scope="module")
def whole_run(world, tmp_path_factory):
    """One run shared by the tests below: 8 math prompts, 2 a step (an epoch every 4 steps), stage 2
    from step 6, 8 steps, evaluations every 4. Returns (out_dir, records, step records)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    recs = run(world, out, total_steps=8, stage1_steps=6, eval_every=4)
    return out, recs, [r for r in recs if r["type"] == "step"]


def test_run_logs_every_step_and_switches_stage_on_time(whole_run):
    """Steps 1-8 each log one record; stage 2 begins at --stage1_steps, and stage 1 is math only."""
    _, recs, steps = whole_run
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [r["stage"] for r in steps] == [1] * 6 + [2] * 2, "stage switch at the configured step"
    assert all(r["n_code"] == 0 for r in steps[:6]), "stage 1 must be math only"
    assert any(r["type"] == "stage" and r["step"] == 6 for r in recs)


def test_run_resamples_history_at_the_first_epoch_end(whole_run):
    """HR acts at the end of epoch 1 (step 4), and its counts account for every prompt of the stage."""
    _, recs, _ = whole_run
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert epochs and epochs[0]["step"] == 4, f"expected HR at the end of epoch 1 (step 4): {epochs}"
    e = epochs[0]
    assert e["dropped"] + e["kept_mixed"] + e["kept_all_wrong"] + e["kept_unseen"] == 8
    assert e["prompts"] == 8 - e["dropped"]


def test_run_evaluates_before_periodically_and_after(whole_run):
    """Held-out evaluations come before training, every --eval_every steps, and after the last step."""
    _, recs, _ = whole_run
    assert [r["tag"] for r in recs if r["type"] == "eval"] == ["before", "periodic", "after"]


def test_run_metrics_are_present_finite_and_named(whole_run):
    """Every step record carries its metrics, none NaN, and the rollout count is logged, not inferred."""
    _, _, steps = whole_run
    assert 0 < sum(r["zero_adv"] for r in steps) / len(steps) < 1, "the tiny world should give some signal"
    for r in steps:
        for k in ("reward", "acc_math", "zero_adv", "resp_len", "clip_frac", "entropy", "t_gen", "tok_s"):
            assert k in r and r[k] == r[k], f"metric {k} missing or NaN in {r}"
        assert r["rollouts"] == 2 * 4, f"2 prompts x G 4 rollouts a step: {r}"
        assert r["resp_len"] == r["gen_tokens"] / r["rollouts"]


def test_run_plot_and_compare_read_its_metrics(whole_run):
    """run.png is written, and bench/compare.py reads the run's evaluations with the tokens generated by then."""
    out, recs, steps = whole_run
    assert (out / "run.png").stat().st_size > 10_000, "the run's plot was not written"
    cmp = harness.bench_module("compare").load_run(str(out))
    assert [(s, t) for s, t, _ in cmp.evals] == [(0, 0), (4, sum(r["gen_tokens"] for r in steps[:4])),
                                                 (8, sum(r["gen_tokens"] for r in steps))]
    assert cmp.dropped == sum(r.get("dropped", 0) for r in recs if r["type"] == "epoch")


def test_run_exports_a_trained_policy_that_transformers_loads(world, whole_run):
    """The exported policy loads in transformers with the same logits, and differs from the untrained one."""
    out, _, _ = whole_run
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(out / "policy", dtype=torch.float32)
    ours = load_model(str(out / "policy"))
    start = load_model(f"{world}/model")
    ids = torch.randint(0, 13, (1, 9))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ours(ids), atol=1e-4), "export does not load in transformers"
        assert not torch.allclose(ours(ids), start(ids)), "the exported policy is the untrained one"


@pytest.mark.gpu
def test_tiny_run_on_gpu(world, tmp_path):
    """The whole loop runs on a GPU to finite metrics and a policy that moved.

    On the GPU path: compiled sampler with CUDA graphs, bf16 sampler copy, the fused Triton loss, flex_attention."""
    out = tmp_path / "gpu"
    recs = run(world, out, total_steps=4, stage1_steps=2, eval_every=2, reference_loss=False)
    steps = [r for r in recs if r["type"] == "step"]
    assert len(steps) == 4 and all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in steps)
    assert any(r["grad_norm"] > 0 for r in steps), "no step had a gradient: nothing was tested"
    ours, start = load_model(str(out / "policy")), load_model(f"{world}/model")
    moved = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), start.parameters()))
    assert moved > 1e-4, "the exported policy is the untrained one"


def test_hr_off_is_plain_grpo(world, whole_run, tmp_path):
    """--no_hr keeps every prompt each epoch; its epoch records have HR's keys, counting what HR would drop."""
    recs = run(world, tmp_path / "grpo", hr=False, total_steps=6, stage1_steps=10)
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert epochs and all(r["prompts"] == 8 for r in epochs), "without HR every epoch has all prompts"
    hr_keys = {k for r in whole_run[1] if r["type"] == "epoch" for k in r}
    assert all(set(r) == hr_keys for r in epochs), f"epoch records with --no_hr: {epochs}, with HR: {hr_keys}"


def always_right(tok, problems, rolls, cfg):
    return [rewards.Score(accuracy=1.0, format=0.0, reward=1.0) for _ in rolls]


def test_a_stage_that_runs_dry_ends_or_waits_for_returning_prompts(world, tmp_path):
    """A stage that HR empties ends at once, or with --hr_return_after waits (no steps) for prompts to return.

    Every rollout correct: HR drops all 8 prompts at the end of epoch 0 (step 4). By default the
    stage has nothing left and stage 2 begins at once; with --hr_return_after 2 the stage passes
    two empty epochs (no steps) and gets all 8 back for epoch 3."""
    recs = run(world, tmp_path / "dry", reward=always_right, total_steps=6, stage1_steps=10)
    assert any(r["type"] == "stage" and r["step"] == 4 for r in recs), "stage 2 should begin when stage 1 runs dry"
    evals = [(r["pass1_math"], r["pass1_code"]) for r in recs if r["type"] == "eval"]
    assert evals == [(1.0, 1.0)] * 2, f"main(reward_fn=...) must score the evaluations too: {evals}"
    recs = run(world, tmp_path / "back", reward=always_right, total_steps=6, stage1_steps=10, hr_return_after=2)
    epochs = [(r["epoch"], r["prompts"], r["dropped"], r["returned"]) for r in recs if r["type"] == "epoch"]
    assert epochs[:3] == [(1, 0, 8, 0), (2, 0, 0, 0), (3, 8, 0, 8)], f"epoch ends: {epochs}"
    assert not any(r["type"] == "stage" for r in recs), "with prompts returning, stage 1 goes on"
    assert [r["stage"] for r in recs if r["type"] == "step"] == [1] * 6


def test_loss_variants_run_kl_clip_higher_and_extra_passes(world, tmp_path):
    """KL to the initial policy, clip-higher, extra update passes and top-p run and show in the metrics.

    The options a fork reaches for first; with several passes (and top-p) the trainer recomputes logp_old."""
    recs = run(world, tmp_path / "v", total_steps=3, kl_coef=0.1, eps_high=0.28, update_epochs=2, top_p=0.9)
    steps = [r for r in recs if r["type"] == "step"]
    assert len(steps) == 3 and all(r["loss"] == r["loss"] for r in steps)
    assert any(r["kl"] != 0 for r in steps[1:]), "with a second pass and a moved policy, KL must be nonzero"
    assert any(r["ratio"] != 1.0 for r in steps), "the second pass must see ratios away from 1"


def test_resume_after_sigkill_continues_the_same_run(world, tmp_path):
    """A run SIGKILLed after a checkpoint and resumed logs the same metrics and weights as an uninterrupted one."""
    script = os.path.join(ROOT, "tests", "harness.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    common = ["--total_steps", "5", "--stage1_steps", "3", "--save_every", "2", "--eval_every", "0"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run([sys.executable, script, world, str(whole)] + common, check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p = subprocess.Popen([sys.executable, script, world, str(cut), "--pause_after_save", "2"] + common,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in p.stdout:
            if line.startswith("PAUSED"):
                break
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the first run should have been killed mid-way"
    assert not os.path.exists(cut / "policy"), "a killed run must not have finished"
    subprocess.run([sys.executable, script, world, str(cut)] + common, check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    timing = {"t_gen", "t_score", "t_update", "tok_s"}
    strip = lambda recs: [{k: v for k, v in r.items() if k not in timing} for r in recs]
    a = strip(json.loads(line) for line in open(whole / "metrics.jsonl"))
    b = strip(json.loads(line) for line in open(cut / "metrics.jsonl"))
    assert [r["step"] for r in b if r["type"] == "step"] == [1, 2, 3, 4, 5]
    assert a == b, "the resumed run's metrics differ from the uninterrupted run's"
    wa = torch.load(whole / "checkpoint.pt")["model"]
    wb = torch.load(cut / "checkpoint.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ after resume"

# -----------------------------------------------------------------------------
# Faults and bad input


def test_two_process_run_stops_and_resumes_exactly(world, tmp_path):
    """A 2-process run (FSDP2 over gloo) stopped after 4 steps and resumed equals an uninterrupted one.

    The whole loop: rollouts split across ranks, HR's buffer shared, the sampler's copy of sharded
    weights, evaluation, sharded checkpoint, export."""
    def launch(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               os.path.join(ROOT, "tests", "harness.py"), world, str(out), "--total_steps", "7",
               "--stage1_steps", "5", "--eval_every", "3", "--save_every", "3", *extra]
        p = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600, capture_output=True, text=True)
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        return p.stdout

    def records(out):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("t_") and k != "tok_s"}
                for line in open(out / "metrics.jsonl")]

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    launch(whole)
    launch(parts, "--max_steps_this_run", "4")
    resumed = launch(parts)
    assert "resumed from" in resumed and "at step 4" in resumed, f"the second launch did not resume:\n{resumed[-2000:]}"
    a, b = records(whole), records(parts)
    assert any(r["type"] == "epoch" and "dropped" in r for r in a), "HR should act at step 4 (8 prompts, 2 a step)"
    assert any(r["type"] == "step" and r["grad_norm"] > 0 for r in a), "no step trained: the comparison is vacuous"
    assert a == b, "the stopped-and-resumed 2-process run differs from the uninterrupted one"
    wa, wb = (load_model(str(o / "policy")).state_dict() for o in (whole, parts))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"


def test_bad_data_and_config_stop_with_clear_errors(world, tmp_path):
    """A missing, empty or malformed data file, or an option out of range, stops the run naming what is wrong."""
    with pytest.raises(FileNotFoundError, match="math data file .*nope.jsonl.* does not exist"):
        run(world, tmp_path / "a", math_train=str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        run(world, tmp_path / "b", math_train=str(tmp_path / "empty.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "question": "q", "answer": "1"}\n{"id": "2", "question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'answer'"):
        run(world, tmp_path / "c", math_train=str(bad))
    bad.write_text('{"id": "1", "question": "q", "answer": "1"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        run(world, tmp_path / "d", math_train=str(bad))
    with pytest.raises(ValueError, match="G=1"):
        run(world, tmp_path / "e", G=1)


def test_a_sandbox_that_cannot_run_here_stops_the_run_before_training(world, tmp_path):
    """A --sandbox mode that cannot run here stops the run at start-up, naming the option (issue 15.1).

    Nothing falls back to a weaker mode, and no training step runs before the check."""
    out = tmp_path / "sb"
    # Without `unshare` on PATH the namespace modes cannot run (the interpreter's path is absolute).
    env = dict(os.environ, PATH="/nonexistent")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "harness.py"), world, str(out),
                        "--sandbox", "namespaces"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0, f"the run went ahead without its sandbox:\n{p.stdout[-2000:]}"
    assert "SandboxUnavailable" in p.stderr and "'namespaces'" in p.stderr and "--sandbox" in p.stderr, p.stderr[-2000:]
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or '"step"' not in metrics.read_text(), "training started before the check"


def test_resuming_with_other_options_is_refused(world, tmp_path):
    """A checkpoint resumes only with its own options (more steps allowed), else an error names the change."""
    out = tmp_path / "r"
    run(world, out, total_steps=2)
    with pytest.raises(ValueError, match=r"other options \(prompts_per_step: 2 then, 3 now\).*--no_resume"):
        run(world, out, total_steps=4, prompts_per_step=3)
    recs = run(world, out, total_steps=3)  # more steps is the same run, continued
    assert [r["step"] for r in recs if r["type"] == "step"] == [1, 2, 3]


def test_wandb_flag_without_wandb_says_how_to_install(world, tmp_path, monkeypatch):
    """--wandb_project without the wandb package stops with the pip command, not a bare ImportError."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install wandb"):
        run(world, tmp_path / "w", wandb_project="srpo-test")


def test_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path):
    """A tokenizer with more tokens than the model's vocabulary is refused at start-up, with both sizes."""
    # a model whose vocabulary is smaller than its tokenizer's
    w = harness.make_world(str(tmp_path / "w"), vocab_extra=-3)
    with pytest.raises(ValueError, match="tokenizer has 13 tokens but the model's vocabulary is 10"):
        run(w, tmp_path / "out")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    """A non-finite loss stops the run before the optimizer step; the last checkpoint stays finite and current."""
    out = tmp_path / "nan"
    run(world, out, total_steps=2, save_every=1)
    real = srpo.fused_grpo_loss
    monkeypatch.setattr(srpo, "fused_grpo_loss", lambda *a, **k: (lambda l, s: (l * float("nan"), s))(*real(*a, **k)))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        run(world, out, total_steps=6, save_every=1)
    ck = torch.load(out / "checkpoint.pt")
    steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
    done = max(r["step"] for r in steps if r["type"] == "step")
    assert done < 6, "the run should have stopped at the NaN"
    # (a step whose groups all have zero advantage trains nothing, so it may finish cleanly)
    assert ck["state"]["step"] == done, "the checkpoint must be the last step that completed"
    assert all(torch.isfinite(v).all() for v in ck["model"].values()), "NaN reached the saved weights"
    assert not (out / "checkpoint.pt.tmp").exists()


def test_reward_worker_crash_scores_zero_and_training_goes_on(tmp_path, crashing_workers):
    """A reward worker that dies scores 0 for its rollouts, counted in reward_errors, and training goes on."""
    # Real rewards (no harness reward): one math answer is the reference that kills its worker.
    w = harness.make_world(str(tmp_path / "w"), math_answers=["1", crashing_workers])
    out = tmp_path / "out"
    srpo.main(harness.world_args(w, str(out), total_steps=2, prompts_per_step=2, eval_prompts=1))
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if '"step"' in line]
    steps = [r for r in steps if r["type"] == "step"]
    assert len(steps) == 2, "training must continue after a reward worker dies"
    assert sum(r["reward_errors"] for r in steps) >= 4, "each crashed rollout must be counted"
