"""
Run: what srpo.main needs around the algorithm, in the order it needs it. Making one starts the
processes and checks, writing nothing, the run's folder and the model's config; entering loads the
tokenizer, claims the folder, catches the stop signals, decides the precision, verifies a checkpoint
to resume from and loads the policy; prepare() sizes the sampler for the data; resume() puts the run
where its checkpoint left it; log_*() write the metrics; step_boundary() saves and stops; finish()
ends it. Also the command line (a dataclass of options as checked flags), the stop signals, the
export in the Hugging Face format and the plot.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from checkpoint import (CKPT_DIR, CKPT_FILE, check_resumed_ids, check_resumed_rows, find_checkpoint,
                        load_checkpoint, open_checkpoint, row_digest, save_checkpoint, truncate_metrics)
from common import all_max, build_policy, close_dist, inference_copy, print0, setup_dist, together
from errors import UserError
from memory import decide_precision, generation_plan, kv_budget, make_cache, plan_memory, sampler_weights
from model import _packed_attention, num_params, require_compiled_flex
from rollout import KVCache
from runfolder import RunFolder, check_out_dir
from weights import load_hf_config, load_tokenizer, resolve_model_path, save_model
import rewards


def option(default, help: str, rule: str | tuple = ""):
    """A Config field: its default, one line of help, and its rule: a range in interval notation
    ("[0, 1)") or a tuple of choices, checked by parse_options."""
    meta = {"help": help} | ({"choices": tuple(rule)} if isinstance(rule, tuple)
                             else {"range": rule} if rule else {})
    return dataclasses.field(default=default, metadata=meta)


def parse_options(cls, argv=None, description: str = ""):
    """An instance of the dataclass cls from the command line (argv, or sys.argv), every value checked."""
    p = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        if f.type is bool or isinstance(f.default, bool):
            # --hr / --no_hr style switches
            p.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=f.default,
                           help=f.metadata["help"])
            p.add_argument(f"--no_{f.name}", dest=f.name, action="store_false")
        else:
            rule = f"range {f.metadata['range']}" if "range" in f.metadata else \
                f"one of {', '.join(f.metadata['choices'])}" if "choices" in f.metadata else ""
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                           help=f.metadata["help"] + (f"; {rule}" if rule else ""))
    cfg = cls(**vars(p.parse_args(argv)))
    # Every option against its rule, now: a bad value would otherwise surface late (temperature 0 as
    # a ZeroDivisionError after the first generation) or not at all (warmup_steps -1: a negative
    # learning rate, gradient ascent).
    for f in dataclasses.fields(cls):
        value = getattr(cfg, f.name)
        if "range" in f.metadata and not in_range(value, f.metadata["range"]):
            raise UserError(f"--{f.name}={value!r} is outside its range {f.metadata['range']} "
                            f"({f.metadata['help']})")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise UserError(f"--{f.name}={value!r}: choose one of {', '.join(f.metadata['choices'])}")
    return cfg


def in_range(value, interval: str) -> bool:
    """interval as written in maths: "[0, 1)" holds 0 and not 1; "inf" is no bound, so a value must be
    finite. NaN is in no range (every comparison with it is False)."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (what a cluster scheduler sends before it preempts a job) and SIGHUP
    (the terminal went away) ask the run to stop at the end of the current step, with a checkpoint.
    A second signal ends the process at once, as that signal would have without this class. Not
    within a second of the first, though: under torchrun a Ctrl-C or a scheduler's SIGTERM reaches
    every worker twice, from the terminal or scheduler and again forwarded by torchrun."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.signum = 0  # the signal received; 0 while none has been
        self.since = 0.0
        self.previous = {}

    def __enter__(self):
        # the main thread is the only one Python lets handle signals
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._stop) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _stop(self, signum, frame):
        if not self.signum:
            self.signum, self.since = signum, time.monotonic()
            if not dist.is_initialized() or dist.get_rank() == 0:
                # os.write, not print: the handler may have interrupted a print; sys.stdout is not re-entrant
                os.write(2, f"\n{signal.Signals(signum).name}: stopping at the end of this step, with a "
                            f"checkpoint; send a second signal to stop at once, without one\n".encode())
        elif time.monotonic() - self.since > 1.0:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # the default action now: the process ends, by that signal

    def agreed(self, device) -> int:
        """The signal to stop for, the same on every rank (any rank's), or 0 to go on. Called by all
        ranks at each step boundary, so that they all stop after the same step."""
        return all_max(self.signum, device)


class Run:
    def __init__(self, cfg, argv=None):
        self.cfg, self.argv = cfg, sys.argv[1:] if argv is None else argv
        self.rank, self.world, self.device = setup_dist()
        self.model_path = together(self._check, cfg)
        self.metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.steps_this_run = 0
        self.begun = False  # a record logged: from then on the run's folder stays, however the run ends
        self.wandb = self.bar = self.folder = None
        self._exit = contextlib.ExitStack()

    def _check(self, cfg) -> str:
        """The model's path, its config.json and the run's folder, checked before anything is written
        or loaded (a folder refused now costs no wait). A GGUF file's config is read with its weights:
        parsing its metadata takes about as long again."""
        path = resolve_model_path(cfg.model)
        check_out_dir(cfg.out_dir, path, cfg.resume)
        if not path.endswith(".gguf"):
            load_hf_config(path)
        return path

    def __enter__(self):
        self.tok = together(load_tokenizer, self.model_path)  # still nothing written
        self.folder = RunFolder(self.cfg.out_dir, self.model_path, self.cfg.resume, self.rank)
        self.stop = self._exit.enter_context(StopSignals())
        try:
            self._start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, *exc):
        if self.bar is not None:
            self.bar.close()
        self._exit.close()  # the signals' handlers back
        if exc_type is not None and not self.begun:
            self.folder.undo()  # a failed start: a folder found new or empty is left so
        else:
            self.folder.release()

    def _start(self):
        cfg, rank, world = self.cfg, self.rank, self.world
        # Precision, decided once: bf16 compute over fp32 master weights on a GPU (cast by FSDP2 when
        # sharded, by autocast when not), fp32 on a CPU; generation runs in the same compute dtype.
        self.prec = decide_precision(self.device.type, world, sharded=world > 1, dtype=cfg.dtype)
        # TF32 for what stays fp32
        torch.set_float32_matmul_precision("high" if self.prec.tf32 else "highest")
        print0("config:\n" + "\n".join(f"  {k} = {v}" for k, v in dataclasses.asdict(cfg).items()))
        # A checkpoint to resume from is verified and checked against these options before the weights load.
        self.ckpt = find_checkpoint(cfg.out_dir) if cfg.resume else None
        self.resumed = open_checkpoint(self.ckpt, cfg, rank, world) if self.ckpt else None
        # fp32 master weights, sharded if world > 1
        self.model = build_policy(self.model_path, self.device, rank, world, param_dtype=self.prec.compute)
        # On a GPU the update's packed attention runs flex_attention compiled or not at all: check it
        # compiles here, now, rather than run it eagerly out of memory at the first step.
        impl = _packed_attention(True, self.prec.compute) if self.device.type == "cuda" else "sdpa"
        if impl == "flex" or (impl == "flash" and cfg.shared_prompts):  # flash-attn has no mask for branches
            require_compiled_flex(self.device, self.prec.compute)
        if len(self.tok) > self.model.config.vocab_size:
            raise UserError(f"the tokenizer has {len(self.tok)} tokens but the model's vocabulary is "
                            f"{self.model.config.vocab_size}: they do not belong together")

    def prepare(self, problems: list, prompt_ids: dict, sandbox: str = ""):
        """For these prompts (every one the run will generate for): the memory plan, decided now (or a
        stop now, naming the option to change), the sampler's copy of the policy and its KV cache.
        Prints the plan: memory, generation (slots, rollouts, waves), rewards (workers, the sandbox mode
        `sandbox` that main checked, "" when no code runs)."""
        cfg, model, gen_dtype = self.cfg, self.model, self.prec.compute
        # 10% of the GPU left for CUDA, NCCL and fragmentation
        usable = (int(0.9 * torch.cuda.get_device_properties(self.device).total_memory)
                  if self.device.type == "cuda" else None)
        rollouts = -(-cfg.prompts_per_step // self.world) * cfg.G   # a step's rollouts on the busiest rank
        self.plan = plan_memory(model.config, num_params(model), self.prec, self.world,
                                max_len=max(map(len, prompt_ids.values())) + cfg.max_new_tokens,
                                capacity=usable, micro_tokens=cfg.micro_tokens, grad_ckpt=cfg.grad_ckpt,
                                gen_slots=cfg.gen_slots, rollouts=rollouts, kl_coef=cfg.kl_coef,
                                reference_loss=cfg.reference_loss)
        print0(self.plan)
        model.grad_ckpt = self.plan.grad_ckpt
        if self.plan.micro_tokens != cfg.micro_tokens:
            print0(f"memory plan: --micro_tokens {cfg.micro_tokens} "
                   f"lowered to {self.plan.micro_tokens} to fit")
        # The sampler's copy: none in one fp32 process (it samples from the training model itself).
        self.infer = None
        if self.world > 1 or gen_dtype != torch.float32:
            self.infer = inference_copy(model, dtype=gen_dtype, device=self.device)
        # One KV cache for the whole run, sized once for the longest prompt plus a full response. On a
        # GPU its recorded CUDA graphs are reused from step to step, which is why it is not rebuilt.
        budget, source = kv_budget(self.plan, self.device, cfg.gen_mem)
        self.cache = make_cache(self.infer or model, problems, prompt_ids, cfg.max_new_tokens, cfg.gen_slots,
                                budget, source, cfg.cuda_graphs)
        print0(f"sampler: {self.cache.n_slots} slots of {self.cache.max_len} positions, {gen_dtype}")
        print0(generation_plan(self.cache, rollouts, cfg.gen_slots, source))
        # As srpo.score_responses starts them: --reward_workers, 0 = this rank's share of the node's CPUs
        checked = (f"{sandbox} (--sandbox {cfg.sandbox}, checked at start-up)" if sandbox
                   else "none, no code runs")
        print0(f"rewards: {cfg.reward_workers or rewards.default_workers()} worker processes per rank | "
               f"code sandbox: {checked}")

    def extra_cache(self, problems: list, prompt_ids: dict) -> KVCache:
        """A KV cache of its own for a set whose prompts are longer than the run's (HumanEval): the run's
        cache and memory plan, and so every other number of the run, stay as they are without it."""
        cfg = self.cfg
        return make_cache(self.sampler(), problems, prompt_ids, cfg.max_new_tokens, cfg.gen_slots,
                          *kv_budget(self.plan, self.device, cfg.gen_mem), cfg.cuda_graphs)

    def resume(self, curriculum, by_id: dict, data_files: list[str], opt, sched) -> int:
        """Fresh (step 0, an empty metrics log), or where the last checkpoint left the weights, the
        optimizer opt, its schedule sched (both saved with every checkpoint from now on), the RNG and
        the curriculum (the metrics logged after it are forgotten: those steps run again), on the same
        data: the same ids, each row's content unchanged (or, with --accept_changed_data, changed and
        said so). Returns the step."""
        step, self.opt, self.sched = 0, opt, sched
        self.digests = {pid: row_digest(p) for pid, p in by_id.items()}  # saved with each checkpoint
        if self.resumed:
            position = load_checkpoint(self.ckpt, self.resumed, self.model, self.opt, self.sched, self.rank)
            curriculum.load_state_dict(position)
            check_resumed_ids(self.ckpt, curriculum.prompt_ids(), by_id, data_files)
            check_resumed_rows(self.ckpt, position["rows"], self.digests, by_id, self.cfg.accept_changed_data)
            step = position["step"]
            print0(f"resumed from {self.ckpt} at step {step} "
                   f"(stage {curriculum.stage}, epoch {curriculum.epoch})")
            if self.rank == 0:
                truncate_metrics(self.metrics_path, step)
        elif self.rank == 0:  # afresh: an earlier run's log and checkpoint go (a crash before the first
            # save would otherwise resume that run's checkpoint under this run's log)
            for path in (self.metrics_path, os.path.join(self.cfg.out_dir, CKPT_FILE)):
                if os.path.exists(path):
                    os.remove(path)
            shutil.rmtree(os.path.join(self.cfg.out_dir, CKPT_DIR), ignore_errors=True)
        if self.rank == 0:  # only now: a refused start or resume leaves the run's config.json as it was
            with open(os.path.join(self.cfg.out_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(self.cfg), f, indent=2)
        if self.cfg.wandb_project and self.rank == 0:
            try:
                import wandb
            except ImportError:
                raise ImportError("--wandb_project needs the wandb package: pip install wandb") from None
            self.wandb = wandb
            wandb.init(project=self.cfg.wandb_project, config=dataclasses.asdict(self.cfg),
                       name=os.path.basename(self.cfg.out_dir))
        return step

    def sampler(self):
        """The model to generate with, holding the current weights (every rank calls this together)."""
        return sampler_weights(self.model, self.infer)

    def log(self, record: dict):
        """One record (a dict with a "type" and a "step") to metrics.jsonl, and to W&B if asked."""
        self.begun = True
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb:
                self.wandb.log({f"{record['type']}/{k}": v for k, v in record.items()
                                if k not in ("type", "step")}, step=record["step"])

    def log_events(self, events: list):
        """The curriculum's (line to print, record to log or None) events."""
        for line, record in events:
            print0(line)
            if record:
                self.log(record)

    def log_eval(self, tag: str, step: int, res: dict):
        print0(f"eval ({tag}) step {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in res.items()))
        self.log({"type": "eval", "step": step, "tag": tag, **res})

    def log_step(self, m: dict, line: str):
        """A step's record, and its status line under the progress bar."""
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=self.cfg.total_steps, initial=m["step"] - 1, disable=self.rank != 0,
                            desc="srpo", dynamic_ncols=True)
        self.log(m)
        self.bar.update(1)
        if self.rank == 0:
            self.bar.write(line)

    def save(self, step: int, curriculum):
        position = {"step": step, "rows": self.digests} | curriculum.state_dict()
        save_checkpoint(self.cfg.out_dir, self.model, self.opt, self.sched, position, self.rank, self.cfg)

    def step_boundary(self, step: int, curriculum) -> int | None:
        """Where a run may stop: on a signal (every rank stops after the same step) or after
        --max_steps_this_run, with a checkpoint; else a periodic checkpoint if one is due. Returns
        main's exit status if the run stops here (0, or 128 + N for signal N), else None."""
        cfg = self.cfg
        self.steps_this_run += 1
        signalled = self.stop.agreed(self.device)
        stop_early = cfg.max_steps_this_run and self.steps_this_run >= cfg.max_steps_this_run
        due = cfg.save_every and step % cfg.save_every == 0 and step < cfg.total_steps
        if signalled or stop_early or due:
            self.save(step, curriculum)
        if not (signalled or stop_early):
            return None
        if self.bar is not None:
            self.bar.close()
        why = (signal.Signals(signalled).name if signalled
               else f"--max_steps_this_run {cfg.max_steps_this_run}")
        print0(f"stopped by {why} after step {step} ({self.steps_this_run} steps of this run); "
               f"checkpoint saved in {find_checkpoint(cfg.out_dir)}")
        if signalled:
            print0(f"to continue the run, rerun the same command, with the same options and --out_dir "
                   f"(any number of processes will do): "
                   f"{'torchrun --nproc_per_node ' + str(self.world) if self.world > 1 else 'python'} "
                   f"srpo.py {shlex.join(self.argv)}")
            return 128 + signalled
        return 0

    def finish(self, step: int, curriculum):
        """The last checkpoint, the policy exported in the Hugging Face format, the plot."""
        if self.bar is not None:
            self.bar.close()
        self.save(step, curriculum)
        policy = os.path.join(self.cfg.out_dir, "policy")
        export_policy(self.model, self.infer, self.tok, policy, self.rank)
        if self.rank == 0:
            plot_run(self.metrics_path, os.path.join(self.cfg.out_dir, "run.png"))
        print0(f"done: {step} steps; metrics in {self.metrics_path}; policy in {policy}")
        close_dist()


def export_policy(model, infer, tok, out: str, rank: int):
    """The final policy in the Hugging Face format, loadable by transformers and serving engines."""
    if dist.is_initialized():
        full = sampler_weights(model, infer)  # every rank joins the all-gathers
        if rank == 0:
            save_model(full, out, tokenizer=tok)
        dist.barrier()
    else:
        save_model(model, out, tokenizer=tok)


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
        ax[0, 0].plot([r["step"] for r in ev], [r[f"pass1_{dom}"] for r in ev], "o-",
                      label=f"held-out pass@1 {dom}")
        pts = [(r["step"], r[f"acc_{dom}"]) for r in steps if dom == "math" or r["n_code"]]
        if pts:
            ax[0, 1].plot(*zip(*pts), label=f"train accuracy {dom}")
    ax[1, 0].plot(x, [r["resp_len"] for r in steps])
    hr = [r for r in recs if r["type"] == "epoch" and "dropped" in r]
    if hr:
        ax[1, 1].bar([r["step"] for r in hr], [r["dropped"] for r in hr],
                     label="all correct: dropped (or, HR off, would be)")
        ax[1, 1].bar([r["step"] for r in hr], [r["kept_all_wrong"] for r in hr],
                     bottom=[r["dropped"] for r in hr], label="kept, all wrong")
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
