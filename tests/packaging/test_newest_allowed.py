"""The newest releases pyproject.toml allows run what a dependency's new release could break.

requirements/newest.txt pins them where they differ from requirements/cpu.txt; make installs them into
.venv/newest, and these tests put that directory first on sys.path of fresh interpreters: `import
mecefo_kernels` and the HF patch (tests/nn, without its torch.compile test: a minute of torch's compiler,
which no transformers release changes), and the two benchmarks that build transformers models, started as
a user starts them (bench/kernel_bench.py's residual_skip is the command that failed with transformers 5.25
while bench/kernels.py existed)."""

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging_helpers import ROOT, clean_env, pinned_versions

pytestmark = pytest.mark.slow

OVERLAY = Path(sys.prefix) / "newest"  # the Makefile's $(VENV)/newest
NEWEST = pinned_versions(ROOT / "requirements" / "newest.txt")


@pytest.fixture(scope="module")
def env():
    assert OVERLAY.is_dir(), f"{OVERLAY} is missing: run make venv (it installs requirements/newest.txt there)"
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=[str(OVERLAY)])}
    assert installed == {name: str(version) for name, version in NEWEST.items()}, \
        f"{OVERLAY} holds {installed}, requirements/newest.txt pins {NEWEST}: run make venv"
    env = clean_env(PYTHONPATH=str(OVERLAY))
    env.pop("TRITON_INTERPRET", None)  # as a user runs them; tests/conftest.py sets it for the pytest run
    return env


def run(env, *args, timeout=300):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"python {' '.join(args)}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_the_newest_releases_install_together(env):
    run(env, "-m", "pip", "check")


PATCH = """
import warnings, torch, transformers, mecefo_kernels as mk
from mecefo.presets import get_preset
assert transformers.__version__ == {version!r}, transformers.__file__
model = transformers.LlamaForCausalLM(get_preset("tiny").to_llama_config())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mk.apply_mecefo(model)
assert not [w for w in caught if "outside the range" in str(w.message)], [str(w.message) for w in caught]
ids = torch.randint(0, model.config.vocab_size, (2, 16))
with mk.neighbor_mode(model):
    model(input_ids=ids, labels=ids).loss.backward()
print("patched", transformers.__version__)
"""


def test_import_and_patch(env):
    assert "patched" in run(env, "-c", PATCH.format(version=str(NEWEST["transformers"])))


def test_hf_patch_tests(env):
    run(env, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/nn", "-k", "not torch_compile", timeout=600)


def test_benchmarks_that_build_transformers_models(env, tmp_path):
    csv = tmp_path / "rows.csv"
    run(env, "bench/kernel_bench.py", "--ops", "residual_skip", "--presets", "tiny", "--tokens", "256",
        "--rep-ms", "5", "--csv", str(csv))
    run(env, "bench/step.py", "--presets", "tiny", "--seq", "32", "--rep-ms", "10", "--rounds", "3", "--reruns", "0",
        "--max-spread", "inf", "--scopes", "block", "--csv", str(csv))
    benchmarks = {line.split(",")[0] for line in csv.read_text().splitlines()[1:]}
    assert "kernels/residual_skip" in benchmarks and any(b.startswith("step/") for b in benchmarks), benchmarks
