"""What the project requires, and that CI notices when it is missing: scipy only outside the trainer,
the torch version checked at start-up, CI failing on a skip that a missing package caused, and no
module of ours shadowing an installed package."""
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap

import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_trainer_does_not_import_scipy(tmp_path):
    """scipy is a requirement of bench/ and tests/ only: a whole training run (real rewards, an
    evaluation) in a fresh process never imports it."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        import harness, srpo
        harness.make_world({str(tmp_path / "world")!r})
        args = harness.world_args({str(tmp_path / "world")!r}, {str(tmp_path / "out")!r},
                                  total_steps=2, stage1_steps=1, eval_every=2)
        assert srpo.main(args) == 0, "the run failed"
        loaded = sorted(m for m in sys.modules if m == "scipy" or m.startswith("scipy."))
        print(f"scipy modules loaded: {{len(loaded)}} {{loaded[:3]}}")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert p.returncode == 0, f"the training run failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "scipy modules loaded: 0 []" in p.stdout, f"the trainer imported scipy: {p.stdout[-300:]}"


def _run_pytest(tmp_path, test_source: str, *options: str) -> subprocess.CompletedProcess:
    """pytest on one generated test file, with tests/conftest.py loaded as a plugin (as in tests/)."""
    (tmp_path / "test_generated.py").write_text(textwrap.dedent(test_source))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "conftest", *options,
           "test_generated.py"]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


GPU_SKIP_AND_A_PASS = f"""
    import pytest

    @pytest.mark.skip(reason={conftest.GPU_SKIP!r})
    def test_on_a_gpu():
        pass

    def test_plain():
        pass
"""


@pytest.mark.slow
def test_only_gpu_skips_fails_on_a_skip_for_a_missing_package(tmp_path):
    """With --only-gpu-skips (.ci/run), a test skipped because a package is missing fails the run,
    named with its reason; GPU skips alone pass (issue 28: scipy's tests skipped unseen everywhere)."""
    p = _run_pytest(tmp_path, GPU_SKIP_AND_A_PASS, "--only-gpu-skips")
    assert p.returncode == 0, f"a GPU skip alone must pass:\n{p.stdout[-3000:]}"
    missing = GPU_SKIP_AND_A_PASS + """
    def test_needs_a_package():
        pytest.importorskip("srpo_no_such_package")
    """
    p = _run_pytest(tmp_path, missing)
    assert p.returncode == 0, "without the option a skip is a skip (the README's command is unchanged)"
    p = _run_pytest(tmp_path, missing, "--only-gpu-skips")
    assert p.returncode == 1, f"a skip for a missing package passed --only-gpu-skips:\n{p.stdout[-3000:]}"
    summary = p.stdout[p.stdout.index("--only-gpu-skips: skipped for a reason"):]
    offending = "test_generated.py::test_needs_a_package: could not import 'srpo_no_such_package'"
    assert offending in summary, f"the offending skip is not listed with its reason:\n{summary}"
    assert "test_on_a_gpu" not in summary, f"the GPU skip was listed as offending:\n{summary}"
    p = _run_pytest(tmp_path, """
        import pytest
        pytest.importorskip("srpo_no_such_package")   # a whole module skipped at collection

        def test_never_collected():
            pass
    """, "--only-gpu-skips")
    assert p.returncode == 1, f"a skip at collection passed --only-gpu-skips:\n{p.stdout[-3000:]}"
    assert "test_generated.py: could not import 'srpo_no_such_package'" in p.stdout, p.stdout[-3000:]


@pytest.mark.slow
def test_only_gpu_skips_keeps_a_failure_a_failure(tmp_path):
    """A failing test still fails the run under --only-gpu-skips, with pytest's own exit status."""
    p = _run_pytest(tmp_path, GPU_SKIP_AND_A_PASS + """
    def test_broken():
        assert False
    """, "--only-gpu-skips")
    assert p.returncode == 1 and "1 failed" in p.stdout, p.stdout[-3000:]


def test_ci_runs_with_only_gpu_skips():
    """.ci/run passes --only-gpu-skips to pytest: without it a skip for a missing package is green."""
    run = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "python3 -m pytest -q -rs --only-gpu-skips" in run, ".ci/run's pytest line lost --only-gpu-skips"


def test_an_old_torch_stops_the_run_before_anything_loads(tmp_path, monkeypatch):
    """srpo.main checks the torch version first (issue 21): torch 2.5 passed requirements.txt's old
    `torch>=2.5` and then failed after the model loaded, on FSDP2 or dynamo's recompile_limit."""
    import torch

    import srpo
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    with pytest.raises(RuntimeError, match=r"needs torch >= [\d.]+, found torch 2\.5\.1\+cu124"):
        srpo.main(["--model", str(tmp_path / "no-model"), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists(), "the run started (made its folder) before the torch check"


def test_torch_versions_compare_as_numbers(monkeypatch):
    """Versions compare as numbers, not strings (2.9 is older than 2.13, 2.100 newer); local and
    pre-release tags are ignored."""
    import torch

    import common
    need = common.TORCH_MIN
    assert (2, 10) <= need < (2, 100), "the string traps below (2.9, 2.100) assume a minimum in 2.10..2.99"
    newer = [f"{need[0]}.{need[1]}.0", f"{need[0]}.{need[1]}.1+cu126", f"{need[0]}.{need[1] + 1}.0a0+git1234",
             "2.100.0+cpu", f"{need[0] + 1}.0.0"]
    for version in newer:
        monkeypatch.setattr(torch, "__version__", version)
        common.check_torch()   # raises if it wrongly refuses
    older = [f"{need[0]}.{need[1] - 1}.1", f"{need[0]}.{need[1] - 1}.0+cu124", "2.9.0", "1.13.1"]
    for version in older:
        monkeypatch.setattr(torch, "__version__", version)
        with pytest.raises(RuntimeError, match=f"found torch {re.escape(version)}"):
            common.check_torch()
    monkeypatch.setattr(torch, "__version__", "unknown")
    with pytest.raises(RuntimeError, match="cannot read the installed version 'unknown'"):
        common.check_torch()


def test_requirements_txt_states_the_checked_minimum():
    """requirements.txt declares the same torch minimum that check_torch enforces."""
    import common
    need = ".".join(map(str, common.TORCH_MIN))
    lines = [s.strip() for s in open(os.path.join(ROOT, "requirements.txt")) if s.startswith("torch")]
    assert f"torch>={need}" in lines, f"requirements.txt's torch line {lines} is not torch>={need}"


def shadowing(root: str, installed: dict[str, list[str]]) -> dict[str, list[str]]:
    """Our top-level modules (a .py file or a package folder in root) that are also the import name of
    an installed distribution, with its distributions. The repository root comes first on sys.path, so
    such a module of ours is what a library gets when it imports its dependency."""
    ours = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    ours |= {f for f in os.listdir(root) if os.path.isfile(os.path.join(root, f, "__init__.py"))}
    return {name: installed[name] for name in sorted(ours) if name in installed}


def test_no_module_of_ours_shadows_an_installed_package():
    """transformers 5.25 requires Hugging Face's `kernels` and imports it while loading a tokenizer: a
    top-level `kernels/` of ours (its name until then) made every run fail there, `cannot import name
    'CUDAProperties' from 'kernels'`. The Triton kernels live in srpo_kernels/ since."""
    assert shadowing(ROOT, importlib.metadata.packages_distributions()) == {}


def test_shadowing_finds_a_package_folder_and_a_module(tmp_path):
    """The check above can fail: a folder with __init__.py or a .py file named as an installed package."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "yaml.py").write_text("")
    (tmp_path / "notes").mkdir()  # a folder without __init__.py is not a package
    installed = {"kernels": ["kernels"], "yaml": ["PyYAML"], "notes": ["notes"], "numpy": ["numpy"]}
    assert shadowing(str(tmp_path), installed) == {"kernels": ["kernels"], "yaml": ["PyYAML"]}
