"""fastlstm.lm: tokenizers, the model, training (loss, resume, DDP) and generation."""
import math
import os
import socket

import pytest
import torch
from torch import nn

from fastlstm.lm import CharTokenizer, LSTMLanguageModel, WordTokenizer, generate, load_tokenizer
from fastlstm.lm import generate as generate_module  # noqa: F401  (the function)
from fastlstm.lm.data import ContiguousBatches
from fastlstm.lm.generate import Decoder, _cpu_op
from fastlstm.lm.train import TrainConfig, load_checkpoint, sequence_loss, train

import fastlstm

TEXT = ("the quick brown fox jumps over the lazy dog\n"
        "a stitch in time saves nine\n"
        "the early bird catches the worm\n") * 40


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------

def test_char_tokenizer_round_trip_and_json(tmp_path):
    tokenizer = CharTokenizer.from_text(TEXT)
    assert tokenizer.vocab_size == len(set(TEXT))
    sample = "the lazy fox\nsaves time"
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    path = tmp_path / "tok.json"
    tokenizer.save(str(path))
    loaded = load_tokenizer(str(path))
    assert isinstance(loaded, CharTokenizer)
    assert loaded.itos == tokenizer.itos
    assert loaded.encode(sample) == tokenizer.encode(sample)


def test_char_tokenizer_errors():
    tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        tokenizer.encode("abz")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([0, 3])
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer.from_text("")


def test_word_tokenizer_round_trip_unk_eol_and_json(tmp_path):
    tokenizer = WordTokenizer.from_text(TEXT)
    line = "the quick brown fox\na stitch in time"
    ids = tokenizer.encode(line)
    assert tokenizer.eol_id in ids
    assert tokenizer.decode(ids) == line
    assert tokenizer.encode("the zebra") == [tokenizer.stoi["the"], tokenizer.unk_id]
    path = tmp_path / "words.json"
    tokenizer.save(str(path))
    loaded = load_tokenizer(str(path))
    assert isinstance(loaded, WordTokenizer)
    assert loaded.itos == tokenizer.itos
    assert loaded.decode(loaded.encode(line)) == line


def test_word_tokenizer_vocabulary_limits():
    text = "a a a a b b b c c d\n"
    full = WordTokenizer.from_text(text)
    assert full.itos == ["<unk>", "<eol>", "a", "b", "c", "d"]
    assert WordTokenizer.from_text(text, max_vocab=4).itos == ["<unk>", "<eol>", "a", "b"]
    assert WordTokenizer.from_text(text, min_freq=2).itos == ["<unk>", "<eol>", "a", "b", "c"]
    limited = WordTokenizer.from_text(text, max_vocab=3)
    assert limited.decode(limited.encode("a b d")) == "a <unk> <unk>"
    with pytest.raises(ValueError, match="max_vocab"):
        WordTokenizer.from_text(text, max_vocab=1)
    with pytest.raises(ValueError, match="min_freq"):
        WordTokenizer.from_text(text, min_freq=0)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

def test_model_shapes_and_state():
    model = LSTMLanguageModel(30, 8, 16, num_layers=2)
    assert isinstance(model.lstm, fastlstm.LSTM) and model.lstm.batch_first
    assert isinstance(model.embedding, nn.Embedding) and isinstance(model.head, nn.Linear)
    ids = torch.randint(0, 30, (3, 7))
    logits, (h, c) = model(ids)
    assert logits.shape == (3, 7, 30)
    assert h.shape == c.shape == (2, 3, 16)
    # carrying the state across two halves equals one pass over the whole sequence
    first, state = model(ids[:, :4])
    second, _ = model(ids[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), logits, rtol=1e-5, atol=1e-5)


def test_model_weight_tying():
    model = LSTMLanguageModel(20, 12, 12, tie_weights=True)
    assert model.head.weight is model.embedding.weight
    with pytest.raises(ValueError, match="embed_dim == hidden_size"):
        LSTMLanguageModel(20, 8, 12, tie_weights=True)
    with pytest.raises(ValueError, match="vocab_size"):
        LSTMLanguageModel(0, 8, 12)
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        LSTMLanguageModel(20, 8, 12)(torch.zeros(5, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def _write_text(tmp_path, text=TEXT):
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return str(path)


def _small_config(tmp_path, out, **overrides):
    settings = dict(text=_write_text(tmp_path), out_dir=str(tmp_path / out), embed_dim=8,
                    hidden_size=24, num_layers=2, batch_size=4, seq_len=16, steps=40, lr=1e-2,
                    warmup=0, eval_interval=20, eval_batches=2, plot=False, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def test_training_loss_falls(tmp_path):
    summary = train(_small_config(tmp_path, "run", steps=60, lr=3e-2), verbose=False)
    losses = [loss for _, loss in summary["history"]["train"]]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.8, f"training loss went from {first:.3f} to {last:.3f}"
    assert summary["val_loss"] < losses[0]
    checkpoint = load_checkpoint(summary["checkpoint"])
    assert checkpoint["step"] == 60 and checkpoint["state"][0].shape == (2, 4, 24)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_continues_exactly(tmp_path, optimizer):
    # dropout > 0 so the random state must be restored too; a constant schedule so that the
    # shorter first run follows the same learning rates as the uninterrupted one
    common = dict(steps=8, eval_interval=4, dropout=0.2, optimizer=optimizer, schedule="constant",
                  warmup=3, clip=0.5, lr=5e-3)
    whole = train(_small_config(tmp_path, "whole", **common), verbose=False)
    first = _small_config(tmp_path, "parts", **dict(common, steps=4))
    train(first, verbose=False)
    resumed = train(_small_config(tmp_path, "parts", **dict(common, resume=True)), verbose=False)
    assert resumed["step"] == 8
    a = load_checkpoint(whole["checkpoint"])
    b = load_checkpoint(resumed["checkpoint"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"parameter {name} differs after resume"
    assert torch.equal(a["state"][0], b["state"][0]) and torch.equal(a["state"][1], b["state"][1])
    assert a["history"]["train"] == b["history"]["train"]


def test_resume_refuses_other_data(tmp_path):
    train(_small_config(tmp_path, "run", steps=2), verbose=False)
    other = tmp_path / "other.txt"
    other.write_text(TEXT[::-1])  # same characters, other order
    config = _small_config(tmp_path, "run", steps=4, resume=True)
    config.text = str(other)
    with pytest.raises(RuntimeError, match="other data"):
        train(config, verbose=False)


def test_contiguous_batches_continue_rows():
    ids = torch.arange(101)
    batches = ContiguousBatches(ids, num_streams=4, seq_len=5)
    assert len(batches) == 5
    x0, y0 = batches.batch(0)
    x1, _ = batches.batch(1)
    assert x0.shape == (4, 5)
    assert torch.equal(y0, x0 + 1)
    assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # row b of batch k+1 continues row b of batch k
    halves = [ContiguousBatches(ids, 4, 5, slice(r * 2, r * 2 + 2)).batch(3)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), batches.batch(3)[0])


# ------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes == one process on the combined batch
# ------------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, text_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        model = LSTMLanguageModel(17, 6, 10, num_layers=2)
        ids = torch.randint(0, 17, (4, 9), generator=torch.Generator().manual_seed(1))
        rows = slice(rank * 2, rank * 2 + 2)
        ddp = DistributedDataParallel(model)
        loss, _ = sequence_loss(ddp, ids[rows, :-1], ids[rows, 1:], None)
        loss.backward()
        torch.save({n: p.grad for n, p in model.named_parameters()},
                   os.path.join(out_dir, f"grads{rank}.pt"))
        # the trainer itself under DDP
        config = TrainConfig(text=text_path, out_dir=os.path.join(out_dir, "ddp"), embed_dim=6,
                             hidden_size=10, num_layers=1, batch_size=2, seq_len=8, steps=3,
                             eval_interval=3, eval_batches=1, warmup=0, plot=False, device="cpu")
        train(config, verbose=False)
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_one(tmp_path):
    import torch.multiprocessing as mp
    text_path = _write_text(tmp_path)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), text_path), nprocs=2, join=True)

    torch.manual_seed(0)
    model = LSTMLanguageModel(17, 6, 10, num_layers=2)
    ids = torch.randint(0, 17, (4, 9), generator=torch.Generator().manual_seed(1))
    loss, _ = sequence_loss(model, ids[:, :-1], ids[:, 1:], None)
    loss.backward()
    for rank in range(2):
        grads = torch.load(str(tmp_path / f"grads{rank}.pt"))
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"rank {rank}, gradient of {name}: {m}")

    single = TrainConfig(text=text_path, out_dir=str(tmp_path / "single"), embed_dim=6,
                         hidden_size=10, num_layers=1, batch_size=4, seq_len=8, steps=3,
                         eval_interval=3, eval_batches=1, warmup=0, plot=False, device="cpu")
    train(single, verbose=False)
    a = load_checkpoint(str(tmp_path / "ddp" / "checkpoint.pt"))
    b = load_checkpoint(str(tmp_path / "single" / "checkpoint.pt"))
    for name, tensor in b["model"].items():
        torch.testing.assert_close(a["model"][name], tensor, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"parameter {name} after 3 steps: {m}")
    torch.testing.assert_close(a["state"][0], b["state"][0], rtol=1e-4, atol=1e-5)
    assert len(a["rng"]) == 2


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------

def _decode_modes():
    modes = ["python"]
    if _cpu_op() is not None:
        modes.append("cpu_op")
    return modes


def _reference_greedy(model, prompt, count):
    """A step-by-step loop over nn.LSTM with the model's weights: feed one token, argmax."""
    lstm = nn.LSTM(model.embed_dim, model.hidden_size, model.num_layers, batch_first=True)
    lstm.load_state_dict(model.lstm.state_dict())
    out, state = [], None
    with torch.no_grad():
        for t in range(prompt.shape[1]):
            hidden, state = lstm(model.embedding(prompt[:, t:t + 1]), state)
        for _ in range(count):
            token = model.head(hidden[:, -1]).argmax(-1)
            out.append(token)
            hidden, state = lstm(model.embedding(token[:, None]), state)
    return torch.stack(out, 1)


def _model(vocab=40, embed=12, hidden=32, layers=2, seed=0):
    torch.manual_seed(seed)
    model = LSTMLanguageModel(vocab, embed, hidden, num_layers=layers)
    # larger weights than the default init, so the greedy path is not a constant token
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    return model.eval()


@pytest.mark.parametrize("mode", _decode_modes())
@pytest.mark.parametrize("batch,layers", [(1, 2), (3, 1)])
def test_greedy_generate_equals_nn_lstm_loop(mode, batch, layers):
    model = _model(layers=layers)
    prompt = torch.randint(0, 40, (batch, 5))
    expected = _reference_greedy(model, prompt, 30)
    decoder = Decoder(model, prompt, temperature=0.0, mode=mode)
    got = torch.cat([decoder.next(1), decoder.next(12), decoder.next(17)], 1)
    assert len(set(expected.flatten().tolist())) > 3, "degenerate reference sequence"
    mismatch = (got != expected).nonzero()
    assert mismatch.numel() == 0, f"first mismatch at (row, step) {mismatch[0].tolist()}"
    assert torch.equal(generate(model, prompt, 30, temperature=0.0), expected)


@pytest.mark.parametrize("mode", _decode_modes())
def test_generate_reproducible_with_generator(mode):
    model = _model()
    prompt = torch.randint(0, 40, (2, 4))
    runs = []
    for seed in (7, 7, 8):
        decoder = Decoder(model, prompt, temperature=1.0, top_k=10, top_p=0.9,
                          generator=torch.Generator().manual_seed(seed), mode=mode)
        runs.append(decoder.next(40))
    assert runs[0].shape == (2, 40) and runs[0].dtype == torch.int64
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert int(runs[0].min()) >= 0 and int(runs[0].max()) < 40


def test_decode_modes_agree_when_sampling():
    modes = _decode_modes()
    if len(modes) < 2:
        pytest.skip("fastlstm._C with decode_cpu is not built here")
    model = _model()
    prompt = torch.randint(0, 40, (2, 4))
    outs = [Decoder(model, prompt, 0.8, generator=torch.Generator().manual_seed(3),
                    mode=m).next(50) for m in modes]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("mode", ["python", "cpu_op"])
def test_prompt_is_run_once(mode):
    """The sequence kernel runs once, on the prompt (all of it; with the CPU decode op, all but
    its last token, which is the op's first input), and never again while decoding."""
    if mode == "cpu_op" and not hasattr(torch.ops.fastlstm, "decode_cpu"):
        pytest.skip("fastlstm._C is not built")
    model = _model()
    calls = []
    model.lstm.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    decoder = Decoder(model, torch.randint(0, 40, (1, 6)), mode=mode)
    assert decoder.next(25).shape == (1, 25)
    fed = 5 if mode == "cpu_op" else 6
    assert calls == [torch.Size([1, fed, 12])], f"model.lstm ran on {calls}"


@pytest.mark.parametrize("prompt_length", [1, 4])
def test_cpu_op_decoder_matches_python_decoder(prompt_length):
    """With the CPU op the last prompt token is fed by the op: same tokens as the Python path,
    greedy and sampled (the op draws its first token from the generator like fastlstm.sample)."""
    if not hasattr(torch.ops.fastlstm, "decode_cpu"):
        pytest.skip("fastlstm._C is not built")
    model = _model()
    prompt = torch.randint(0, 40, (2, prompt_length), generator=torch.Generator().manual_seed(1))
    for temperature in (0.0, 0.9):
        outs = [Decoder(model, prompt, temperature, top_k=12,
                        generator=torch.Generator().manual_seed(5), mode=mode).next(30)
                for mode in ("python", "cpu_op")]
        assert torch.equal(outs[0], outs[1]), (temperature, outs)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_op_split_over_threads_matches_reference(threads):
    """A model large enough for the op to split every layer and the head among threads (tails in
    every dimension: vocab 97, embed 20, hidden 100): the same tokens on 1, 2 and 3 threads, as
    the nn.LSTM loop greedily and as the Python decoder when sampling."""
    if _cpu_op() is None:
        pytest.skip("fastlstm._C with decode_cpu is not built here")
    model = _model(vocab=97, embed=20, hidden=100, layers=2)
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(4))
    expected = _reference_greedy(model, prompt, 25)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        greedy = Decoder(model, prompt, temperature=0.0, mode="cpu_op").next(25)
        single = Decoder(model, prompt[:1], temperature=0.0, mode="cpu_op").next(25)
        sampled = [Decoder(model, prompt, 0.9, top_k=30, generator=torch.Generator().manual_seed(2),
                           mode=mode).next(25) for mode in ("python", "cpu_op")]
    finally:
        torch.set_num_threads(previous)
    assert len(set(expected.flatten().tolist())) > 5, "degenerate reference sequence"
    assert torch.equal(greedy, expected)
    assert torch.equal(single, expected[:1])
    assert torch.equal(sampled[0], sampled[1])


def test_cpu_op_error_in_split_draw_raises():
    """An error in the draw (NaN logits) while the op runs on several threads, each drawing its
    rows, is raised (the first row's), not a hang or a token."""
    if _cpu_op() is None:
        pytest.skip("fastlstm._C with decode_cpu is not built here")
    model = _model(vocab=97, embed=20, hidden=100, layers=2)
    with torch.no_grad():
        model.head.bias[7] = float("nan")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="logits row 0 contains NaN"):
            Decoder(model, torch.zeros(2, 3, dtype=torch.long), 1.0, mode="cpu_op").next(5)
        # h and c are left as the state after the failed draw's step: the head does not touch it,
        # so a good head gives the same state after one step.
        args = list(_decode_op_args(model, batch=2, steps=4))
        h, c = args[1], args[2]
        good = [args[0], h.clone(), c.clone()] + args[3:13] + [1]
        good[8] = torch.zeros_like(args[8])  # a finite head bias
        _cpu_op()(*good)
        with pytest.raises(ValueError, match="NaN"):
            _cpu_op()(*args)
        assert torch.equal(h, good[1]) and torch.equal(c, good[2])
    finally:
        torch.set_num_threads(previous)


def test_generate_keeps_training_mode_and_checks_arguments():
    model = _model().train()
    prompt = torch.randint(0, 40, (1, 3))
    assert generate(model, prompt, 0).shape == (1, 0)
    assert model.training
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        generate(model, torch.full((1, 2), 40), 5)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 5, temperature=-1.0)
    for temperature in (math.nan, math.inf):
        with pytest.raises(ValueError, match="generate: temperature must be"):
            generate(model, prompt, 5, temperature=temperature)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 5, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompt, 5, top_k=-2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, -1)
    for min_p in (-0.1, 1.1, math.nan, "0.5", None):
        with pytest.raises(ValueError, match="min_p"):
            generate(model, prompt, 5, min_p=min_p)
    decoder = Decoder(model, prompt)
    decoder.min_p = 2.0
    with pytest.raises(ValueError, match="min_p"):
        decoder.next(3)


@pytest.mark.parametrize("mode", _decode_modes())
def test_generate_min_p(mode):
    """min_p = 1 keeps only the most likely token: greedy at any temperature; another min_p
    draws the same tokens in every decode mode (the CPU op passes it to its draws)."""
    model = _model()
    prompt = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(2))
    expected = _reference_greedy(model, prompt, 30)
    got = Decoder(model, prompt, 1.7, min_p=1.0, generator=torch.Generator().manual_seed(1),
                  mode=mode).next(30)
    assert torch.equal(got, expected)
    assert torch.equal(generate(model, prompt, 30, temperature=1.7, min_p=1.0), expected)
    sampled = Decoder(model, prompt, 2.0, top_k=20, min_p=0.8,
                      generator=torch.Generator().manual_seed(6), mode=mode).next(40)
    python = Decoder(model, prompt, 2.0, top_k=20, min_p=0.8,
                     generator=torch.Generator().manual_seed(6), mode="python").next(40)
    assert torch.equal(sampled, python)
    plain = Decoder(model, prompt, 2.0, top_k=20, generator=torch.Generator().manual_seed(6),
                    mode=mode).next(40)
    assert not torch.equal(sampled, plain), "min_p changed nothing"


@pytest.mark.parametrize("mode", _decode_modes())
def test_decoder_settings_change_between_calls(mode):
    """Each next() draws with the settings it finds: temperature 0 after sampled tokens gives the
    greedy continuation of the prompt and those tokens; back to sampling, tokens vary again."""
    model = _model()
    prompt = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(3))
    decoder = Decoder(model, prompt, 1.5, generator=torch.Generator().manual_seed(4), mode=mode)
    sampled = decoder.next(6)
    decoder.temperature = 0.0
    greedy = decoder.next(20)
    assert torch.equal(greedy, _reference_greedy(model, torch.cat([prompt, sampled], 1), 20))
    decoder.temperature, decoder.min_p = 1.5, 1.0
    assert torch.equal(decoder.next(10), _reference_greedy(
        model, torch.cat([prompt, sampled, greedy], 1), 10))


@pytest.mark.cuda
def test_cuda_graph_decode_matches_step_by_step():
    model = _model().cuda()
    prompt = torch.randint(0, 40, (2, 5), device="cuda")
    expected = _reference_greedy(model.cpu(), prompt.cpu(), 300)
    model.cuda()
    greedy = Decoder(model, prompt, temperature=0.0, mode="cuda_graph")
    got = torch.cat([greedy.next(7), greedy.next(293)], 1)  # crosses the graph's history buffer
    assert greedy.mode == "cuda_graph"
    assert torch.equal(got.cpu(), expected)
    runs = []
    for mode, seed in (("cuda_graph", 5), ("cuda_graph", 5), ("python", 5), ("cuda_graph", 6)):
        decoder = Decoder(model, prompt, 1.0, top_k=20,
                          generator=torch.Generator("cuda").manual_seed(seed), mode=mode)
        runs.append(decoder.next(300).cpu())
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2]), "graph replays drew other numbers than eager steps"
    assert not torch.equal(runs[0], runs[3])
    assert len(set(runs[0][0, 200:].tolist())) > 3, "replays repeated the same draw"


@pytest.mark.cuda
def test_cuda_graph_decoder_follows_setting_changes():
    """The CUDA graph captures the draw with the settings of its time: changing temperature,
    top_k, top_p or min_p between next() calls captures it again, and the change takes effect."""
    reference = _model()  # the same weights, on the CPU
    model = _model().cuda()
    prompt = torch.randint(0, 40, (2, 5), device="cuda")
    decoder = Decoder(model, prompt, 1.5, generator=torch.Generator("cuda").manual_seed(2),
                      mode="cuda_graph")
    sampled = decoder.next(8)
    assert decoder.mode == "cuda_graph"
    done = [prompt.cpu(), sampled.cpu()]
    for setting, value in (("temperature", 0.0), ("temperature", 1.5), ("min_p", 1.0),
                           ("top_k", 1), ("top_p", 1e-6)):
        decoder.temperature, decoder.top_k, decoder.top_p, decoder.min_p = 1.5, 0, 1.0, 0.0
        setattr(decoder, setting, value)
        got = decoder.next(12).cpu()
        expected = _reference_greedy(reference, torch.cat(done, 1), 12)
        if (setting, value) == ("temperature", 1.5):
            assert not torch.equal(got, expected), "sampling at T = 1.5 gave the greedy tokens"
        else:
            assert torch.equal(got, expected), f"{setting} = {value} was not applied"
        done.append(got)
    assert decoder.mode == "cuda_graph"


def _decode_op_args(model, batch=2, steps=3, temperature=0.7):
    from fastlstm.lm.generate import _StepWeights
    w = _StepWeights(model)
    h = torch.randn(model.num_layers, batch, model.hidden_size)
    return (torch.randint(0, model.vocab_size, (batch,)), h, torch.randn_like(h), w.embedding,
            w.w_ih, w.w_hh, w.bias, w.head_weight, w.head_bias, temperature, 5, 0.9,
            torch.Generator().manual_seed(0), steps)


def test_decode_cpu_op_opcheck_and_errors():
    op = _cpu_op()
    if op is None:
        pytest.skip("fastlstm._C with decode_cpu is not built here")
    model = _model(layers=2)
    # greedy: opcheck compares calls that share the generator, so the draws must not depend on it
    torch.library.opcheck(op, _decode_op_args(model, temperature=0.0))
    args = list(_decode_op_args(model))
    tokens = op(*args)
    assert tokens.shape == (2, 3) and tokens.dtype == torch.int64
    bad_h = list(args)
    bad_h[1] = torch.zeros(3, 2, model.hidden_size)
    with pytest.raises(RuntimeError, match="h must be"):
        op(*bad_h)
    bad_token = list(args)
    bad_token[0] = torch.tensor([0, model.vocab_size])
    with pytest.raises(RuntimeError, match="outside the embedding"):
        op(*bad_token)
    bad_temperature = list(args)
    bad_temperature[9] = -1.0
    with pytest.raises(ValueError, match="temperature"):
        op(*bad_temperature)
    with pytest.raises(ValueError, match="min_p"):
        op(*args, min_p=1.5)
    # min_p = 1: only the most likely token, i.e. the greedy tokens, whatever the temperature
    torch.manual_seed(0)  # the same token and state for both
    greedy = list(_decode_op_args(model, temperature=0.0))
    torch.manual_seed(0)
    hot = list(_decode_op_args(model, temperature=2.0))
    assert torch.equal(op(*hot, min_p=1.0), op(*greedy))
    torch.library.opcheck(op, _decode_op_args(model, temperature=0.0), {"min_p": 0.3})
