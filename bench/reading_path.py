"""
How far a reader travels to follow one training step: the files, functions and jumps between files
that one step of srpo.main runs through, traced (sys.setprofile) in the tests' tiny world.

    python bench/reading_path.py [--root CHECKOUT]     # CHECKOUT: another commit's worktree, to compare

The trace starts when the loop asks the curriculum for the step's prompts (step 0) and ends when it
reaches the step boundary (step 7, the checkpoint and stop logic). It counts the project's own
functions (comprehensions and lambdas are part of the function they are written in), each file they
are in, and each distinct call from a function in one file to a function in another (a jump). Printed
twice: every project file, and without the support modules a first read skips (their names).
Scoring is the default reward (math-verify; stage 1 is math only, so no code runs).
"""
import argparse
import os
import sys
import tempfile

SUPPORT = {"common.py", "datafile.py", "memory.py", "checkpoint.py", "runfolder.py", "run.py", "errors.py",
           "weights.py"}
HIDDEN = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<lambda>")


def trace_step(root: str) -> list[tuple]:
    """(caller file, caller function, callee file, callee function) of every call in one step."""
    sys.path[:0] = [root, os.path.join(root, "tests")]
    import harness
    import srpo
    calls, state = [], {"on": False}

    def where(code):
        if code.co_filename.startswith("<"):   # frozen modules, generated code (dataclasses' __init__)
            return None
        path = os.path.abspath(code.co_filename)
        if not path.startswith(root + os.sep) or os.sep + "tests" + os.sep in path:
            return None
        return os.path.relpath(path, root), code.co_qualname

    def named(frame):  # the function a comprehension or lambda is written in
        while frame is not None and frame.f_code.co_name in HIDDEN:
            frame = frame.f_back
        return frame

    def profile(frame, event, arg):
        if event != "call" or frame.f_code.co_name in HIDDEN:
            return
        callee = where(frame.f_code)
        if callee is None:
            return
        if callee[1].endswith("next_batch") and not state["on"]:
            state["on"] = True
        if callee[1].endswith("step_boundary"):
            state["on"] = False
        if not state["on"]:
            return
        parent = named(frame.f_back)
        caller = where(parent.f_code) if parent is not None else None
        calls.append((*(caller or (None, None)), *callee))

    with tempfile.TemporaryDirectory() as tmp:
        world = harness.make_world(os.path.join(tmp, "world"))
        argv = harness.world_args(world, os.path.join(tmp, "run"), total_steps=1, stage1_steps=1,
                                  eval_domains="math", reward_workers=1)
        sys.setprofile(profile)
        try:
            srpo.main(argv + ["--eval_prompts", "1", "--eval_k", "1"])
        finally:
            sys.setprofile(None)
    return calls


def summary(calls: list[tuple], skip: set) -> str:
    kept = [c for c in calls if os.path.basename(c[2]) not in skip]
    functions = {(f, fn) for _, _, f, fn in kept}
    files = {f for f, _ in functions}
    jumps = {c for c in kept if c[0] is not None and c[0] != c[2]}
    per_file = ", ".join(f"{f} {sum(1 for g, _ in functions if g == f)}" for f in sorted(files))
    return f"{len(files)} files, {len(functions)} functions, {len(jumps)} jumps between files ({per_file})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    os.chdir(root)
    calls = trace_step(root)
    print(f"one training step of {root}")
    print("  every project file:       " + summary(calls, set()))
    print("  without support modules:  " + summary(calls, SUPPORT))


if __name__ == "__main__":
    main()
