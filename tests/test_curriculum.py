"""The curriculum: SRPO's stage switch, epochs and history resampling (HR), without a model."""
import math

import curriculum

MATH = ["m0", "m1", "m2", "m3"]
CODE = ["c0", "c1"]


def make_curriculum(**over) -> curriculum.Curriculum:
    args = dict(stage_ids={1: MATH, 2: MATH + CODE}, per_step=2, seed=0, hr=True, return_after=0,
                stage1_steps=100, stage1_epochs=0) | over
    return curriculum.Curriculum(**args)


def run_epoch(cur: curriculum.Curriculum, step: int, correct: dict) -> tuple[int, list]:
    """Take batches until the epoch's order is used up, recording `correct[pid]` for each prompt."""
    seen = []
    while cur.pos < len(cur.order):
        batch, events = cur.next_batch(step)
        assert batch and not events, f"mid-epoch, a batch and no events were expected: {batch}, {events}"
        cur.record([(pid, correct.get(pid, [True, False])) for pid in batch])
        seen += batch
        step += 1
    return step, seen


def test_epoch_end_drops_all_correct_keeps_mixed_all_wrong_and_unseen():
    """HR at the epoch end: all-correct prompts leave; mixed, all-wrong and never-reached ones stay."""
    cur = make_curriculum()
    assert sorted(cur.order) == MATH and cur.order == curriculum.epoch_order(MATH, 0, 1, 0), "epoch 0 is stage 1's shuffle"
    batch, _ = cur.next_batch(0)
    cur.record([(pid, [True] * 4) for pid in batch])           # both all-correct
    batch2, _ = cur.next_batch(1)
    cur.record([(batch2[0], [True, False]), (batch2[1], [False, False])])
    batch3, events = cur.next_batch(2)
    dropped = set(batch)
    assert set(cur.order) == set(MATH) - dropped, f"epoch 1 holds {cur.order}, dropped should be {dropped}"
    assert batch3 == cur.order[:2] and cur.pos == 2, "the next batch comes from the new epoch's order"
    (line, rec), = events
    assert rec == {"type": "epoch", "step": 2, "stage": 1, "epoch": 1, "prompts": 2, "dropped": 2, "kept_mixed": 1,
                   "kept_all_wrong": 1, "kept_unseen": 0, "returned": 0, "kept_all_correct": 0,
                   "dropped_ids": sorted(dropped)}, rec
    assert line.startswith("step 2: epoch 1 of stage 1, 2 prompts | dropped 2"), line
    assert cur.order == curriculum.epoch_order(list(set(MATH) - dropped), 0, 1, 1), "the epoch's order is seeded"
    # An unseen prompt (the run stopped recording, e.g. a resume mid-epoch lost nothing) is kept.
    cur.record([(batch3[0], [True, True])])
    _, events = cur.next_batch(3)
    assert events[0][1]["kept_unseen"] == 1 and events[0][1]["dropped"] == 1, events


def test_stage_switch_by_steps():
    """With stage1_steps, stage 2 (math + code, a fresh HR buffer) begins at that step, not before."""
    cur = make_curriculum(stage1_steps=3)
    for step in range(3):
        batch, events = cur.next_batch(step)
        assert cur.stage == 1 and all(e[1]["type"] != "stage" for e in events if e[1]), f"step {step}: {events}"
        cur.record([(pid, [True, False]) for pid in batch])
    batch, events = cur.next_batch(3)
    assert cur.stage == 2 and cur.epoch == 0 and cur.history.outcomes == {} and not cur.history.dropped
    assert events == [("step 3: stage 2 begins, math + code, 6 prompts",
                       {"type": "stage", "step": 3, "stage": 2, "prompts": 6})], events
    assert cur.order == curriculum.epoch_order(MATH + CODE, 0, 2, 0) and batch == cur.order[:2], "stage 2's epoch 0"


def test_stage_switch_by_epochs():
    """With stage1_epochs, stage 2 begins once that many stage-1 epochs have ended, whatever the step."""
    cur = make_curriculum(stage1_epochs=2, stage1_steps=0)
    step, _ = run_epoch(cur, 0, {})
    _, events = cur.next_batch(step)                       # epoch 1 of stage 1 begins
    assert cur.stage == 1 and cur.epoch == 1 and [e[1]["type"] for e in events] == ["epoch"], events
    cur.record([(pid, [True, False]) for pid in cur.order[:2]])
    step, _ = run_epoch(cur, step + 1, {})
    batch, events = cur.next_batch(step)
    assert [e[1]["type"] for e in events] == ["epoch", "stage"], events  # epoch 2 ends stage 1 at once
    assert cur.stage == 2 and cur.epoch == 0 and batch == cur.order[:2], (cur.stage, cur.epoch)


def test_a_stage_that_runs_dry_ends():
    """A stage whose every prompt was solved ends: stage 1 goes on to stage 2, stage 2 ends the run."""
    cur = make_curriculum(stage_ids={1: MATH[:2], 2: MATH[:2] + CODE})
    step, _ = run_epoch(cur, 0, dict.fromkeys(MATH, [True] * 2))
    batch, events = cur.next_batch(step)
    assert [e[1] and e[1]["type"] for e in events] == ["epoch", None, "stage"], events
    assert events[0][1]["prompts"] == 0 and "dropped every prompt of stage 1" in events[1][0], events
    assert cur.stage == 2 and batch, "stage 2 begins after stage 1 ran dry"
    cur.record([(pid, [True] * 2) for pid in batch])
    step, _ = run_epoch(cur, step + 1, dict.fromkeys(MATH + CODE, [True] * 2))
    batch, events = cur.next_batch(step)
    assert batch is None, "stage 2 ran dry: the run must end"
    assert [e[1] and e[1]["type"] for e in events] == ["epoch", None], events


def test_return_after_passes_empty_epochs_until_prompts_return():
    """With return_after, a dry stage is not over: empty epochs pass until dropped prompts rejoin."""
    cur = make_curriculum(stage_ids={1: MATH[:2], 2: MATH[:2] + CODE}, return_after=3)
    step, _ = run_epoch(cur, 0, dict.fromkeys(MATH, [True] * 2))
    batch, events = cur.next_batch(step)
    recs = [e[1] for e in events]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4] and [r["prompts"] for r in recs] == [0, 0, 0, 2], recs
    assert recs[3]["returned"] == 2 and cur.stage == 1 and cur.epoch == 4, "dropped for epoch 1, back at 1 + 3"
    assert sorted(batch) == MATH[:2], batch


def test_no_hr_keeps_every_prompt():
    """--no_hr keeps every prompt and counts what HR would have done, under HR's keys (issue 14, item 3).

    --no_hr: every epoch holds every prompt of the stage, all-correct or not, and its record counts
    what HR would have dropped, under the keys of an HR epoch record (issue 14, item 3)."""
    cur = make_curriculum(hr=False)
    with_hr = make_curriculum()
    run_epoch(with_hr, 0, dict.fromkeys(MATH, [True] * 2))
    hr_keys = set(with_hr.next_batch(2)[1][0][1])
    outcomes = dict(dict.fromkeys(MATH, [True] * 2), m0=[False] * 2, m1=[True, False])
    for epoch in range(1, 4):
        # m0 all wrong, m1 mixed, the others all correct: counted anew each epoch
        step, _ = run_epoch(cur, 0, outcomes)
        batch, events = cur.next_batch(step)
        assert events == [(f"step {step}: epoch {epoch} of stage 1, 4 prompts | HR off, it would have: dropped 2 | "
                           f"kept_mixed 1 | kept_all_wrong 1 | kept_unseen 0 | returned 0 | "
                           f"kept_all_correct 0",
                           {"type": "epoch", "step": step, "stage": 1, "epoch": epoch, "prompts": 4, "dropped": 2,
                            "kept_mixed": 1, "kept_all_wrong": 1, "kept_unseen": 0, "returned": 0,
                            "kept_all_correct": 0, "dropped_ids": ["m2", "m3"]})], events
        assert set(events[0][1]) == hr_keys, "an epoch record has the same keys with HR on or off"
        assert cur.order == curriculum.epoch_order(MATH, 0, 1, epoch), "the order must be the stage's seeded shuffle"
        cur.record([(pid, outcomes[pid]) for pid in batch])


def test_state_round_trips_through_the_checkpoint_layout():
    """A curriculum restored from its state_dict continues exactly as the original.

    state_dict -> load_state_dict gives a curriculum that continues identically (and the layout is
    the checkpoint's: stage, epoch, order, pos, history {outcomes, dropped, counts})."""
    a = make_curriculum(return_after=2)
    step, _ = run_epoch(a, 0, {"m0": [True] * 2, "m1": [False, False]})
    a.next_batch(step)
    a.record([(a.order[0], [True, False])])
    s = a.state_dict()
    assert set(s) == {"stage", "epoch", "order", "pos", "history"}, set(s)
    assert set(s["history"]) == {"outcomes", "dropped", "counts"}, set(s["history"])
    b = make_curriculum(return_after=2)
    b.load_state_dict(s)
    for i in range(12):
        ba, ea = a.next_batch(step + 1 + i)
        bb, eb = b.next_batch(step + 1 + i)
        assert (ba, ea) == (bb, eb), f"step {step + 1 + i}: a resumed curriculum diverged"
        out = [(pid, [pid < "m2", False]) for pid in ba]
        a.record(out)
        b.record(out)
    assert a.state_dict() == b.state_dict(), "the states diverged"



# -----------------------------------------------------------------------------
# The posterior drop rule (--hr_rule posterior) and the evidence it keeps


def test_beta_tail_matches_scipy():
    """beta_tail's P(Binomial(s+f+1, tau) <= s) is Beta(1+s, 1+f)'s tail (scipy's), large counts too."""
    import scipy.stats as stats
    counts = [(0, 0), (4, 0), (8, 0), (32, 0), (7, 1), (15, 1), (3, 5), (0, 9), (300, 20), (900, 100),
              (2000, 0)]
    for s, f in counts:
        for tau in (0.05, 0.5, 0.9, 0.99):
            ours, ref = curriculum.beta_tail(s, f, tau), stats.beta.sf(tau, 1 + s, 1 + f)
            assert math.isclose(ours, ref, rel_tol=1e-9, abs_tol=1e-300), f"s={s} f={f} tau={tau}: {ours}"


def test_posterior_rule_at_large_and_small_G():
    """tau 0.9, q 0.5: G = 32 all right once drops (as the report's rule); G = 4 once keeps, twice drops."""
    rule = curriculum.DropRule("posterior", tau=0.9, q=0.5)
    # all n right: P(p > 0.9) = 1 - 0.9^(n+1); 0.9^33 = 0.0309, 0.9^5 = 0.59049, 0.9^9 = 0.38742
    assert math.isclose(curriculum.beta_tail(32, 0, 0.9), 1 - 0.9 ** 33) and curriculum.beta_tail(32, 0, 0.9) > 0.96
    assert math.isclose(curriculum.beta_tail(4, 0, 0.9), 0.40951), curriculum.beta_tail(4, 0, 0.9)
    assert rule.drops([True] * 32, 32, 0), "G = 32, all right once: the report's rule and this one drop it"
    assert not rule.drops([True] * 4, 4, 0), "G = 4, all right once (P = 0.410): too little evidence, kept"
    assert rule.drops([True] * 4, 8, 0), "G = 4, all right in two epochs (P = 0.613): dropped"
    # 7 of 8 then all right: P(Bin(9, 0.9) <= 7) = 1 - 9 * 0.9^8 * 0.1 - 0.9^9 = 0.2252: kept
    assert not rule.drops([True] * 4, 7, 1), "one failure among 8 keeps it"
    assert math.isclose(curriculum.beta_tail(7, 1, 0.9), 1 - 9 * 0.9 ** 8 * 0.1 - 0.9 ** 9)
    # the smallest G at which one all-correct epoch drops: 1 - 0.9^6 = 0.469, 1 - 0.9^7 = 0.522
    assert [g for g in range(2, 33) if rule.drops([True] * g, g, 0)] == list(range(6, 33)), "from G = 6 on"
    assert not rule.drops([True, False] * 16, 300, 16), "a mixed epoch is never dropped, whatever came before"
    assert not rule.drops([], 300, 0), "a prompt unseen this epoch is never dropped"
    report = curriculum.DropRule()
    assert report.drops([True] * 4, 4, 0) and not report.drops([True, False], 1, 1), "default: the report's"


def test_posterior_curriculum_waits_for_a_second_all_correct_epoch():
    """With the posterior rule at G = 4, an all-right prompt stays one more epoch (kept_all_correct) and
    leaves after its second all-right epoch; the epoch records name the ids dropped."""
    cur = make_curriculum(rule=curriculum.DropRule("posterior"), per_step=4)  # an epoch is one step
    batch, _ = cur.next_batch(0)
    first = dict(m0=[True] * 4, m1=[True] * 4, m2=[True, False, True, True], m3=[False] * 4)
    cur.record([(pid, first[pid]) for pid in batch])
    batch, events = cur.next_batch(1)
    rec = events[0][1]
    assert (rec["dropped"], rec["kept_all_correct"], rec["kept_mixed"]) == (0, 2, 1), rec
    assert rec["dropped_ids"] == [], rec
    assert cur.history.counts == {"m0": [4, 0], "m1": [4, 0], "m2": [3, 1], "m3": [0, 4]}, cur.history.counts
    # m0: 8 of 8 (P = 0.613) leaves; m2: 7 of 8, all right now (P = 0.225) stays; m1 mixed now stays
    second = dict(m0=[True] * 4, m1=[True, True, False, True], m2=[True] * 4, m3=[False] * 4)
    cur.record([(pid, second[pid]) for pid in batch])
    _, events = cur.next_batch(2)
    rec = events[0][1]
    assert rec["dropped_ids"] == ["m0"] and rec["dropped"] == 1, rec
    assert (rec["kept_all_correct"], rec["kept_mixed"], rec["kept_all_wrong"]) == (1, 1, 1), rec
    assert sorted(cur.order) == ["m1", "m2", "m3"] and cur.history.dropped == {"m0": 2}, cur.order


def test_no_hr_names_the_ids_the_posterior_rule_would_drop():
    """--no_hr with the posterior rule keeps every prompt, adds up the stage's counts, names the ids."""
    cur = make_curriculum(hr=False, rule=curriculum.DropRule("posterior"), per_step=4)  # an epoch is one step
    correct = dict.fromkeys(MATH, [True] * 4) | {"m3": [True, False, False, False]}
    expect = [[], ["m0", "m1", "m2"], ["m0", "m1", "m2"]]  # 4 of 4: kept; 8 of 8 and 12 of 12: would drop
    batch, _ = cur.next_batch(0)
    for epoch in range(3):
        cur.record([(pid, correct[pid]) for pid in batch])
        batch, events = cur.next_batch(epoch + 1)
        rec = events[0][1]
        assert rec["dropped_ids"] == expect[epoch] and rec["prompts"] == 4, f"epoch {epoch + 1}: {rec}"
        assert rec["dropped"] == len(expect[epoch]) and sorted(batch) == MATH, rec
        assert cur.history.counts["m0"] == [4 * (epoch + 1), 0], cur.history.counts
    assert cur.history.counts["m3"] == [3, 9], "every recorded rollout of the stage counts"


def test_counts_reset_at_the_stage_switch():
    """The posterior's evidence belongs to a stage: stage 2 begins with no counts."""
    cur = make_curriculum(rule=curriculum.DropRule("posterior"), stage1_steps=2)
    for step in range(2):
        batch, _ = cur.next_batch(step)
        cur.record([(pid, [True] * 4) for pid in batch])
    assert len(cur.history.counts) == 4, cur.history.counts
    cur.next_batch(2)
    assert cur.stage == 2 and cur.history.counts == {}, cur.history.counts


def test_posterior_state_round_trips_mid_stage():
    """A posterior-rule curriculum resumed from its state_dict mid-epoch drops exactly as the original
    (the counts are checkpointed)."""
    rule = curriculum.DropRule("posterior")
    a = make_curriculum(rule=rule)
    outcome = lambda pid, step: [pid in ("m0", "m1") or (step % 3 == 0), True, True, pid != "m3"]
    step = 0
    for _ in range(5):  # past an epoch end, into the next epoch
        batch, _ = a.next_batch(step)
        a.record([(pid, outcome(pid, step)) for pid in batch])
        step += 1
    s = a.state_dict()
    assert s["history"]["counts"] == a.history.counts and s["history"]["counts"], s["history"]
    b = make_curriculum(rule=rule)
    b.load_state_dict(s)
    for i in range(step, step + 16):
        ba, ea = a.next_batch(i)
        bb, eb = b.next_batch(i)
        assert (ba, ea) == (bb, eb), f"step {i}: a resumed posterior curriculum diverged: {ea} != {eb}"
        if ba is None:
            break
        out = [(pid, outcome(pid, i)) for pid in ba]
        a.record(out)
        b.record(out)
    assert a.state_dict() == b.state_dict(), "the states diverged"
    assert {"m0", "m1"} <= set(a.history.dropped), f"the rule never acted, a weak test: {a.history.dropped}"
    s["history"]["counts"]["m0"][0] += 100
    assert a.history.counts["m0"][0] < 100, "state_dict must copy the counts, not share them"
