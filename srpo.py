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
  4. Two stages. Stage 1 trains on math only, to elicit long reasoning; stage 2 adds code. The
     switch happens after a configured number of steps (or epochs); HR runs within each stage.

Run it:
  python srpo.py                                   # the demo on the embedded SmolLM2-135M-Instruct
  torchrun --nproc_per_node=8 srpo.py --model /path/to/Qwen2.5-7B ...   # one 8-GPU node (train.sh)
"""
import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import rewards
from kernels import fused_grpo_loss, token_logprobs, token_logprobs_reference
from model import Transformer, load_tokenizer, resolve_model_path
from rollout import KVCache, generate, inference_copy

# -----------------------------------------------------------------------------
# Config: every knob, with its default and why. Printed and saved with each run.


@dataclass
class Config:
    # model and data
    model: str = field(default="default", metadata={"help": "HF checkpoint folder or .gguf file; 'default' = embedded SmolLM2-135M-Instruct"})
    math_train: str = field(default="data/math_train.jsonl", metadata={"help": "math prompts (JSONL: id, domain, question, answer)"})
    code_train: str = field(default="data/code_train.jsonl", metadata={"help": "code prompts (JSONL: id, domain, question, tests); used in stage 2"})
    math_test: str = field(default="data/math_test.jsonl", metadata={"help": "held-out math prompts for evaluation"})
    code_test: str = field(default="data/code_test.jsonl", metadata={"help": "held-out code prompts for evaluation"})
    max_prompts: int = field(default=0, metadata={"help": "use only the first N prompts of each train file (0 = all)"})
    max_level: int = field(default=0, metadata={"help": "use only rows whose 'level' is <= N, train and test (rows without one always); 0 = all"})
    out_dir: str = field(default="runs/srpo", metadata={"help": "metrics, checkpoints and the exported policy go here"})
    seed: int = field(default=1234, metadata={"help": "every random choice derives from (seed, step, rank)"})
    # GRPO
    prompts_per_step: int = field(default=64, metadata={"help": "prompts per step across all ranks (paper: 256)"})
    G: int = field(default=8, metadata={"help": "rollouts per prompt, the group size (paper: 32)"})
    max_new_tokens: int = field(default=512, metadata={"help": "response length cap during training"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the loss uses the same)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling; < 1 makes the trainer recompute logp_old"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling, 0 = off; > 0 makes the trainer recompute logp_old"})
    eps_low: float = field(default=0.2, metadata={"help": "clip ratio below at 1 - eps_low"})
    eps_high: float = field(default=0.2, metadata={"help": "clip ratio above at 1 + eps_high (> eps_low = DAPO's clip-higher)"})
    adv_eps: float = field(default=1e-4, metadata={"help": "eps in (R - mean) / (std + eps)"})
    kl_coef: float = field(default=0.0, metadata={"help": "KL penalty to the initial policy (k3 estimator); 0 = off, as in SRPO"})
    format_coef: float = field(default=0.0, metadata={"help": "reward += format_coef * format reward (<think>/<answer> template); correctness alone decides HR"})
    language_penalty: float = field(default=0.0, metadata={"help": "subtract this from the reward of mixed-language responses (the report's penalty); 0 = off"})
    one_shot: bool = field(default=True, metadata={"help": "show one worked example (rewards.EXAMPLES) as an earlier chat turn; small models need it to find the template"})
    # optimisation
    lr: float = field(default=1e-6, metadata={"help": "AdamW learning rate (paper: constant 1e-6)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps, then constant"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)"})
    update_epochs: int = field(default=1, metadata={"help": "update passes over each step's rollouts; > 1 recomputes logp_old with the trainer"})
    micro_tokens: int = field(default=16384, metadata={"help": "token budget of one packed micro-batch (gradient accumulation over them)"})
    grad_ckpt: bool = field(default=False, metadata={"help": "activation checkpointing per transformer block: less memory, ~1/3 more compute"})
    reference_loss: bool = field(default=False, metadata={"help": "plain-torch loss instead of the Triton kernels, for debugging (CPU tensors use it anyway)"})
    # SRPO
    hr: bool = field(default=True, metadata={"help": "history resampling at each epoch end; --no_hr = plain GRPO"})
    hr_return_after: int = field(default=0, metadata={"help": "a dropped prompt rejoins after this many epochs (0 = never, as in the report)"})
    stage1_steps: int = field(default=100, metadata={"help": "steps of stage 1 (math) before code joins"})
    stage1_epochs: int = field(default=0, metadata={"help": "if > 0, switch to stage 2 after this many stage-1 epochs instead"})
    total_steps: int = field(default=200, metadata={"help": "steps in all (both stages)"})
    # evaluation, logging, checkpoints
    eval_every: int = field(default=25, metadata={"help": "evaluate every N steps, plus before the first and after the last (0 = only those)"})
    eval_prompts: int = field(default=100, metadata={"help": "held-out prompts per domain to evaluate on"})
    eval_k: int = field(default=4, metadata={"help": "samples per eval prompt: pass@1 is their mean accuracy"})
    eval_temperature: float = field(default=0.6, metadata={"help": "sampling temperature during evaluation"})
    eval_domains: str = field(default="math,code", metadata={"help": "comma-separated domains to evaluate (math, code)"})
    wandb_project: str = field(default="", metadata={"help": "also log every record to this Weights & Biases project (needs `pip install wandb`); empty = off"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end); 0 = only at the end"})
    resume: bool = field(default=True, metadata={"help": "continue from out_dir/checkpoint if one is there"})
    reward_workers: int = field(default=0, metadata={"help": "reward worker processes, 0 = number of CPU cores"})
    dtype: str = field(default="auto", metadata={"help": "generation dtype: auto = bf16 on GPU, fp32 on CPU (training keeps fp32 master weights)"})
    gen_slots: int = field(default=256, metadata={"help": "most sequences the sampler decodes at once (KV-cache slots)"})
    gen_mem: float = field(default=0.25, metadata={"help": "fraction of free GPU memory the KV cache may take, measured at start-up"})
    max_steps_this_run: int = field(default=0, metadata={"help": "stop (with a checkpoint) after N steps of this process; 0 = run to total_steps"})


def parse_config(argv=None) -> Config:
    p = argparse.ArgumentParser(description="SRPO training (see the docstring of srpo.py)")
    for f in dataclasses.fields(Config):
        if f.type is bool or isinstance(f.default, bool):
            # --hr / --no_hr style switches
            p.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=f.default, help=f.metadata["help"])
            p.add_argument(f"--no_{f.name}", dest=f.name, action="store_false")
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.G < 2:
        raise ValueError(f"G={cfg.G}: a group needs at least 2 rollouts to have a mean and a spread")
    if cfg.prompts_per_step < 1 or cfg.total_steps < 1:
        raise ValueError("prompts_per_step and total_steps must be >= 1")
    if not cfg.eval_domains or not set(cfg.eval_domains.split(",")) <= {"math", "code"}:
        raise ValueError(f"--eval_domains {cfg.eval_domains!r}: a comma-separated list of math and code")
    if cfg.dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--dtype {cfg.dtype!r}: choose auto, bf16 or fp32")
    return cfg

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


def close_dist():
    """Wait for every rank (rank 0 may still be writing), then tear the process group down."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_torchrun():
    """Call last, under torchrun. After all work is done and saved, torch's gloo backend sometimes
    aborts in its C++ destructors at interpreter exit ("terminate called without an active
    exception", about 1 run in 30 on torch 2.13 CPU, after the last line of the script had run),
    which torchrun reports as a failed run. Leave without running them."""
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over ranks (metrics, token counts); a no-op in one process."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()

# -----------------------------------------------------------------------------
# Data: JSONL prompt files, validated on load so a bad row fails loudly, with file, line and field.


@dataclass
class Problem:
    id: str
    domain: str       # "math" or "code"
    question: str
    reference: str    # math: the answer; code: the test code


REQUIRED = {"math": ("id", "question", "answer"), "code": ("id", "question", "tests")}


def load_problems(path: str, domain: str, limit: int = 0, max_level: int = 0) -> list[Problem]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{domain} data file {path!r} does not exist (make it with: python data/make_data.py)")
    problems, seen = [], set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: a row must be a JSON object")
            for key in REQUIRED[domain]:
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{path}:{lineno}: field {key!r} is missing or not a non-empty string")
            if row.get("domain", domain) != domain:
                raise ValueError(f"{path}:{lineno}: field 'domain' is {row['domain']!r}, this file holds {domain!r}")
            if row["id"] in seen:
                raise ValueError(f"{path}:{lineno}: field 'id' {row['id']!r} repeats an earlier row")
            seen.add(row["id"])
            if max_level and row.get("level", 0) > max_level:
                continue
            ref = row["answer"] if domain == "math" else row["tests"]
            problems.append(Problem(row["id"], domain, row["question"], ref))
            if limit and len(problems) == limit:
                break
    if not problems:
        raise ValueError(f"{domain} data file {path!r} is empty" + (f" at levels <= {max_level}" if max_level else ""))
    return problems


def encode_prompt(tok, p: Problem, one_shot: bool) -> list[int]:
    """The R1-Zero instructions (rewards.format_prompt) in the model's chat template, if it has one,
    optionally after one worked example of the same domain as an earlier exchange."""
    turns = []
    if one_shot:
        q, a = rewards.EXAMPLES[p.domain]
        turns = [("user", rewards.format_prompt(q, p.domain)), ("assistant", a)]
    turns.append(("user", rewards.format_prompt(p.question, p.domain)))
    if tok.chat_template:
        return list(tok.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    # A base model without a chat template reads a plain transcript, as in the R1-Zero paper.
    return tok("".join(f"{'User' if r == 'user' else 'Assistant'}: {c}\n" for r, c in turns) + "Assistant:")["input_ids"]

# -----------------------------------------------------------------------------
# History resampling: the in-memory buffer of this epoch's outcomes, and the epoch-end filter.


@dataclass
class History:
    outcomes: dict = field(default_factory=dict)  # prompt id -> [correct?] of every rollout this epoch
    dropped: dict = field(default_factory=dict)   # prompt id -> the first epoch without it

    def record(self, pid: str, correct: list[bool]):
        self.outcomes.setdefault(pid, []).extend(correct)

    def resample(self, epoch_ids: list[str], next_epoch: int = 0, return_after: int = 0) -> tuple[list[str], dict]:
        """The next epoch's prompts: drop all-correct ones, keep mixed and all-wrong ones.
        Prompts without outcomes this epoch (never reached) are kept, as nothing is known of them.
        Dropped prompts stay out for the rest of the stage, or, with return_after = N > 0, rejoin
        after N epochs: the policy may have forgotten them (an extension; the report never returns them)."""
        kept, stats = [], {"dropped": 0, "kept_mixed": 0, "kept_all_wrong": 0, "kept_unseen": 0, "returned": 0}
        for pid in epoch_ids:
            seen = self.outcomes.get(pid)
            if seen and all(seen):
                self.dropped[pid] = next_epoch  # too easy now: zero advantage, nothing to learn
                stats["dropped"] += 1
                continue
            kept.append(pid)
            key = "kept_unseen" if not seen else "kept_all_wrong" if not any(seen) else "kept_mixed"
            stats[key] += 1
        if return_after:
            back = [pid for pid, e in self.dropped.items() if next_epoch - e >= return_after]
            for pid in back:
                del self.dropped[pid]
            kept += back
            stats["returned"] = len(back)
        self.outcomes = {}
        return kept, stats


def epoch_order(ids: list[str], seed: int, stage: int, epoch: int) -> list[str]:
    # Shuffled by a seed of its own, so a resumed run sees exactly the same order.
    order = sorted(ids)
    random.Random(f"{seed}-{stage}-{epoch}").shuffle(order)
    return order

# -----------------------------------------------------------------------------
# Advantages: normalise rewards within each group of G rollouts of one prompt.


def group_advantages(rewards_: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards_: (P, G). Returns adv (P, G) and a (P,) bool mask of zero-advantage groups."""
    mean = rewards_.mean(dim=1, keepdim=True)                 # (P, 1)
    std = rewards_.std(dim=1, keepdim=True)                   # (P, 1), unbiased as in GRPO's paper code
    adv = (rewards_ - mean) / (std + eps)                     # (P, G)
    zero = (rewards_ == rewards_[:, :1]).all(dim=1)           # all rewards equal -> A = 0 exactly
    adv[zero] = 0.0
    return adv, zero

# -----------------------------------------------------------------------------
# The policy update: packed micro-batches by token budget, the fused clipped loss, one optimizer step.


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
    targets: torch.Tensor   # (T,) next tokens
    mask: torch.Tensor      # (T,) 1.0 where the target is a sampled response token
    adv: torch.Tensor       # (T,) the sequence's advantage on each of its tokens
    logp_old: torch.Tensor  # (T,)
    samples: list           # indices into the step's samples
    logp_ref: torch.Tensor | None = None  # (T,) under the initial policy, only for the KL term


def pack_micro_batches(samples: list[Sample], budget: int) -> list[list[int]]:
    """Greedy first-fit in sample order: sequences are never split, so one longer than the
    budget gets a micro-batch of its own."""
    groups, cur, used = [], [], 0
    for i, s in enumerate(samples):
        n = len(s.tokens) - 1
        if cur and used + n > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups


def make_micro_batch(samples: list[Sample], idx: list[int], device) -> MicroBatch:
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


def empty_micro_batch(device) -> MicroBatch:
    # A rank with fewer micro-batches than the others still has to join every FSDP collective:
    # it runs this two-token batch whose mask is zero, so it adds nothing to loss or gradients.
    z = torch.zeros
    return MicroBatch(z(1, 2, dtype=torch.long, device=device), torch.tensor([0, 2], dtype=torch.int32, device=device),
                      z(2, dtype=torch.long, device=device), z(2, device=device), z(2, device=device), z(2, device=device), [])


def trainer_logp(model, mb: MicroBatch, cfg: Config) -> torch.Tensor:
    """Per-token log-probs (T,) under `model`, no grad: logp_old for off-policy passes and
    truncated sampling, and logp_ref under the frozen initial policy for the KL term."""
    fn = token_logprobs_reference if cfg.reference_loss else token_logprobs
    with torch.no_grad():
        return model(mb.ids, cu_seqlens=mb.cu, head=lambda h, W: fn(
            h[0], W.to(h.dtype), mb.targets, temperature=cfg.temperature)).float()


def policy_update(model, opt, samples: list[Sample], cfg: Config, device, ref_model=None, world=1) -> dict:
    """Update passes over one step's rollouts (this rank's share). The loss is the token-level mean
    over *every* response token of the global batch, so each micro-batch's mean is re-weighted by
    its token count over the global count (and by `world`, because FSDP averages over ranks)."""
    # A zero advantage makes every term of a rollout's surrogate zero: it adds nothing to the
    # gradient, so its forward and backward are skipped (unless a KL term gives it a gradient).
    # Its tokens still count in n_tokens: the loss is a mean over *all* response tokens.
    trained = [s for s in samples if s.adv != 0.0 or cfg.kl_coef > 0]
    n_tokens, n_trained = all_sum([sum(len(s.tokens) - s.n_prompt for s in samples),
                                   sum(len(s.tokens) - s.n_prompt for s in trained)], device)  # global
    local = pack_micro_batches(trained, cfg.micro_tokens)
    n_micro = _all_max(len(local), device)
    mbs = [make_micro_batch(trained, g, device) for g in local]
    mbs += [empty_micro_batch(device) for _ in range(n_micro - len(mbs))]
    for mb in mbs:
        if cfg.kl_coef > 0:
            mb.logp_ref = trainer_logp(ref_model, mb, cfg)
        if cfg.update_epochs > 1 or cfg.top_p < 1.0 or cfg.top_k > 0:
            # The sampler's log-probs are of the *truncated* distribution when top-p/top-k is on;
            # with several passes the ratio must start from the trainer's own numbers.
            mb.logp_old = trainer_logp(model, mb, cfg)

    # bf16 compute with fp32 master weights: FSDP2's mixed-precision policy does it when sharded;
    # a single GPU process gets the same from autocast.
    amp = torch.device(device).type == "cuda" and not dist.is_initialized()

    def head(mb):
        def loss_fn(h, W):  # runs inside model.forward, where FSDP2 has the lm_head weight whole
            # Under autocast the final norm hands back fp32 h; the kernels' matmuls run in the
            # dtype they are given, so hand them bf16 (the tensor-core rate) explicitly.
            dt = torch.bfloat16 if amp else h.dtype
            return fused_grpo_loss(h[0].to(dt), W.to(dt), mb.targets, mb.logp_old, mb.adv, mb.mask,
                                   eps_low=cfg.eps_low, eps_high=cfg.eps_high, temperature=cfg.temperature,
                                   kl_coef=cfg.kl_coef, logp_ref=mb.logp_ref, reference=cfg.reference_loss)
        return loss_fn

    stats = {"loss": 0.0, "clip_frac": 0.0, "ratio_mean": 1.0, "approx_kl": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    for _ in range(cfg.update_epochs):
        opt.zero_grad(set_to_none=True)
        totals = torch.zeros(5, dtype=torch.float64, device=device)
        for mb in mbs:
            weight = mb.mask.sum() / max(n_tokens, 1.0) * world  # this micro-batch's share of the mean
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss, st = model(mb.ids, cu_seqlens=mb.cu, head=head(mb))
            (loss * weight).backward()
            ntok = mb.mask.sum()
            totals += torch.stack([loss.detach() * ntok, st.clip_frac * ntok, st.ratio_mean * ntok,
                                   st.approx_kl * ntok, st.entropy * ntok]).double()
        totals = all_sum(totals.tolist(), device)
        loss_val = totals[0] / max(n_tokens, 1.0)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
            # Stop before the optimizer step: the weights stay as the last good checkpoint has them.
            raise FloatingPointError(f"non-finite loss ({loss_val}) or gradient norm ({grad_norm}); "
                                     f"stopping without applying this update")
        opt.step()
        stats["loss"] = loss_val
        if n_trained:  # the diagnostics describe the tokens that were trained on
            for k, v in zip(("clip_frac", "ratio_mean", "approx_kl", "entropy"), totals[1:]):
                stats[k] = v / n_trained
        stats["grad_norm"] = grad_norm
    stats["tokens"], stats["tokens_trained"] = n_tokens, n_trained
    return stats


def _all_max(x: int, device) -> int:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())

# -----------------------------------------------------------------------------
# Generation and scoring


def sampler_weights(model, infer):
    """The model the sampler should run, holding the policy's current weights. In one fp32 process
    that is the training model itself (infer is None). Otherwise `infer` is a plain, unsharded copy
    in the generation dtype, refreshed in place: under FSDP2 every parameter is all-gathered
    (rollout.inference_copy), so all ranks must call this together."""
    if infer is None:
        return model
    return inference_copy(model, into=infer)


def sample_responses(sampler, cache, tok, problems: list[Problem], prompt_ids: dict, n: int, temperature: float,
                     cfg: Config, seed: int) -> list:
    """n responses per problem, ordered problem-major: entries [i*n, (i+1)*n) belong to problems[i]."""
    if not problems:
        return []
    return generate(sampler, [prompt_ids[p.id] for p in problems], n=n, max_new_tokens=cfg.max_new_tokens,
                    temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k, eos_ids=eos_ids(tok),
                    seed=seed, cache=cache)


def score_responses(tok, problems: list[Problem], rolls: list, cfg: Config) -> list:
    """Rule-based rewards for every rollout at once, in parallel worker processes. A crashed or
    timed-out worker scores 0 for that rollout only, with Score.error saying why."""
    if not rolls:
        return []
    texts = [tok.decode(r.tokens, skip_special_tokens=True) for r in rolls]
    probs = [problems[r.prompt_idx] for r in rolls]
    return rewards.score_batch(texts, [p.domain for p in probs], [p.reference for p in probs],
                               workers=cfg.reward_workers or os.cpu_count(), language_penalty=cfg.language_penalty)


def eos_ids(tok) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):  # chat models end turns with these
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None:
            ids.add(i)
    return sorted(ids)


def evaluate(sampler, cache, tok, tests: dict, prompt_ids: dict, cfg: Config, rank: int, world: int, device, seed: int) -> dict:
    """pass@1 per domain, averaged over eval_k samples per held-out prompt (as the paper reports)."""
    out = {}
    for domain, problems in tests.items():
        mine = problems[rank::world]
        rolls = sample_responses(sampler, cache, tok, mine, prompt_ids, cfg.eval_k, cfg.eval_temperature, cfg, seed)
        scores = score_responses(tok, mine, rolls, cfg)
        correct, count = all_sum([sum(s.accuracy for s in scores), len(scores)], device)
        out[f"pass1_{domain}"] = correct / max(count, 1)
    return out

# -----------------------------------------------------------------------------
# Checkpoints: one file, written to a temporary name and renamed, so a crash mid-save never
# corrupts the last good one. Everything derives its randomness from (seed, step), so the saved
# position, weights, optimizer and HR buffer are enough for a resumed run to continue identically.


@dataclass
class TrainState:
    step: int = 0
    stage: int = 1
    epoch: int = 0
    order: list = field(default_factory=list)  # this epoch's prompt ids, in order
    pos: int = 0                               # next index into order
    history: History = field(default_factory=History)


# Options that may change between a run and its resumption; any other change makes it another run.
RESUMABLE = {"total_steps", "max_steps_this_run", "eval_every", "eval_prompts", "eval_k", "save_every",
             "resume", "reward_workers", "gen_slots", "gen_mem", "out_dir"}


def save_checkpoint(path: str, model, opt, sched, state: TrainState, rank: int, cfg: Config):
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_sd, opt_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, _rng_state())
    else:
        model_sd, opt_sd, rng = model.state_dict(), opt.state_dict(), [_rng_state()]
    if rank == 0:
        tmp = path + ".tmp"
        torch.save({"model": model_sd, "optimizer": opt_sd, "scheduler": sched.state_dict(), "config": dataclasses.asdict(cfg),
                    "state": dataclasses.asdict(state) | {"history": {"outcomes": state.history.outcomes,
                                                                      "dropped": state.history.dropped}},
                    "rng": rng}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str, model, opt, sched, rank: int, cfg: Config) -> TrainState:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    changed = {k: (v, getattr(cfg, k)) for k, v in ck["config"].items()
               if k not in RESUMABLE and getattr(cfg, k, None) != v}
    if changed:
        raise ValueError(f"{path} belongs to a run with other options ({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in changed.items())}); "
                         f"continue it with its options, or start afresh with --no_resume or another --out_dir")
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, opt, model_state_dict=ck["model"], optim_state_dict=ck["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    rng = ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    s = ck["state"]
    dropped = s["history"]["dropped"]  # a list of ids in checkpoints older than --hr_return_after
    h = History(outcomes=s["history"]["outcomes"], dropped=dropped if isinstance(dropped, dict) else dict.fromkeys(dropped, 0))
    return TrainState(step=s["step"], stage=s["stage"], epoch=s["epoch"], order=s["order"], pos=s["pos"], history=h)


def _rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate()}

# -----------------------------------------------------------------------------
# The training loop


def main(argv=None):
    cfg = parse_config(argv)
    rank, world, device = setup_dist()
    on_gpu = device.type == "cuda"
    gen_dtype = {"auto": torch.bfloat16 if on_gpu else torch.float32, "bf16": torch.bfloat16,
                 "fp32": torch.float32}[cfg.dtype]
    os.makedirs(cfg.out_dir, exist_ok=True)
    print0("config:\n" + "\n".join(f"  {k} = {v}" for k, v in dataclasses.asdict(cfg).items()))
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    # --- the policy, its tokenizer, the data
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    model = Transformer.from_pretrained(path, dtype=torch.float32, device=device)  # fp32 master weights
    model.grad_ckpt = cfg.grad_ckpt
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}: they do not belong together")
    stage_problems = {1: load_problems(cfg.math_train, "math", cfg.max_prompts, cfg.max_level)}
    stage_problems[2] = stage_problems[1] + load_problems(cfg.code_train, "code", cfg.max_prompts, cfg.max_level)
    tests = {d: load_problems(p, d, cfg.eval_prompts, cfg.max_level)
             for d, p in (("math", cfg.math_test), ("code", cfg.code_test)) if d in cfg.eval_domains.split(",")}
    by_id = {p.id: p for p in stage_problems[2]}
    prompt_ids = {p.id: encode_prompt(tok, p, cfg.one_shot) for p in stage_problems[2] + sum(tests.values(), [])}

    ref_model = None
    if cfg.kl_coef > 0:  # a frozen copy of the initial policy, only when the KL term is asked for
        ref_model = Transformer.from_pretrained(path, dtype=gen_dtype, device=device).requires_grad_(False)
    # The sampler's copy: none in one fp32 process (it samples from the training model itself).
    infer = None
    if world > 1 or gen_dtype != torch.float32:
        infer = inference_copy(model, dtype=gen_dtype, device=device)
    # One KV cache for the whole run, sized for the longest prompt plus a full response. On a GPU
    # its recorded CUDA graphs are reused from step to step, which is why it is not rebuilt.
    cache = KVCache.for_model(infer or model, max_len=max(map(len, prompt_ids.values())) + cfg.max_new_tokens,
                              max_slots=cfg.gen_slots, mem_fraction=cfg.gen_mem)
    print0(f"sampler: {cache.n_slots} slots of {cache.max_len} positions, {gen_dtype}")
    if world > 1:
        shard_model(model, param_dtype=gen_dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)

    # --- where we are: fresh, or resumed from the last checkpoint
    ckpt = os.path.join(cfg.out_dir, "checkpoint.pt")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if cfg.resume and os.path.exists(ckpt):
        st = load_checkpoint(ckpt, model, opt, sched, rank, cfg)
        print0(f"resumed from {ckpt} at step {st.step} (stage {st.stage}, epoch {st.epoch})")
        if rank == 0:  # forget metrics logged after that checkpoint: those steps run again
            _truncate_metrics(metrics_path, st.step)
    else:
        st = TrainState(order=epoch_order([p.id for p in stage_problems[1]], cfg.seed, 1, 0))
        if rank == 0 and os.path.exists(metrics_path):
            os.remove(metrics_path)

    wandb = None
    if cfg.wandb_project and rank == 0:
        try:
            import wandb
        except ImportError:
            raise ImportError("--wandb_project needs the wandb package: pip install wandb") from None
        wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), name=os.path.basename(cfg.out_dir))

    def log(record: dict):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if wandb:
                wandb.log({f"{record['type']}/{k}": v for k, v in record.items() if k not in ("type", "step")},
                          step=record["step"])

    def run_eval(tag):
        sampler = sampler_weights(model, infer)
        res = evaluate(sampler, cache, tok, tests, prompt_ids, cfg, rank, world, device, seed=cfg.seed + 7919)
        print0(f"eval ({tag}) step {st.step} | " + " | ".join(f"{k} {v:.3f}" for k, v in res.items()))
        log({"type": "eval", "step": st.step, "tag": tag, **res})

    def begin_stage2():
        st.stage, st.epoch, st.pos, st.history = 2, 0, 0, History()  # HR starts afresh on the new set
        st.order = epoch_order([p.id for p in stage_problems[2]], cfg.seed, 2, 0)
        print0(f"step {st.step}: stage 2 begins, math + code, {len(st.order)} prompts")
        log({"type": "stage", "step": st.step, "stage": 2, "prompts": len(st.order)})

    if st.step == 0:
        run_eval("before")
    from tqdm import tqdm
    bar = tqdm(total=cfg.total_steps, initial=st.step, disable=rank != 0, desc="srpo", dynamic_ncols=True)
    steps_this_run = 0
    while st.step < cfg.total_steps:
        # --- stage switch: math only -> math + code, with a fresh HR buffer
        if st.stage == 1 and ((cfg.stage1_epochs and st.epoch >= cfg.stage1_epochs)
                              or (not cfg.stage1_epochs and st.step >= cfg.stage1_steps)):
            begin_stage2()
        # --- epoch end: history resampling builds the next epoch's prompt list
        if st.pos >= len(st.order):
            if cfg.hr:
                kept, hr = st.history.resample(st.order, st.epoch + 1, cfg.hr_return_after)
            else:
                kept, hr = [p.id for p in stage_problems[st.stage]], {}
            st.epoch, st.pos = st.epoch + 1, 0
            st.order = epoch_order(kept, cfg.seed, st.stage, st.epoch)
            print0(f"step {st.step}: epoch {st.epoch} of stage {st.stage}, {len(kept)} prompts"
                   + ("" if not hr else " | " + " | ".join(f"{k} {v}" for k, v in hr.items())))
            log({"type": "epoch", "step": st.step, "stage": st.stage, "epoch": st.epoch, "prompts": len(kept), **hr})
            if not st.order and not (cfg.hr_return_after and st.history.dropped):  # else: empty epochs until some return
                print0(f"history resampling dropped every prompt of stage {st.stage}: nothing left to learn there")
                if st.stage == 2:
                    break
                begin_stage2()
            continue

        # --- 1. generate G rollouts for each of this rank's prompts
        t0 = time.time()
        batch = st.order[st.pos:st.pos + cfg.prompts_per_step]
        st.pos += len(batch)
        mine = [by_id[pid] for pid in batch[rank::world]]
        sampler = sampler_weights(model, infer)
        seed = cfg.seed * 1_000_003 + st.step * 1009 + rank
        rolls = sample_responses(sampler, cache, tok, mine, prompt_ids, cfg.G, cfg.temperature, cfg, seed)
        t1 = time.time()
        # --- 2. score them
        scores = score_responses(tok, mine, rolls, cfg)
        probs = [mine[r.prompt_idx] for r in rolls]
        t2 = time.time()
        # --- 3. group-normalised advantages
        # Correctness (acc) decides history resampling; the reward R_i adds the optional format
        # bonus and language penalty (Score.reward is accuracy less that penalty).
        acc = torch.tensor([s.accuracy for s in scores]).view(-1, cfg.G)             # (P, G)
        reward = torch.tensor([s.reward + cfg.format_coef * s.format for s in scores]).view(-1, cfg.G)
        adv, zero = group_advantages(reward, cfg.adv_eps)                            # (P, G), (P,)
        samples = [Sample(prompt_ids[probs[i].id] + r.tokens, len(prompt_ids[probs[i].id]), r.logprobs,
                          float(adv.view(-1)[i])) for i, r in enumerate(rolls)]
        # HR's buffer must be the same on every rank: share this step's outcomes
        outcomes = [(p.id, [bool(a) for a in acc[i].tolist()]) for i, p in enumerate(mine)]
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, outcomes)
            outcomes = [o for part in everyone for o in part]
        for pid, correct in outcomes:
            st.history.record(pid, correct)
        # --- 4. the policy update
        up = policy_update(model, opt, samples, cfg, device, ref_model, world)
        sched.step()
        t3 = time.time()

        # --- 5. metrics: summed over ranks, one status line, one JSONL record
        resp_len = [len(r.tokens) for r in rolls]
        dom = [p.domain for p in probs]
        sums = all_sum([reward.sum().item(), len(scores), float(zero.sum()), float(len(zero)), sum(resp_len),
                        sum(s.accuracy for s, d in zip(scores, dom) if d == "math"), dom.count("math"),
                        sum(s.accuracy for s, d in zip(scores, dom) if d == "code"), dom.count("code"),
                        sum(1 for s in scores if s.error)], device)
        st.step += 1
        steps_this_run += 1
        n = max(sums[1], 1)
        m = {"type": "step", "step": st.step, "stage": st.stage, "epoch": st.epoch,
             "reward": sums[0] / n, "acc_math": sums[5] / max(sums[6], 1), "acc_code": sums[7] / max(sums[8], 1),
             "n_code": sums[8], "zero_adv": sums[2] / max(sums[3], 1), "resp_len": sums[4] / n,
             "reward_errors": sums[9], "gen_tokens": sums[4], "tokens": up["tokens"],
             "tokens_trained": up["tokens_trained"], "loss": up["loss"], "clip_frac": up["clip_frac"],
             "ratio": up["ratio_mean"], "kl": up["approx_kl"], "entropy": up["entropy"], "grad_norm": up["grad_norm"],
             "lr": sched.get_last_lr()[0], "t_gen": t1 - t0, "t_score": t2 - t1, "t_update": t3 - t2,
             "tok_s": sums[4] / max(t3 - t0, 1e-9)}
        log(m)
        bar.update(1)
        if rank == 0:
            bar.write(status_line(m))

        stop_early = cfg.max_steps_this_run and steps_this_run >= cfg.max_steps_this_run
        if cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < cfg.total_steps:
            run_eval("periodic")
        if stop_early or (cfg.save_every and st.step % cfg.save_every == 0 and st.step < cfg.total_steps):
            save_checkpoint(ckpt, model, opt, sched, st, rank, cfg)
        if stop_early:
            print0(f"stopping after {steps_this_run} steps of this run (checkpoint saved at step {st.step})")
            bar.close()
            return
    bar.close()
    run_eval("after")
    save_checkpoint(ckpt, model, opt, sched, st, rank, cfg)
    export_policy(model, infer, tok, os.path.join(cfg.out_dir, "policy"), rank)
    if rank == 0:
        plot_run(metrics_path, os.path.join(cfg.out_dir, "run.png"))
    print0(f"done: {st.step} steps; metrics in {metrics_path}; policy in {os.path.join(cfg.out_dir, 'policy')}")
    close_dist()


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
        ax[1, 1].bar([r["step"] for r in hr], [r["dropped"] for r in hr], label="dropped (all correct)")
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
    with open(path) as f:
        records = [json.loads(line) for line in f]
    keep = [r for r in records if r["step"] < step or (r["step"] == step and r["type"] in ("step", "eval"))]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)


if __name__ == "__main__":
    main()
    exit_torchrun()
