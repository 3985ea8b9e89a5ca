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
     `--hr_rule posterior` also asks the prompt's rollouts of earlier epochs for evidence. HR and the
     stages below are SRPO's data schedule, in curriculum.py (Curriculum, History, DropRule).
  4. Two stages. Stage 1 trains on math only, to elicit long reasoning; stage 2 adds code. The
     switch happens after a configured number of steps (or epochs); HR runs within each stage.

The loop in main() runs these steps, numbered the same in the code:
  0. prompts: the Curriculum hands out this step's prompts (at an epoch end it first runs HR; at
     the configured step it switches stage);
  1. generate G responses for each prompt with the current policy (rollout.py);
  2. score them (rewards.py, or the reward_fn a fork passes to main);
  3. advantages within each group (group_advantages);
  4. record each prompt's outcomes in HR's buffer;
  5. update the policy (policy_update: packed micro-batches, the clipped token-level loss);
  6. log the step's metrics (and evaluate on held-out prompts every --eval_every steps);
  7. at the step boundary, save a checkpoint when one is due, and stop if asked to.
Everything else a run needs (the data files, processes, checkpoints, the run's folder, the plot) is
in small support modules a first read can skip: datafile, common, memory, checkpoint, runfolder, run.

Run it:
  python srpo.py                                   # the demo on the embedded SmolLM2-135M-Instruct
  torchrun --nproc_per_node=8 srpo.py --model /path/to/Qwen2.5-7B ...   # one 8-GPU node (train.sh)
"""
import dataclasses
import math
import sys
import time
from dataclasses import dataclass

import torch

import common
import rewards
from curriculum import Curriculum, DropRule
from datafile import Problem, load_data
from errors import exit_on_user_error
from srpo_kernels import fused_grpo_loss, token_logprobs, token_logprobs_reference
from memory import Precision
from rollout import eos_token_ids, generate
from run import Run, option, parse_options

# -----------------------------------------------------------------------------
# Config: every knob, with its default, what it does, and the values it allows (a range in interval
# notation, "[0, 1)" holds 0 but not 1, or the choices), checked at start-up. Printed and saved with
# each run; the README and the docs say more of each.


@dataclass
class Config:
    # model and data
    model: str = option("default", "HF checkpoint folder or .gguf file; default = the embedded SmolLM2-135M")
    math_train: str = option("data/math_train.jsonl", "math prompts (JSONL: id, question, answer)")
    code_train: str = option("data/code_train.jsonl", "code prompts (JSONL: id, question, tests), stage 2")
    math_test: str = option("data/math_test.jsonl", "held-out math prompts")
    code_test: str = option("data/code_test.jsonl", "held-out code prompts")
    max_prompts: int = option(0, "only the first N prompts of each train file (0 = all)", "[0, inf)")
    max_level: int = option(0, "only rows at 'level' <= N (and rows without one); 0 = all", "[0, inf)")
    out_dir: str = option("runs/srpo", "metrics, checkpoints and the exported policy")
    seed: int = option(1234, "every random choice derives from (seed, step, rank)", "[0, 2147483647]")
    # GRPO
    prompts_per_step: int = option(64, "prompts per step across all ranks (paper: 256)", "[1, inf)")
    G: int = option(8, "rollouts per prompt, the group size (paper: 32)", "[2, inf)")
    max_new_tokens: int = option(512, "response length cap in training", "[1, inf)")
    temperature: float = option(1.0, "sampling temperature (the loss divides the logits by it)", "(0, inf)")
    top_p: float = option(1.0, "nucleus sampling (< 1: the trainer recomputes logp_old)", "(0, 1]")
    top_k: int = option(0, "top-k sampling, 0 = off (> 0: the trainer recomputes logp_old)", "[0, inf)")
    eps_low: float = option(0.2, "clip the ratio below at 1 - eps_low", "[0, 1)")
    eps_high: float = option(0.2, "clip the ratio above at 1 + eps_high (> eps_low: clip-higher)", "[0, inf)")
    adv_eps: float = option(1e-4, "eps in (R - mean) / (std + eps)", "[0, inf)")
    kl_coef: float = option(0.0, "KL penalty to the initial policy (k3); 0 = off, as in SRPO", "[0, inf)")
    format_coef: float = option(0.0, "reward += this * the format reward (HR reads correctness)", "[0, inf)")
    language_penalty: float = option(0.0, "subtracted from a mixed-language response's reward", "[0, inf)")
    one_shot: bool = option(True, "one worked example (rewards.EXAMPLES) as an earlier chat turn")
    # optimisation
    lr: float = option(1e-6, "AdamW learning rate (paper: constant 1e-6)", "[0, inf)")
    warmup_steps: int = option(0, "linear warm-up steps, then constant", "[0, inf)")
    weight_decay: float = option(0.0, "AdamW weight decay", "[0, inf)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)", "[0, inf)")
    update_epochs: int = option(1, "passes over a step's rollouts (> 1: logp_old recomputed)", "[1, inf)")
    shared_prompts: bool = option(True, "a prompt's G responses share one forward and backward of it")
    micro_tokens: int = option(16384, "tokens a micro-batch packs (the memory plan may lower it)", "[1, inf)")
    grad_ckpt: str = option("auto", "activation checkpointing; auto = when the memory plan needs it",
                            ("auto", "on", "off"))
    reference_loss: bool = option(False, "the plain-torch loss instead of the Triton kernels (CPUs use it)")
    # SRPO
    hr: bool = option(True, "history resampling at each epoch end; --no_hr = plain GRPO")
    hr_return_after: int = option(0, "a dropped prompt rejoins after N epochs (0 = never)", "[0, inf)")
    hr_rule: str = option("all_correct", "HR's drop rule (DropRule)", ("all_correct", "posterior"))
    hr_tau: float = option(0.9, "posterior rule: the pass rate a dropped prompt is likely above", "(0, 1)")
    hr_q: float = option(0.5, "posterior rule: how likely it must be above hr_tau", "[0, 1)")
    stage1_steps: int = option(100, "steps of stage 1 (math) before code joins", "[0, inf)")
    stage1_epochs: int = option(0, "if > 0, stage 2 begins after N stage-1 epochs instead", "[0, inf)")
    total_steps: int = option(200, "steps in all (both stages)", "[1, inf)")
    # evaluation, logging, checkpoints
    eval_every: int = option(25, "evaluate every N steps, before the first and after the last", "[0, inf)")
    eval_prompts: int = option(100, "held-out prompts per domain (0 = all)", "[0, inf)")
    eval_k: int = option(4, "samples per held-out prompt: pass@1 is their mean accuracy", "[1, inf)")
    eval_temperature: float = option(0.6, "sampling temperature in evaluation (0 = greedy)", "[0, inf)")
    eval_domains: str = option("math,code", "the domains evaluated", ("math,code", "math", "code"))
    eval_humaneval: int = option(0, "also pass@1 on the first N HumanEval problems (164 = all)", "[0, 164]")
    wandb_project: str = option("", "also log to this Weights & Biases project (pip install wandb)")
    save_every: int = option(50, "checkpoint every N steps (and at the end; 0 = only then)", "[0, inf)")
    resume: bool = option(True, "continue from out_dir's checkpoint; --no_resume starts afresh")
    accept_changed_data: bool = option(False, "resume although data rows changed under the same ids")
    reward_workers: int = option(0, "reward processes per rank; 0 = its share of the CPUs", "[0, inf)")
    check_tests: str = option("full", "code tests at load: full runs the reference and trivial programs",
                              ("full", "static"))
    sandbox: str = option("full", "how generated code runs (docs/sandbox.md); never falls back",
                          rewards.SANDBOX_MODES)
    dtype: str = option("auto", "compute dtype; auto = bf16 on a GPU, fp32 on a CPU",
                        ("auto", "bf16", "fp32"))
    gen_slots: int = option(256, "most sequences decoded at once (KV-cache slots)", "[1, inf)")
    gen_mem: float = option(0.25, "on a CPU, the share of free RAM the KV cache may take", "(0, 1]")
    cuda_graphs: bool = option(True, "record the decode step as CUDA graphs on a GPU")
    max_steps_this_run: int = option(0, "stop, with a checkpoint, after N steps of this process", "[0, inf)")


def parse_config(argv=None) -> Config:
    return parse_options(Config, argv, description="SRPO training (see the docstring of srpo.py)")

# -----------------------------------------------------------------------------
# The prompt: the R1-Zero instructions in the model's chat template


def encode_prompt(tok, p: Problem, one_shot: bool) -> list[int]:
    """The R1-Zero instructions (rewards.format_prompt) in the model's chat template, if it has one,
    optionally after one worked example of the same domain as an earlier exchange."""
    turns = []
    if one_shot:
        q, a = rewards.EXAMPLES[p.domain]
        turns = [("user", rewards.format_prompt(q, p.domain)), ("assistant", a)]
    turns.append(("user", rewards.format_prompt(p.question, p.domain)))
    if tok.chat_template:
        chat = [{"role": r, "content": c} for r, c in turns]
        return list(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"])
    # A base model without a chat template reads a plain transcript, as in the R1-Zero paper.
    transcript = "".join(f"{'User' if r == 'user' else 'Assistant'}: {c}\n" for r, c in turns)
    return tok(transcript + "Assistant:")["input_ids"]

# -----------------------------------------------------------------------------
# Advantages: normalise rewards within each group of G rollouts of one prompt.


def group_advantages(reward: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """reward: (P, G). Returns adv (P, G) and a (P,) bool mask of zero-advantage groups."""
    mean = reward.mean(dim=1, keepdim=True)                   # (P, 1)
    std = reward.std(dim=1, keepdim=True)                     # (P, 1), unbiased as in GRPO's paper code
    adv = (reward - mean) / (std + eps)                       # (P, G)
    zero = (reward == reward[:, :1]).all(dim=1)               # all rewards equal -> A = 0 exactly
    adv[zero] = 0.0
    return adv, zero

# -----------------------------------------------------------------------------
# The policy update. The step's rollouts are packed into micro-batches of at most --micro_tokens
# tokens (with shared prompts, a prompt is computed once for all its responses); each pass runs
# the clipped token-level loss over all of them (gradient accumulation), then one optimizer step.


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
        rows = [len(samples[i].tokens) - P - 1 for i in idx]  # a response's input rows: all but its last
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
                      t(logp_old, torch.float32), order, branches=t(branches, torch.long),
                      rows=t(rows, torch.long))


def empty_micro_batch(device) -> MicroBatch:
    # A rank with fewer micro-batches than the others still has to join every FSDP collective:
    # it runs this two-token batch whose mask is zero, so it adds nothing to loss or gradients.
    z = torch.zeros
    return MicroBatch(z(1, 2, dtype=torch.long, device=device),
                      torch.tensor([0, 2], dtype=torch.int32, device=device),
                      z(2, dtype=torch.long, device=device), z(2, device=device), z(2, device=device),
                      z(2, device=device), [])


def pack_update(trained: list[Sample], shared: bool, budget: int, device) -> list[MicroBatch]:
    """The rollouts that train, packed into micro-batches of at most `budget` tokens: every rank gets
    as many as the busiest one, the rest empty (every rank must join every FSDP collective)."""
    if shared:
        mbs = [make_shared_micro_batch(trained, g, device)
               for g in pack_shared_micro_batches(trained, budget)]
    else:
        mbs = [make_micro_batch(trained, g, device) for g in pack_micro_batches(trained, budget)]
    return mbs + [empty_micro_batch(device) for _ in range(common.all_max(len(mbs), device) - len(mbs))]


@dataclass
class UpdateStats:
    """What one policy_update did, under the names the metrics log uses. The diagnostics (clip_frac
    to entropy) are means over the trained tokens of the last pass."""
    tokens: float            # response tokens of the step (the loss is their mean)
    tokens_trained: float    # of those, the ones in groups with a nonzero advantage (or any, with KL)
    loss: float = 0.0
    clip_frac: float = 0.0   # share of tokens whose ratio was clipped
    ratio: float = 1.0       # mean pi / pi_old
    kl: float = 0.0          # approximate KL(pi_old || pi)
    entropy: float = 0.0
    grad_norm: float = 0.0   # before clipping
    # Mean |sampler's log-prob - trainer's| of the trained tokens, on the same weights (before the
    # update): rounding noise in bf16 (different kernels, one numeric recipe); far above it, the two
    # disagree and the ratio carries sampler noise. With top-p/top-k it also holds the truncation.
    logp_diff: float = 0.0


def recomputes_logp_old(cfg: Config) -> bool:
    """Whether the trainer recomputes logp_old: the sampler's log-probs are of the *truncated*
    distribution when top-p/top-k is on, and with several passes the ratio must start from the
    trainer's own numbers."""
    return cfg.update_epochs > 1 or cfg.top_p < 1.0 or cfg.top_k > 0


def trainer_logp(model, mb: MicroBatch, temperature: float, prec: Precision,
                 reference_loss: bool) -> torch.Tensor:
    """Per-token log-probs (T,) under `model`, no grad: logp_old for off-policy passes and
    truncated sampling, and logp_ref under the frozen initial policy for the KL term. In the
    update's precision: an fp32 model without autocast would also send fp32 to flash-attn."""
    fn = token_logprobs_reference if reference_loss else token_logprobs
    with torch.no_grad(), prec.cast():
        return model(mb.ids, cu_seqlens=mb.cu, branches=mb.branches, head=lambda h, W: fn(
            prediction_rows(h, mb), W.to(h.dtype), mb.targets, temperature=temperature)).float()


def prediction_rows(h: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """(1, T, H) hidden states -> (N, H), the row that predicts each target."""
    return h[0] if mb.rows is None else h[0, mb.rows]


def grpo_head(mb: MicroBatch, cfg: Config, prec: Precision, gap: torch.Tensor | None):
    """The loss head model.forward runs on the last hidden states, where FSDP2 has the lm_head weight
    whole: the clipped surrogate of mb's tokens. With `gap`, it also adds the sum of |trainer's
    log-prob - sampler's| of the trained tokens into it (UpdateStats.logp_diff)."""
    def loss_fn(h, W):
        # The kernels' matmuls run in the dtype they are given: the compute dtype (bf16: tensor cores).
        dt = prec.compute if prec.autocast else h.dtype
        h, W = prediction_rows(h, mb).to(dt), W.to(dt)                                     # (N, H), (V, H)
        if gap is not None:
            with torch.no_grad():
                logp = (token_logprobs_reference if cfg.reference_loss else token_logprobs)(
                    h, W, mb.targets, temperature=cfg.temperature)                     # (N,)
                gap.add_(((logp.float() - mb.logp_old).abs() * mb.mask).sum())
        return fused_grpo_loss(h, W, mb.targets, mb.logp_old, mb.adv, mb.mask,
                               eps_low=cfg.eps_low, eps_high=cfg.eps_high, temperature=cfg.temperature,
                               kl_coef=cfg.kl_coef, logp_ref=mb.logp_ref, reference=cfg.reference_loss)
    return loss_fn


def mean_of(total, count):
    """total / count: a mean over what was counted, 0 when nothing was (total is then 0 too)."""
    return total / max(count, 1)


def update_pass(model, opt, mbs: list[MicroBatch], cfg: Config, prec: Precision, device, world: int,
                n_tokens: float, gap: torch.Tensor | None) -> dict:
    """One pass over the micro-batches: the loss of each, weighted by its share of the step's
    n_tokens response tokens, backward, accumulated; then the gradient clipped and one optimizer
    step. Returns the token-weighted sums over ranks of the loss and the diagnostics, and the
    gradient norm before clipping."""
    opt.zero_grad(set_to_none=True)
    sums = dict.fromkeys(("loss", "clip_frac", "ratio", "kl", "entropy"), torch.zeros((), dtype=torch.float64,
                                                                                  device=device))
    for mb in mbs:
        weight = mean_of(mb.mask.sum(), n_tokens) * world  # its share of the mean; FSDP averages over ranks
        with prec.cast():   # bf16 compute over fp32 master weights, in one process (FSDP2 casts when sharded)
            loss, st = model(mb.ids, cu_seqlens=mb.cu, branches=mb.branches,
                             head=grpo_head(mb, cfg, prec, gap))
        (loss * weight).backward()
        ntok = mb.mask.sum()
        for k, v in zip(sums, (loss.detach(), st.clip_frac, st.ratio_mean, st.approx_kl, st.entropy)):
            sums[k] = sums[k] + (v * ntok).double()
    sums = common.all_sum({k: v.item() for k, v in sums.items()}, device)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    sums["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not (math.isfinite(sums["loss"]) and math.isfinite(sums["grad_norm"])):
        # Stop before the optimizer step: the weights stay as the last good checkpoint has them.
        raise FloatingPointError(f"non-finite loss ({mean_of(sums['loss'], n_tokens)}) or gradient norm "
                                 f"({sums['grad_norm']}); stopping without applying this update")
    opt.step()
    return sums


def policy_update(model, opt, samples: list[Sample], cfg: Config, prec: Precision, device, ref_model=None,
                  world: int = 1, micro_tokens: int = 0) -> UpdateStats:
    """--update_epochs passes over one step's rollouts (this rank's share), in micro-batches of at
    most micro_tokens tokens (the memory plan's; 0 = --micro_tokens). The loss is the token-level mean
    over *every* response token of the global batch, so each micro-batch's mean is re-weighted by its
    token count over the global count."""
    # A zero advantage makes every term of a rollout's surrogate zero: it adds nothing to the
    # gradient, so its forward and backward are skipped (unless a KL term gives it a gradient).
    # Its tokens still count in n_tokens: the loss is a mean over *all* response tokens.
    trained = [s for s in samples if s.adv != 0.0 or cfg.kl_coef > 0]
    count = common.all_sum({"tokens": sum(len(s.tokens) - s.n_prompt for s in samples),
                     "tokens_trained": sum(len(s.tokens) - s.n_prompt for s in trained)}, device)  # global
    stats = UpdateStats(**count)
    mbs = pack_update(trained, cfg.shared_prompts, micro_tokens or cfg.micro_tokens, device)
    recompute = recomputes_logp_old(cfg)
    gap = torch.zeros((), dtype=torch.float64, device=device)  # sum |sampler - trainer| logp, trained tokens
    for mb in mbs:
        if cfg.kl_coef > 0:
            mb.logp_ref = trainer_logp(ref_model, mb, cfg.temperature, prec, cfg.reference_loss)
        if recompute:
            sampled = mb.logp_old
            mb.logp_old = trainer_logp(model, mb, cfg.temperature, prec, cfg.reference_loss)
            gap += ((mb.logp_old - sampled).abs() * mb.mask).sum()
    for pass_ in range(cfg.update_epochs):
        # the first pass also measures logp_diff, unless the recomputation above did
        sums = update_pass(model, opt, mbs, cfg, prec, device, world, count["tokens"],
                           gap if pass_ == 0 and not recompute else None)
        stats.loss, stats.grad_norm = mean_of(sums["loss"], count["tokens"]), sums["grad_norm"]
        if stats.tokens_trained:  # the diagnostics describe the tokens that were trained on
            for k in ("clip_frac", "ratio", "kl", "entropy"):
                setattr(stats, k, sums[k] / stats.tokens_trained)
    if stats.tokens_trained:
        stats.logp_diff = common.all_sum({"gap": gap.item()}, device)["gap"] / stats.tokens_trained
    return stats

# -----------------------------------------------------------------------------
# Generation, scoring, evaluation


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The sampler's seed for a training step on a rank: each (seed, step, rank) its own stream, the same
    again when a resumed run repeats the step."""
    return seed * 1_000_003 + step * 1009 + rank


def eval_seed(seed: int) -> int:
    """Every evaluation samples with the same seed, so pass@1 moves only with the policy."""
    return seed + 7919


def sample_responses(sampler, cache, tok, problems: list[Problem], prompt_ids: dict, n: int,
                     temperature: float, seed: int, max_new_tokens: int, top_p: float = 1.0,
                     top_k: int = 0) -> list:
    """n responses per problem, ordered problem-major: entries [i*n, (i+1)*n) belong to problems[i]."""
    if not problems:
        return []
    return generate(sampler, [prompt_ids[p.id] for p in problems], n=n, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=eos_token_ids(tok), seed=seed,
                    cache=cache)


def score_responses(tok, problems: list[Problem], rolls: list, cfg: Config) -> list:
    """Rule-based rewards for every rollout at once, in parallel worker processes. A crashed or
    timed-out worker scores 0 for that rollout only, with Score.error saying why. The default
    reward_fn of main(); a fork's has the same signature and returns the same rewards.Score."""
    if not rolls:
        return []
    texts = [tok.decode(r.tokens, skip_special_tokens=True) for r in rolls]
    probs = [problems[r.prompt_idx] for r in rolls]
    return rewards.score_batch(texts, [p.domain for p in probs], [p.reference for p in probs],
                               workers=cfg.reward_workers or rewards.default_workers(),
                               language_penalty=cfg.language_penalty, sandbox=cfg.sandbox)


def evaluate(sampler, cache, tok, tests: dict, prompt_ids: dict, cfg: Config, rank: int, world: int, device,
             seed: int, reward_fn=score_responses) -> dict:
    """pass@1 per domain, averaged over eval_k samples per held-out prompt (as the paper reports)."""
    out = {}
    for domain, problems in tests.items():
        mine = problems[rank::world]
        rolls = sample_responses(sampler, cache, tok, mine, prompt_ids, cfg.eval_k, cfg.eval_temperature,
                                 seed, cfg.max_new_tokens, cfg.top_p, cfg.top_k)
        scores = reward_fn(tok, mine, rolls, cfg)
        total = common.all_sum({"correct": sum(s.accuracy for s in scores), "count": len(scores)}, device)
        out[f"pass1_{domain}"] = mean_of(total["correct"], total["count"])
    return out


def step_record(step: int, cur: Curriculum, problems: list[Problem], rolls: list, scores: list,
                reward: torch.Tensor, zero: torch.Tensor, up: UpdateStats, device) -> dict:
    """A step's metrics: named sums over ranks, then the means the log and the status line show."""
    probs = [problems[r.prompt_idx] for r in rolls]
    math_scores = [s for s, p in zip(scores, probs) if p.domain == "math"]
    code_scores = [s for s, p in zip(scores, probs) if p.domain == "code"]
    t = common.all_sum({"reward": reward.sum().item(), "rollouts": len(scores), "zero_adv": float(zero.sum()),
                 "groups": float(len(zero)), "gen_tokens": sum(len(r.tokens) for r in rolls),
                 "correct_math": sum(s.accuracy for s in math_scores), "n_math": len(math_scores),
                 "correct_code": sum(s.accuracy for s in code_scores), "n_code": len(code_scores),
                 "reward_errors": sum(1 for s in scores if s.error)}, device)
    return {"type": "step", "step": step, "stage": cur.stage, "epoch": cur.epoch,
            "reward": mean_of(t["reward"], t["rollouts"]),
            "acc_math": mean_of(t["correct_math"], t["n_math"]),
            "acc_code": mean_of(t["correct_code"], t["n_code"]), "n_code": t["n_code"],
            "zero_adv": mean_of(t["zero_adv"], t["groups"]),
            "resp_len": mean_of(t["gen_tokens"], t["rollouts"]),
            "reward_errors": t["reward_errors"], "gen_tokens": t["gen_tokens"], "rollouts": t["rollouts"],
            **dataclasses.asdict(up)}

def status_line(m: dict) -> str:
    code = f" code {m['acc_code']:.2f}" if m["n_code"] else ""
    return (f"step {m['step']} | stage {m['stage']} | epoch {m['epoch']} | reward {m['reward']:.3f} | "
            f"acc math {m['acc_math']:.2f}{code} | zero_adv {m['zero_adv']:.2f} | len {m['resp_len']:.0f} | "
            f"clip {m['clip_frac']:.3f} | ent {m['entropy']:.2f} | "
            f"gen/score/upd {m['t_gen']:.1f}/{m['t_score']:.1f}/{m['t_update']:.1f}s | "
            f"{m['tok_s']:.0f} tok/s")

# -----------------------------------------------------------------------------
# The training loop


def main(argv=None, reward_fn=score_responses) -> int:
    """One run, fresh or resumed: set-up, the steps 0-7 below, the final evaluation and export.
    Returns the exit status: 0, or 128 + N when signal N stopped the run (with a checkpoint, as a
    shell reports a process killed by N). reward_fn(tok, problems, rolls, cfg) -> list[rewards.Score]
    scores rollouts, in training and in evaluation: a fork passes its own (README, "Fork it")."""
    common.check_torch()  # first: an older torch would fail only after the model loaded
    cfg = parse_config(argv)
    # Everything a user gives is checked before anything is written to --out_dir or the weights load:
    # run.Run checks the run's folder and the model's config, then every data row is (on every
    # rank together: under torchrun all stop at once, and rank 0 says why).
    run = Run(cfg, argv)
    stages, tests, humaneval = common.together(load_data, cfg)
    by_id = {p.id: p for p in stages[2]}
    every_prompt = stages[2] + sum(tests.values(), [])
    sandbox = ""  # the checked mode, when generated code will run
    if "code" in tests or humaneval or cfg.stage1_epochs or cfg.total_steps > cfg.stage1_steps:
        # Generated code will run: the sandbox mode asked for must work here, checked now rather
        # than at stage 2. It never falls back to a weaker one (sandbox.check_sandbox).
        sandbox = rewards.check_sandbox(cfg.sandbox)
        common.print0(f"code sandbox: {sandbox}")
    # Entering the Run: the tokenizer, the run's folder claimed (locked), the stop signals, the precision,
    # the policy
    with run:
        tok, rank, world, device = run.tok, run.rank, run.world, run.device
        prompt_ids = {p.id: encode_prompt(tok, p, cfg.one_shot) for p in every_prompt}
        run.prepare(every_prompt, prompt_ids, sandbox)  # the memory plan, the sampler's copy and KV cache
        if humaneval:
            # HumanEval's prompts are longer than the held-out sets': a KV cache of their own leaves the
            # run's cache and memory plan, and so every other number of the run, as they are without it.
            humaneval_ids = {p.id: encode_prompt(tok, p, cfg.one_shot) for p in humaneval}
            humaneval_cache = run.extra_cache(humaneval, humaneval_ids)
        # The optimizer (AdamW, as in the report; constant 1e-6 there) and its schedule: linear warm-up,
        # then constant. The KL term's reference: a frozen copy of the initial policy, as loaded.
        opt = torch.optim.AdamW(run.model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
        ref_model = None
        if cfg.kl_coef > 0:
            ref_model = common.inference_copy(run.model, dtype=run.prec.compute, device=device)
        cur = Curriculum({s: [p.id for p in ps] for s, ps in stages.items()}, cfg.prompts_per_step, cfg.seed,
                         cfg.hr, cfg.hr_return_after, cfg.stage1_steps, cfg.stage1_epochs,
                         DropRule(cfg.hr_rule, cfg.hr_tau, cfg.hr_q))
        step = run.resume(cur, by_id, [cfg.math_train, cfg.code_train], opt, sched)  # 0, or the checkpoint's

        def run_eval(tag):
            res = evaluate(run.sampler(), run.cache, tok, tests, prompt_ids, cfg, rank, world, device,
                           seed=eval_seed(cfg.seed), reward_fn=reward_fn)
            if humaneval:  # pass1_humaneval, after the others: their samples do not depend on it
                res |= evaluate(run.sampler(), humaneval_cache, tok, {"humaneval": humaneval}, humaneval_ids,
                                cfg, rank, world, device, seed=eval_seed(cfg.seed), reward_fn=reward_fn)
            run.log_eval(tag, step, res)

        if step == 0:
            run_eval("before")
        while step < cfg.total_steps:
            # --- 0. this step's prompts; the stage switch and the epoch end (HR) happen in there
            batch, events = cur.next_batch(step)
            run.log_events(events)
            if batch is None:  # stage 2 ran dry: nothing left to learn
                break
            # --- 1. generate G rollouts for each of this rank's prompts
            t0 = time.time()
            mine = [by_id[pid] for pid in batch[rank::world]]
            rolls = sample_responses(run.sampler(), run.cache, tok, mine, prompt_ids, cfg.G, cfg.temperature,
                                     rollout_seed(cfg.seed, step, rank), cfg.max_new_tokens, cfg.top_p,
                                     cfg.top_k)
            t1 = time.time()
            # --- 2. score them
            scores = reward_fn(tok, mine, rolls, cfg)
            t2 = time.time()
            # --- 3. group-normalised advantages. Correctness (acc) decides history resampling; the
            # reward R_i adds the optional format bonus and language penalty (Score.reward is accuracy
            # less that penalty).
            acc = torch.tensor([s.accuracy for s in scores]).view(-1, cfg.G)             # (P, G)
            reward = torch.tensor([s.reward + cfg.format_coef * s.format for s in scores]).view(-1, cfg.G)
            adv, zero = group_advantages(reward, cfg.adv_eps)                            # (P, G), (P,)
            prompts = [prompt_ids[mine[r.prompt_idx].id] for r in rolls]
            samples = [Sample(p + r.tokens, len(p), r.logprobs, float(a_i))
                       for p, r, a_i in zip(prompts, rolls, adv.view(-1))]
            # --- 4. HR's buffer records the outcomes of every rank's prompts (it is the same on all)
            cur.record(common.all_gather_lists([(p.id, [bool(c) for c in acc[i].tolist()])
                                         for i, p in enumerate(mine)]))
            # --- 5. the policy update
            up = policy_update(run.model, opt, samples, cfg, run.prec, device, ref_model, world,
                               run.plan.micro_tokens)
            sched.step()
            t3 = time.time()
            # --- 6. metrics, summed over ranks: one JSONL record, one status line
            step += 1
            m = step_record(step, cur, mine, rolls, scores, reward, zero, up, device)
            m |= {"lr": sched.get_last_lr()[0], "t_gen": t1 - t0, "t_score": t2 - t1, "t_update": t3 - t2,
                  "tok_s": m["gen_tokens"] / max(t3 - t0, 1e-9)}
            run.log_step(m, status_line(m))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
                run_eval("periodic")
            # --- 7. a step boundary: where a run may stop (a signal, --max_steps_this_run), with a checkpoint
            status = run.step_boundary(step, cur)
            if status is not None:
                return status
        run_eval("after")
        run.finish(step, cur)
    return 0


if __name__ == "__main__":
    status = exit_on_user_error("srpo", main)  # a user's mistake: one line and exit status 2, no traceback
    common.exit_torchrun(status)
    sys.exit(status)
