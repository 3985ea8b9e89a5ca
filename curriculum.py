"""
SRPO's data schedule: the two stages (math, then math + code), the epochs, and history resampling
(HR), the in-memory buffer of each epoch's outcomes whose epoch-end filter drops the prompts a
policy already solves (arXiv 2504.14286). The training loop in srpo.py asks a Curriculum for each
step's prompts (next_batch, step 0 of the loop) and tells it each step's outcomes (record, step 4).
"""
import copy
import math
import random
from dataclasses import dataclass, field


def beta_tail(s: int, f: int, tau: float) -> float:
    """P(pass rate > tau) after s successes and f failures, under a uniform prior: the posterior is
    Beta(1 + s, 1 + f), whose tail has, for integer counts, the closed form P(Binomial(s + f + 1, tau) <= s)
    (a Beta(a, b) variable is above x exactly when fewer than a of a + b - 1 uniform draws fall below x).
    Summed in log space, so hundreds of rollouts neither overflow math.comb nor underflow tau**k."""
    n = s + f + 1
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(tau)
            + (n - k) * math.log1p(-tau) for k in range(s + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


@dataclass(frozen=True)
class DropRule:
    """When HR drops a prompt at an epoch end (--hr_rule, --hr_tau, --hr_q).

    all_correct (the report's rule): every rollout of the epoch was right. With G = 4 that is weak
    evidence: a prompt solved 70% of the time passes 4 of 4 a quarter of the time (0.7^4 = 0.24).
    posterior: every rollout of the epoch was right (a mixed group still teaches, so it is never
    dropped) *and* all the prompt's rollouts of this stage make a high pass rate likely:
    P(pass rate > tau | successes, failures) > q under a uniform prior (beta_tail). After n rollouts
    all right that is 1 - tau^(n + 1), so with tau = 0.9, q = 0.5 (the posterior median above 0.9):
      G = 32, all right once: 1 - 0.9^33 = 0.969 > 0.5, dropped, as by the report's rule;
      G = 4,  all right once: 1 - 0.9^5  = 0.410 < 0.5, kept;
              all right in two epochs (8 of 8): 1 - 0.9^9 = 0.613, dropped.
    For every G >= 6 one all-correct epoch is enough (1 - 0.9^7 = 0.522): at the report's G = 32 the
    two rules are the same rule; they differ only where G is small and one epoch proves little."""
    name: str = "all_correct"
    tau: float = 0.9
    q: float = 0.5

    def drops(self, seen: list[bool], successes: int, failures: int) -> bool:
        """seen: the prompt's outcomes this epoch; successes, failures: all of this stage's, seen included."""
        if not (seen and all(seen)):
            return False
        return self.name == "all_correct" or beta_tail(successes, failures, self.tau) > self.q


@dataclass
class History:
    outcomes: dict = field(default_factory=dict)  # prompt id -> [correct?] of every rollout this epoch
    dropped: dict = field(default_factory=dict)   # prompt id -> the first epoch without it
    counts: dict = field(default_factory=dict)    # prompt id -> [successes, failures] this stage: evidence

    def record(self, pid: str, correct: list[bool]):
        self.outcomes.setdefault(pid, []).extend(correct)
        c = self.counts.setdefault(pid, [0, 0])
        c[0] += sum(correct)
        c[1] += len(correct) - sum(correct)

    def resample(self, epoch_ids: list[str], next_epoch: int = 0, return_after: int = 0,
                 rule: DropRule = DropRule()) -> tuple[list[str], dict]:
        """The next epoch's prompts and the counts of what happened: drop the prompts `rule` says are
        solved (self.dropped names them, with next_epoch), keep mixed and all-wrong ones.
        Prompts without outcomes this epoch (never reached) are kept, as nothing is known of them.
        Dropped prompts stay out for the rest of the stage, or, with return_after = N > 0, rejoin
        after N epochs: the policy may have forgotten them (an extension; the report never returns them)."""
        # kept_all_correct: all right this epoch, kept for want of evidence (the posterior rule only)
        stats = {"dropped": 0, "kept_mixed": 0, "kept_all_wrong": 0, "kept_unseen": 0, "returned": 0,
                 "kept_all_correct": 0}
        kept = []
        for pid in epoch_ids:
            seen = self.outcomes.get(pid)
            if rule.drops(seen, *self.counts.get(pid, (0, 0))):
                self.dropped[pid] = next_epoch  # too easy now: zero advantage, nothing to learn
                stats["dropped"] += 1
                continue
            kept.append(pid)
            key = ("kept_unseen" if not seen else "kept_all_wrong" if not any(seen)
                   else "kept_all_correct" if all(seen) else "kept_mixed")
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


@dataclass
class Curriculum:
    """Where the run is in SRPO's data: the stage (1: math, 2: math + code), the epoch, this epoch's
    prompt order and position in it, and HR's buffer. The loop asks it for each step's prompts
    (next_batch) and tells it each step's outcomes (record); the stage switch and the epoch end, with
    HR's resampling, happen inside next_batch, which returns what it did as (line, record) events
    for the loop to print and log."""
    stage_ids: dict = field(default_factory=dict)  # stage -> the prompt ids of that stage
    per_step: int = 1                              # prompts per step
    seed: int = 0
    hr: bool = True                                # --no_hr: every epoch holds every prompt of the stage
    return_after: int = 0                          # --hr_return_after
    stage1_steps: int = 0
    stage1_epochs: int = 0                         # if > 0, the switch counts epochs, not steps
    rule: DropRule = DropRule()                    # --hr_rule, --hr_tau, --hr_q
    # Where the run is: what a checkpoint saves (state_dict)
    stage: int = field(default=1, init=False)
    epoch: int = field(default=0, init=False)
    order: list = field(default_factory=list, init=False)  # this epoch's prompt ids, in order
    pos: int = field(default=0, init=False)                # next index into order
    history: History = field(default_factory=History, init=False)

    def __post_init__(self):
        self.order = epoch_order(self.stage_ids.get(1, []), self.seed, 1, 0)

    def next_batch(self, step: int) -> tuple[list[str] | None, list[tuple[str, dict | None]]]:
        """This step's prompt ids, or None when stage 2 ran dry (the run ends), and the events on the
        way: (line to print, record to log or None)."""
        events = []  # returned, not printed here: only the loop knows the rank and the metrics file
        while True:  # an epoch end may be followed by a stage switch, or by empty epochs (return_after)
            # --- stage switch: math only -> math + code, with a fresh HR buffer
            if self.stage == 1 and ((self.stage1_epochs and self.epoch >= self.stage1_epochs)
                                    or (not self.stage1_epochs and step >= self.stage1_steps)):
                events.append(self._begin_stage2(step))
            if self.pos < len(self.order):
                batch = self.order[self.pos:self.pos + self.per_step]
                self.pos += len(batch)
                return batch, events
            # --- epoch end: history resampling builds the next epoch's prompt list
            if self.hr:
                hist = self.history
                kept, hr = hist.resample(self.order, self.epoch + 1, self.return_after, self.rule)
            else:  # GRPO: every prompt again; what HR would have dropped is counted and named all the same
                hist = History(outcomes=self.history.outcomes, counts=self.history.counts)
                _, hr = hist.resample(self.order, self.epoch + 1, rule=self.rule)
                kept, self.history.outcomes = list(self.stage_ids[self.stage]), {}
            gone = sorted(pid for pid, e in hist.dropped.items() if e == self.epoch + 1)  # dropped just now
            self.epoch, self.pos = self.epoch + 1, 0
            self.order = epoch_order(kept, self.seed, self.stage, self.epoch)
            # The line shows the counts; the record also names the dropped ids, for an analysis to follow.
            events.append((f"step {step}: epoch {self.epoch} of stage {self.stage}, {len(kept)} prompts | "
                           + ("" if self.hr else "HR off, it would have: ")
                           + " | ".join(f"{k} {v}" for k, v in hr.items()),
                           {"type": "epoch", "step": step, "stage": self.stage, "epoch": self.epoch,
                            "prompts": len(kept), **hr, "dropped_ids": gone}))
            # an empty epoch ends the stage, unless dropped prompts will return (empty epochs until then)
            if not self.order and not (self.return_after and self.history.dropped):
                events.append((f"history resampling dropped every prompt of stage {self.stage}: "
                               f"nothing left to learn there", None))
                if self.stage == 2:
                    return None, events
                events.append(self._begin_stage2(step))

    def record(self, outcomes: list[tuple[str, list[bool]]]):
        """This step's (prompt id, [correct?] per rollout), for HR at the epoch end. Recorded with
        --no_hr too, to count what HR would have dropped."""
        for pid, correct in outcomes:
            self.history.record(pid, correct)

    def _begin_stage2(self, step: int) -> tuple[str, dict]:
        self.stage, self.epoch, self.pos, self.history = 2, 0, 0, History()  # HR starts afresh on the new set
        self.order = epoch_order(self.stage_ids[2], self.seed, 2, 0)
        return (f"step {step}: stage 2 begins, math + code, {len(self.order)} prompts",
                {"type": "stage", "step": step, "stage": 2, "prompts": len(self.order)})

    def prompt_ids(self) -> set:
        """Every prompt id it holds: this epoch's order and HR's buffer (a resumed run checks them)."""
        h = self.history
        return set(self.order) | set(h.outcomes) | set(h.dropped) | set(h.counts)

    def state_dict(self) -> dict:
        h = self.history
        return {"stage": self.stage, "epoch": self.epoch, "order": list(self.order), "pos": self.pos,
                "history": {"outcomes": copy.deepcopy(h.outcomes), "dropped": dict(h.dropped),
                            "counts": copy.deepcopy(h.counts)}}

    def load_state_dict(self, s: dict):
        h = s["history"]
        self.stage, self.epoch, self.order, self.pos = s["stage"], s["epoch"], s["order"], s["pos"]
        self.history = History(outcomes=copy.deepcopy(h["outcomes"]), dropped=dict(h["dropped"]),
                               counts=copy.deepcopy(h["counts"]))
