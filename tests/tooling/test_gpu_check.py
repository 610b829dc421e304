"""benchmarks/gpu_check.sh, the one GPU script, run here: its --dry-run (every stage's CPU
counterpart), --pack (what a bare GPU machine lacks) and the build's fallback when pip refuses.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STAGES = ("probe", "build", "tests", "train-headline", "train-headline-fp16", "sample", "decode",
          "decode-bf16", "train-grid-bf16", "train-grid-fp32", "fastrnns")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu_check.sh needs bash and coreutils' timeout")


def _run(tmp_path, *args, env=None):
    environment = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable,
                       GPU_CHECK_CARRY=str(tmp_path / "no-carry"))
    environment.pop("TRITON_INTERPRET", None)  # the script sets what each mode needs
    environment.update(env or {})
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=900)


def _verdicts(out_dir):
    rows = {}
    with open(os.path.join(out_dir, "summary.txt")) as handle:
        for line in handle:
            parts = line.split()
            if parts and parts[0] in STAGES:
                rows[parts[0]] = parts[1]
    return rows


def test_dry_run_gives_a_verdict_for_every_stage(tmp_path):
    result = _run(tmp_path, "--dry-run")
    out_dir = tmp_path / "out"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    verdicts = _verdicts(out_dir)
    assert verdicts == {stage: "ok" for stage in STAGES}, verdicts
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("VERDICT: PASS") and "dry run" in last, last
    # The table comes last, after the benchmark summary, and every bench stage wrote records.
    assert "stage" in result.stdout and "speedup" in result.stdout
    records = (out_dir / "gpu.jsonl").read_text().splitlines()
    suites = {line.split('"suite": "')[1].split('"')[0] for line in records}
    assert {"train", "sample", "decode", "fastrnns_fwd", "fastrnns_bwd"} <= suites, suites
    assert "error paths raise" in (out_dir / "build.log").read_text()
    assert len(os.listdir(out_dir)) <= 8  # what a device run can bring back


def test_failed_stage_fails_the_verdict(tmp_path):
    """A build that cannot give the expected backends fails the check (never a skip)."""
    wrapper = tmp_path / "python"
    # A Python that pretends the extension has no cpu backend: the build check must fail.
    wrapper.write_text("#!/bin/sh\nexport FASTLSTM_EXPECT_BACKENDS=cpu,cuda\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    result = _run(tmp_path, "--dry-run", env={"GPU_CHECK_ONLY": "build", "PYTHON": str(wrapper)})
    assert result.returncode == 1, result.stdout[-2000:]
    assert _verdicts(tmp_path / "out").get("build") == "FAILED"
    assert "backend 'cuda' cannot run on cpu" in (tmp_path / "out" / "build.log").read_text()
    assert result.stdout.strip().splitlines()[-1].startswith("VERDICT: FAIL")


def test_build_falls_back_to_setup_py_when_pip_refuses(tmp_path):
    wrapper = tmp_path / "python"
    wrapper.write_text("#!/bin/sh\n"
                       "if [ \"$1\" = -m ] && [ \"$2\" = pip ]; then echo 'pip: refused'; exit 1; fi\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    result = _run(tmp_path, "--dry-run", env={"GPU_CHECK_ONLY": "build", "PYTHON": str(wrapper)})
    log = (tmp_path / "out" / "build.log").read_text()
    assert result.returncode == 0, log[-3000:]
    assert "pip: refused" in log and "falling back to python setup.py" in log
    assert "writing manifest file" in log  # setup.py's egg_info, the dry run's counterpart
    assert _verdicts(tmp_path / "out") == {"probe": "ok", "build": "ok"}


def test_pack_carries_pytest_and_ninja(tmp_path):
    dest = tmp_path / "carry"
    result = _run(tmp_path, "--pack", str(dest))
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(dest / "bin" / "ninja", os.X_OK)
    version = subprocess.run([str(dest / "bin" / "ninja"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert version.strip()
    # A Python without site-packages (-S) imports pytest from the carried folder alone...
    bare = dict(os.environ, PYTHONPATH=str(dest / "python"))
    probe = [sys.executable, "-S", "-c", "import pytest, pluggy, iniconfig; print(pytest.__file__)"]
    done = subprocess.run(probe, env=bare, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(dest))
    # ...and not without it, so the check above is not vacuous.
    bare.pop("PYTHONPATH")
    assert subprocess.run(probe, env=bare, capture_output=True).returncode != 0
