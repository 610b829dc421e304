"""Quick CPU training throughput check: fastlstm.LSTM(backend="cpu") against nn.LSTM.

Forward + backward tokens/s on the shapes (B, T, input, hidden, layers) the cpu backend is held
to, median of interleaved runs (the order alternates each round; each timed step follows an untimed
one of the same module), both with the same thread count.

    PYTHONPATH=. python benchmarks/cpu_lstm_quick.py --threads 1 --rounds 7
"""
import argparse
import statistics
import time

import torch
from torch import nn

import fastlstm

SHAPES = [(32, 128, 128, 256, 2), (16, 256, 512, 512, 1), (64, 64, 128, 128, 1),
          (8, 200, 64, 128, 2)]


def train_step(module, x):
    out, (h, _c) = module(x)
    (out.sum() + h.sum()).backward()


def measure(shape, rounds):
    batch, steps, inputs, hidden, layers = shape
    torch.manual_seed(0)
    baseline = nn.LSTM(inputs, hidden, layers)
    fused = fastlstm.LSTM(inputs, hidden, layers, backend="cpu")
    fused.load_state_dict(baseline.state_dict())
    x = torch.randn(steps, batch, inputs, requires_grad=True)
    times = {"nn.LSTM": [], "fastlstm": []}
    modules = {"nn.LSTM": baseline, "fastlstm": fused}
    for name in modules:  # warm-up
        train_step(modules[name], x)
    for round_index in range(rounds):
        order = list(modules) if round_index % 2 == 0 else list(reversed(modules))
        for name in order:
            # One untimed step first: a training loop repeats one model, so each sample is
            # taken in that steady state, not right after the other model ran (its freed
            # buffers and evicted caches cost either side up to 15% at B=64, H=128).
            train_step(modules[name], x)
            start = time.perf_counter()
            train_step(modules[name], x)
            times[name].append(time.perf_counter() - start)
    tokens = batch * steps
    return {name: tokens / statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds")
    for shape in SHAPES:
        rates = measure(shape, args.rounds)
        ratio = rates["fastlstm"] / rates["nn.LSTM"]
        print("B=%d T=%d I=%d H=%d L=%d: nn.LSTM %.0f tok/s, fastlstm %.0f tok/s, ratio %.2f"
              % (*shape, rates["nn.LSTM"], rates["fastlstm"], ratio), flush=True)


if __name__ == "__main__":
    main()
