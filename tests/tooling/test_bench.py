"""Fast tests of the benchmark harness (fastlstm.bench): the record schema, the ratio arithmetic,
a tiny run of every suite on the torch backend, tables, BENCHMARKS.md blocks and plots."""
from __future__ import annotations

import copy
import json
import sys
import types

import pytest
import torch

import fastlstm
from fastlstm import bench
from fastlstm.bench import cli as bench_cli, records, report, runner, shapes, timing, workloads


def run_cli(argv, capsys):
    code = bench.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_records(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --- the schema ------------------------------------------------------------------------------

def make_record(**changes):
    record = {
        "schema": records.SCHEMA, "run_id": "r1", "time": "2026-01-01T00:00:00+00:00",
        "command": "fastlstm bench", "suite": "train",
        "shape": {"batch": 2, "steps": 3, "input_size": 4, "hidden_size": 5, "num_layers": 1},
        "shape_label": "B=2 T=3 I=4 H=5 L=1", "device": "cpu", "dtype": "float32",
        "baseline_dtype": "float32", "backend": "torch", "backend_ran": "torch",
        "baseline": "nn.LSTM (oneDNN)", "status": "ok", "reason": None, "unit": "s",
        "fastlstm_times": [1.0, 2.0], "baseline_times": [2.0, 2.0], "ratios": [2.0, 1.0],
        "fastlstm_median": 1.5, "baseline_median": 2.0, "ratio_median": 1.5, "rounds": 2,
        "inner": {"fastlstm": 1, "baseline": 1}, "timer": {"fastlstm": "perf_counter"},
        "work": {"tokens": 6}, "floor_s": 0.1, "floor_basis": "x", "machine": {"cpu_model": "c"},
        "software": {"torch": torch.__version__}, "git_commit": None,
    }
    record.update(changes)
    return record


def test_schema_accepts_a_complete_record():
    records.validate(make_record())
    records.validate(make_record(status="skipped", reason="backend cpu unavailable: x",
                                 fastlstm_times=None, baseline_times=None, ratios=None,
                                 fastlstm_median=None, baseline_median=None, ratio_median=None))


@pytest.mark.parametrize("change, message", [
    ({"schema": "other/1"}, "schema"),
    ({"status": "fine"}, "status"),
    ({"ratios": None}, "ratios"),
    ({"ratios": [2.0]}, "figures per list"),
    ({"status": "skipped", "reason": None}, "reason"),
    ({"rounds": "2"}, "rounds"),
])
def test_schema_rejects_broken_records(change, message):
    with pytest.raises(ValueError, match=message):
        records.validate(make_record(**change))


def test_schema_rejects_a_missing_key():
    record = make_record()
    del record["machine"]
    with pytest.raises(ValueError, match="machine"):
        records.validate(record)


# --- ratios and interleaving -----------------------------------------------------------------

def test_ratios_are_per_round_baseline_over_fastlstm():
    assert timing.ratios([2.0, 9.0, 3.0], [1.0, 3.0, 3.0]) == [2.0, 3.0, 1.0]
    # the median of per-round ratios is not the ratio of medians: a slow round hits both sides
    per_round = timing.median(timing.ratios([2.0, 9.0, 3.0], [1.0, 3.0, 3.0]))
    assert per_round == 2.0
    assert timing.median([2.0, 9.0, 3.0]) / timing.median([1.0, 3.0, 3.0]) == 1.0
    with pytest.raises(ValueError, match="one baseline time per fastlstm time"):
        timing.ratios([1.0], [1.0, 2.0])


def test_interleaved_rotates_the_order_each_round(monkeypatch):
    order = []
    fake = {"fastlstm": 1.0, "baseline": 3.0}

    def fake_time_calls(fn, device, inner):
        name = fn()
        order.append(name)
        return fake[name]

    monkeypatch.setattr(timing, "time_calls", fake_time_calls)
    result = timing.interleaved({"fastlstm": lambda: "fastlstm", "baseline": lambda: "baseline"},
                                "cpu", rounds=4, warmup=0)
    timed = order[2:]  # the first two are the timed warm-up calls, one per candidate
    assert timed == ["fastlstm", "baseline", "baseline", "fastlstm"] * 2
    assert result["times"] == {"fastlstm": [1.0] * 4, "baseline": [3.0] * 4}
    assert timing.ratios(result["times"]["baseline"], result["times"]["fastlstm"]) == [3.0] * 4


def test_interleaved_measures_real_time():
    import time
    result = timing.interleaved({"short": lambda: time.sleep(0.002),
                                 "long": lambda: time.sleep(0.008)},
                                "cpu", rounds=3, warmup=1, min_sample_s=0.01)
    ratio = timing.median(timing.ratios(result["times"]["long"], result["times"]["short"]))
    assert ratio > 2.0, result  # 8 ms of sleep against 2 ms can only come out clearly slower
    assert all(t >= 0.002 for t in result["times"]["short"])


# --- shapes and options ----------------------------------------------------------------------

def test_default_shapes_are_the_stated_goals():
    train = {(s.batch, s.steps, s.input_size, s.hidden_size, s.num_layers)
             for s in shapes.default_shapes("train", "cpu")}
    assert train == {(32, 128, 128, 256, 2), (16, 256, 512, 512, 1), (64, 64, 128, 128, 1),
                     (8, 200, 64, 128, 2)}
    sample = {(s.batch, s.vocab) for s in shapes.default_shapes("sample", "cpu")}
    assert sample == {(1, 65), (1, 33278), (64, 33278), (8, 128256)}
    decode = {(s.vocab, s.embed, s.hidden_size, s.num_layers)
              for s in shapes.default_shapes("decode", "cpu")}
    assert decode == {(65, 64, 256, 2), (10000, 256, 512, 2)}
    grid = shapes.default_shapes("train", "cuda")
    assert grid[0] == shapes.LSTMShape(16, 1024, 768, 768, 1)
    assert len({s for s in grid if s in shapes.GPU_TRAIN_GRID}) == 5 * 2 * 3


def test_parse_shapes():
    parsed = shapes.parse_shapes_option(["train=16x1024x768x768x1,4x8x16x32",
                                         "sample=64x128256", "decode=65x64x256x2"])
    assert parsed["train"] == (shapes.LSTMShape(16, 1024, 768, 768, 1),
                               shapes.LSTMShape(4, 8, 16, 32, 1))
    assert parsed["sample"] == (shapes.SampleShape(64, 128256),)
    assert parsed["decode"] == (shapes.DecodeShape(65, 64, 256, 2),)
    for bad in (["train=16x1024"], ["sample=64xV"], ["nosuite=1x2"], ["train"],
                ["sample=0x10"], ["decode=gpu-grid"]):
        with pytest.raises(ValueError, match="--shapes"):
            shapes.parse_shapes_option(bad)


def test_flop_and_byte_counts():
    shape = shapes.LSTMShape(2, 3, 4, 5, 2)
    # layer 0: 4H(I+H) = 180 MACs per token, layer 1: 4H(H+H) = 200; 6 tokens; 2 FLOPs a MAC
    assert shape.forward_flops() == 2 * 6 * (180 + 200)
    assert shape.train_flops() == 3 * shape.forward_flops()
    decode = shapes.DecodeShape(vocab=10, embed=3, hidden_size=4, num_layers=1)
    assert decode.weight_elements() == 3 + 4 * 4 * (3 + 4) + 8 * 4 + 10 * 4 + 10


@pytest.mark.parametrize("argv, message", [
    (["--suites", "train,bogus"], "--suites"),
    (["--backends", "gpu"], "--backends"),
    (["--dtype", "int8"], "dtype"),
    (["--repeats", "0"], "--repeats"),
    (["--shapes", "train=1x2"], "--shapes"),
])
def test_bad_options_are_clear_errors(argv, message, capsys):
    code, _, err = run_cli(argv + ["--out", "none", "--quiet"], capsys)
    assert code == 2
    assert message in err


# --- tiny runs of every suite ----------------------------------------------------------------

def test_quick_train_and_forward_on_torch(tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    code, text, _ = run_cli(["--quick", "--backends", "torch", "--suites", "train,forward",
                             "--repeats", "2", "--threads", "1", "--out", str(out), "--quiet"],
                            capsys)
    assert code == 0, text
    made = read_records(out)
    assert {r["suite"] for r in made} == {"train", "forward"}
    assert len(made) == 2 * len(shapes.QUICK_TRAIN)
    for record in made:
        records.validate(record)
        assert record["status"] == "ok", record["reason"]
        assert record["backend_ran"] == "torch"
        assert record["baseline"].startswith("nn.LSTM")
        assert len(record["fastlstm_times"]) == 2 and min(record["fastlstm_times"]) > 0
        assert record["ratio_median"] == pytest.approx(timing.median(
            [b / f for b, f in zip(record["baseline_times"], record["fastlstm_times"])]))
        assert record["floor_s"] > 0 and "FLOP" in record["floor_basis"]
        assert record["machine"]["cpu_cores"] >= 1 and record["machine"]["torch_threads"] == 1
        assert record["software"]["torch"] == torch.__version__
    assert "train (per batch, forward + backward)" in text and "B=4 T=16 I=16 H=32 L=1" in text


def test_regularized_training_records_a_suite_of_its_own(tmp_path, capsys):
    """--regularizers: each shape compared with nn.LSTM and with the same model with them off,
    recorded as suite train_regularized, so the plain train tables never take these rows."""
    out = tmp_path / "run.jsonl"
    code, text, _ = run_cli(["--quick", "--backends", "torch", "--suites", "train",
                             "--regularizers", "0.5,0.3,0.1", "--repeats", "2", "--threads", "1",
                             "--out", str(out), "--quiet"], capsys)
    assert code == 0, text
    made = read_records(out)
    assert {r["suite"] for r in made} == {"train_regularized"}
    baselines = sorted({r["baseline"] for r in made})
    assert len(baselines) == 2 and baselines[0] == "fastlstm.LSTM (regularizers off)"
    assert baselines[1].startswith("nn.LSTM"), baselines
    for record in made:
        records.validate(record)
        assert record["status"] == "ok", record["reason"]
    chosen = report._select(records.latest(made), {"suite": "train", "device": "cpu"})
    assert chosen == []


def test_unavailable_backend_is_a_skipped_row(tmp_path, capsys):
    from fastlstm import _backends
    out = tmp_path / "run.jsonl"
    missing = [b for b in ("cpu", "triton") if _backends.why_unavailable(b, "cpu")]
    if not missing:
        pytest.skip("every CPU backend is available in this install")
    code, text, _ = run_cli(["--quick", "--backends", missing[0], "--suites", "train",
                             "--out", str(out), "--quiet"], capsys)
    assert code == 0
    made = read_records(out)
    assert {r["status"] for r in made} == {"skipped"}
    assert all(r["reason"].startswith(f"backend {missing[0]} unavailable: ") for r in made)
    assert "skipped: backend" in text


def _quick_suite(suite, tmp_path, capsys):
    out = tmp_path / f"{suite}.jsonl"
    code, text, _ = run_cli(["--quick", "--backends", "torch", "--suites", suite,
                             "--repeats", "2", "--out", str(out), "--quiet"], capsys)
    assert code == 0, text
    return read_records(out)


def test_quick_sample_suite(tmp_path, capsys):
    made = _quick_suite("sample", tmp_path, capsys)
    if not hasattr(fastlstm, "sample"):
        assert {r["status"] for r in made} == {"skipped"}
        assert all("fastlstm.sample unavailable" in r["reason"] for r in made)
        return
    _check_sample_records(made)


def test_quick_decode_suite(tmp_path, capsys):
    made = _quick_suite("decode", tmp_path, capsys)
    try:
        from fastlstm import lm  # noqa: F401
    except ImportError:
        assert {r["status"] for r in made} == {"skipped"}
        assert all("fastlstm.lm unavailable" in r["reason"] for r in made)
        return
    _check_decode_records(made)


def _check_sample_records(made):
    assert len(made) == len(shapes.QUICK_SAMPLE)
    assert any(record["shape"]["top_k"] for record in made), "no filtered (top-k/top-p) row"
    for record in made:
        assert record["status"] == "ok", record["reason"]
        filtered = record["shape"]["top_k"] > 0 or record["shape"]["top_p"] < 1.0
        assert record["baseline"] == ("top-k/top-p sort + multinomial" if filtered
                                      else "softmax + multinomial")
        assert ("top-k=50 top-p=0.9" in record["shape_label"]) == filtered
        assert record["work"]["bytes"] == 4 * record["shape"]["batch"] * record["shape"]["vocab"]
        assert record["floor_s"] > 0 and "logits" in record["floor_basis"]


def _check_decode_records(made):
    baselines = {r["baseline"] for r in made}
    assert baselines == {"eager loop", "eager loop, oneDNN off"}
    for record in made:
        assert record["status"] == "ok", record["reason"]
        assert record["unit"] == "s/token"
        assert record["floor_s"] > 0 and "weights per token" in record["floor_basis"]


def _reference_sample(logits, temperature=1.0, *, top_k=0, top_p=1.0, generator=None,
                      backend="auto"):
    probabilities = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


def test_sample_suite_measures_a_sampler(tmp_path, capsys, monkeypatch):
    """The measuring path of the sample suite, whatever this install's fastlstm.sample is."""
    monkeypatch.setattr(fastlstm, "sample", _reference_sample, raising=False)
    _check_sample_records(_quick_suite("sample", tmp_path, capsys))


class _TinyLanguageModel(torch.nn.Module):
    def __init__(self, vocab_size, embed_dim, hidden_size, num_layers=1):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, embed_dim)
        self.lstm = fastlstm.LSTM(embed_dim, hidden_size, num_layers, batch_first=True)
        self.head = torch.nn.Linear(hidden_size, vocab_size)


def _tiny_generate(model, prompt_ids, max_new_tokens, temperature=1.0, **_):
    state, token, made = None, prompt_ids, []
    for _ in range(max_new_tokens):
        output, state = model.lstm(model.embedding(token), state)
        token = _reference_sample(model.head(output[:, -1]), temperature).unsqueeze(1)
        made.append(token)
    return torch.cat(made, 1)


def test_decode_suite_measures_a_generator(tmp_path, capsys, monkeypatch):
    """The measuring path of the decode suite, whatever this install's fastlstm.lm is."""
    module = types.ModuleType("fastlstm.lm")
    module.LSTMLanguageModel, module.generate = _TinyLanguageModel, _tiny_generate
    monkeypatch.setitem(sys.modules, "fastlstm.lm", module)
    monkeypatch.setattr(fastlstm, "lm", module, raising=False)
    _check_decode_records(_quick_suite("decode", tmp_path, capsys))


def test_eager_decode_loop_follows_the_weights():
    torch.manual_seed(0)
    embedding, head = torch.nn.Embedding(7, 4), torch.nn.Linear(6, 7)
    lstm = torch.nn.LSTM(4, 6, batch_first=True)
    with torch.no_grad():  # make token 3 overwhelmingly likely after any input
        head.weight.zero_()
        head.bias.fill_(-50.0)
        head.bias[3] = 50.0
    tokens = workloads.eager_decode_loop(embedding, lstm, head, torch.tensor([[1, 2]]), 5, 1.0)
    assert tokens == [3] * 5


# --- tables, BENCHMARKS.md and plots ---------------------------------------------------------

def _fake_records():
    made = []
    for batch, hidden, ratio in ((1, 256, 1.5), (16, 256, 1.2), (16, 768, 0.9)):
        shape = shapes.LSTMShape(batch, 64, hidden, hidden, 1)
        made.append(make_record(shape={"batch": batch, "steps": 64, "input_size": hidden,
                                       "hidden_size": hidden, "num_layers": 1},
                                shape_label=shape.label, ratios=[ratio, ratio],
                                ratio_median=ratio, work={"tokens": shape.tokens}))
    for vocab in (65, 33278):
        made.append(make_record(suite="sample", shape={"batch": 1, "vocab": vocab},
                                shape_label=f"B=1 V={vocab}", baseline="softmax + multinomial",
                                work={"bytes": 4 * vocab}))
    for baseline in ("eager loop", "eager loop, oneDNN off"):
        made.append(make_record(suite="decode", unit="s/token",
                                shape={"vocab": 65, "embed": 64, "hidden_size": 256,
                                       "num_layers": 2, "batch": 1},
                                shape_label="V=65 E=64 H=256 L=2", baseline=baseline,
                                work={"tokens": 8, "bytes_per_token": 1000}))
    made.append(make_record(status="skipped", reason="backend cpu unavailable: not built",
                            backend="cpu", backend_ran=None, fastlstm_times=None,
                            baseline_times=None, ratios=None, fastlstm_median=None,
                            baseline_median=None, ratio_median=None, floor_s=None))
    for record in made:
        records.validate(record)
    return made


def test_text_and_markdown_tables():
    made = _fake_records()
    text = report.text_tables(made)
    assert "1.50x (1.50-1.50)" in text and "skipped: backend cpu unavailable: not built" in text
    markdown = report.markdown_tables(made)
    assert "| B=1 T=64 I=256 H=256 L=1 | torch |" in markdown
    assert "Command: `fastlstm bench`" in markdown


def test_update_document_fills_marked_blocks():
    document = ("# Bench\n<!-- bench-table suite=train device=cpu -->\nold\n<!-- /bench-table -->\n"
                "text\n<!-- bench-table suite=sample device=cuda empty=\"Rerun on a GPU.\" -->\n"
                "old\n<!-- /bench-table -->\n")
    text, filled = report.update_document(document, _fake_records())
    assert filled == 1
    assert "old" not in text
    assert "| B=16 T=64 I=768 H=768 L=1 | torch |" in text
    assert "Rerun on a GPU." in text
    assert text.startswith("# Bench\n") and "\ntext\n" in text


def test_update_document_cpu_filter_keeps_machines_apart():
    made = [r for r in _fake_records() if r["suite"] == "train"]
    other = copy.deepcopy(made[0])
    other["machine"]["cpu_model"] = "AMD EPYC"
    other["run_id"] = "other-run"
    other["ratios"], other["ratio_median"] = [3.25, 3.25], 3.25
    document = ("<!-- bench-table suite=train device=cpu cpu=epyc -->\n<!-- /bench-table -->\n"
                "<!-- bench-table suite=train device=cpu cpu=nothing-like-it empty=\"none\" -->\n"
                "<!-- /bench-table -->\n")
    text, filled = report.update_document(document, made + [other])
    assert filled == 1
    assert "3.25x" in text and "1.50x" not in text and "none" in text


def test_update_document_cli_round_trip(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _fake_records()))
    doc = tmp_path / "B.md"
    doc.write_text("<!-- bench-table suite=decode device=cpu -->\n<!-- /bench-table -->\n")
    code, out, _ = run_cli(["--from", str(results), "--update-doc", str(doc)], capsys)
    assert code == 0 and "1 table(s) filled" in out
    assert "| V=65 E=64 H=256 L=2 | torch |" in doc.read_text()
    code, out, _ = run_cli(["--from", str(results)], capsys)
    assert code == 0 and "decode (per generated token, batch 1)" in out


def test_load_rejects_foreign_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"schema": records.SCHEMA}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        records.load([str(path)])


def test_plots_are_drawn_from_records(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _fake_records()))
    plots = tmp_path / "plots"
    code, out, _ = run_cli(["--from", str(results), "--plot", str(plots)], capsys)
    assert code == 0
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["decode_latency.png", "sample_time_vs_vocab.png",
                     "train_speedup_vs_batch.png", "train_speedup_vs_hidden.png"]
    for name in names:
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_runner_rejects_a_missing_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        runner.Runner(runner.Options(device="cuda", progress=None))


def test_update_doc_with_plots_links_the_pngs(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _fake_records()))
    doc = tmp_path / "B.md"
    doc.write_text("# B\n<!-- bench-plots -->\nold\n<!-- /bench-plots -->\n")
    code, _, _ = run_cli(["--from", str(results), "--plot", str(tmp_path / "plots"),
                          "--update-doc", str(doc)], capsys)
    assert code == 0
    text = doc.read_text()
    assert "old" not in text
    assert "![Decode latency per token](plots/decode_latency.png)" in text
    assert text.count("![") == 4


def test_budget_cuts_rounds_but_not_below_the_minimum(monkeypatch):
    monkeypatch.setattr(timing, "time_calls", lambda fn, device, inner: 1.0)
    candidates = {"fastlstm": lambda: None, "baseline": lambda: None}
    # a round costs 2 s (two candidates, 1 s each, one call a sample)
    result = timing.interleaved(candidates, "cpu", rounds=10, warmup=0, max_seconds=9.0)
    assert result["rounds"] == 4 and len(result["times"]["fastlstm"]) == 4
    result = timing.interleaved(candidates, "cpu", rounds=10, warmup=0, max_seconds=0.5)
    assert result["rounds"] == 3
    result = timing.interleaved(candidates, "cpu", rounds=5, warmup=0, max_seconds=100.0)
    assert result["rounds"] == 5


def test_a_loaded_cpu_runs_with_one_thread_and_the_setting_is_restored(tmp_path, capsys,
                                                                       monkeypatch):
    import os
    monkeypatch.setattr(os, "getloadavg", lambda: (1000.0, 1000.0, 1000.0))
    before = torch.get_num_threads()
    out = tmp_path / "run.jsonl"
    code, _, err = run_cli(["--quick", "--backends", "torch", "--suites", "forward",
                            "--repeats", "1", "--out", str(out)], capsys)
    assert code == 0
    made = read_records(out)
    assert {r["machine"]["torch_threads"] for r in made} == {1}
    assert {r["machine"]["load_average_1min"] for r in made} == {1000.0}
    if before > 1:
        assert "running both sides with 1 thread" in err
    assert torch.get_num_threads() == before


def test_gpu_check_script_parses_and_its_bench_options_are_valid():
    import pathlib
    import re
    import shutil
    import subprocess
    script = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text().replace("\\\n", " ")
    lines = [line.split(None, 3)[3] for line in text.splitlines()
             if re.match(r"^bench [\w-]+ \d+ ", line)]
    assert len(lines) >= 6
    parser = bench_cli._parser("fastlstm bench")
    for line in lines:
        args = parser.parse_args(line.split())
        options = bench_cli._options(args, line.split(), "fastlstm bench")
        assert options.suites and options.backends


def test_filtered_sample_baseline_keeps_the_top_k_top_p_set():
    """The filtered row's baseline (the usual sort / cumsum loop) draws from the set fastlstm's
    torch reference keeps: top-k 5, then top-p 0.9 of those."""
    from fastlstm.bench.workloads import top_k_top_p_multinomial
    z = 2 * torch.randn(40, generator=torch.Generator().manual_seed(0))
    logits = z.expand(4000, 40).contiguous()
    torch.manual_seed(1)
    baseline = set(top_k_top_p_multinomial(logits, 0.8, 5, 0.9).flatten().tolist())
    reference = set(fastlstm.sample(logits, 0.8, top_k=5, top_p=0.9, backend="torch").tolist())
    assert baseline == reference and 1 < len(baseline) <= 5
