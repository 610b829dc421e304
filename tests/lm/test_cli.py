"""The fastlstm command end to end: train a few steps on a tiny text, then generate."""
import os
import subprocess
import sys

import pytest
import torch

from fastlstm import cli
from fastlstm.lm.train import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")

TEXT = ("to be or not to be that is the question\n"
        "whether tis nobler in the mind to suffer\n") * 30


def _train_args(tmp_path, text_path, *extra):
    return ["train", "--text", str(text_path), "--out-dir", str(tmp_path / "run"),
            "--embed-dim", "8", "--hidden-size", "16", "--num-layers", "1", "--batch-size", "4",
            "--seq-len", "16", "--steps", "6", "--eval-interval", "3", "--eval-batches", "1",
            "--warmup", "0", "--device", "cpu", *extra]


def test_cli_train_then_generate_char(tmp_path, capsys):
    text_path = tmp_path / "tiny.txt"
    text_path.write_text(TEXT)
    assert cli.main(_train_args(tmp_path, text_path)) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "done: 6 steps" in out
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "tokenizer.json", "history.json"):
        assert (run / name).exists(), name
    # resume continues from the checkpoint's step
    assert cli.main(_train_args(tmp_path, text_path, "--resume", "--steps", "9")) == 0
    assert "resuming" in capsys.readouterr().out
    assert load_checkpoint(str(run / "checkpoint.pt"))["step"] == 9

    args = ["generate", "--checkpoint", str(run), "--prompt", "to be", "-n", "40", "--seed", "3"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("to be") and len(first) == len("to be") + 40 + 1
    assert set(first[5:-1]) <= set(TEXT)
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert cli.main(["generate", "--checkpoint", str(run / "checkpoint.pt"), "--greedy",
                     "-n", "10"]) == 0
    greedy = capsys.readouterr().out
    assert len(greedy) == 10 + 1
    # --min-p 1.0 keeps only the most likely token: the greedy text, at any temperature
    assert cli.main(["generate", "--checkpoint", str(run), "-n", "10", "--min-p", "1.0",
                     "--temperature", "1.5", "--seed", "4"]) == 0
    assert capsys.readouterr().out == greedy
    assert cli.main(["generate", "--checkpoint", str(run), "-n", "5", "--min-p", "1.5"]) == 2
    assert "min_p" in capsys.readouterr().err


def test_cli_word_level(tmp_path, capsys):
    text_path = tmp_path / "words.txt"
    text_path.write_text(TEXT)
    assert cli.main(_train_args(tmp_path, text_path, "--level", "word", "--seq-len", "4")) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "to be",
                     "-n", "12", "--seed", "0", "--top-k", "5"]) == 0
    words = capsys.readouterr().out.split()
    vocabulary = set(TEXT.split()) | {"<unk>"}
    assert words[:2] == ["to", "be"] and len(words) >= 3
    assert set(words) <= vocabulary


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["train", "--text", str(tmp_path / "missing.txt"), "--out-dir",
                     str(tmp_path / "run")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "nothing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--level", "byte"])


def test_cli_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    text_path = tmp_path / "tiny.txt"
    text_path.write_text(TEXT)
    assert cli.main(_train_args(tmp_path, text_path, "--steps", "3")) == 0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_cli_bench_dispatch(capsys):
    try:
        import fastlstm.bench  # noqa: F401
    except ModuleNotFoundError:
        assert cli.main(["bench"]) == 2
        assert "fastlstm.bench" in capsys.readouterr().err
    else:
        pytest.skip("fastlstm.bench is installed; its own tests cover it")


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "fastlstm", "--help"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0
    for command in ("train", "generate", "bench"):
        assert command in result.stdout


def test_cli_train_tinyshakespeare(tmp_path, capsys):
    path = os.path.join(SHARED_DATA, "tinyshakespeare.txt")
    if not os.path.exists(path):
        pytest.skip("../shared/data/tinyshakespeare.txt is not present")
    args = ["train", "--text", path, "--out-dir", str(tmp_path / "run"), "--embed-dim", "8",
            "--hidden-size", "16", "--num-layers", "1", "--batch-size", "8", "--seq-len", "32",
            "--steps", "4", "--eval-interval", "4", "--eval-batches", "2", "--device", "cpu"]
    assert cli.main(args) == 0
    checkpoint = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert checkpoint["model_config"]["vocab_size"] == 65
    assert torch.isfinite(torch.tensor(checkpoint["history"]["val"][-1][1]))
