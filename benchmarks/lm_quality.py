"""Quality benchmark: a character model on fastlstm.LSTM against the same model on nn.LSTM.

Tiny Shakespeare (first 90% of the characters for training, last 10% for validation), a 2-layer
LSTM with hidden size 256 and embedding size 64. Both models start from the same weights and are
trained with the same settings for the same wall-clock budget on this machine; the budget is
split into rounds that alternate between the two, so a change in machine load during the run
falls on both. Then both are evaluated on the whole validation split, and the fastlstm model
generates a sample.

    python benchmarks/lm_quality.py --minutes 10

With --weight-drop / --locked-dropout / --zoneout a third contestant, fastlstm_reg, is the
fastlstm model with those regularizers on (the same initial weights and --dropout); --contestants
picks which of fastlstm, nn_lstm and fastlstm_reg race:

    python benchmarks/lm_quality.py --minutes 10 --threads 1 --dropout 0.2 --weight-drop 0.2 \
        --contestants fastlstm,fastlstm_reg

Writes a JSON record (default benchmarks/results/lm_quality.json) and prints every contestant's
validation loss (nats per character) and a sample from the last fastlstm contestant.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fastlstm.lm import LSTMLanguageModel, generate  # noqa: E402
from fastlstm.lm import data as lm_data  # noqa: E402
from fastlstm.lm.tokenizers import tokenizer_from_dict  # noqa: E402
from fastlstm.lm.train import (TrainConfig, _Dist, evaluate, load_checkpoint,  # noqa: E402
                               train)

DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


CONTESTANTS = ("fastlstm", "nn_lstm", "fastlstm_reg")


def _regularizers(args) -> dict:
    return {"weight_drop": args.weight_drop, "locked_dropout": args.locked_dropout,
            "zoneout": args.zoneout}


def _build(kind: str, vocab: int, args) -> nn.Module:
    torch.manual_seed(args.seed)  # the same initial weights for every contestant
    model = LSTMLanguageModel(vocab, args.embed_dim, args.hidden_size, args.num_layers,
                              dropout=args.dropout,
                              **(_regularizers(args) if kind == "fastlstm_reg" else {}))
    if kind == "nn_lstm":
        baseline = nn.LSTM(args.embed_dim, args.hidden_size, args.num_layers, batch_first=True,
                           dropout=args.dropout if args.num_layers > 1 else 0.0)
        baseline.load_state_dict(model.lstm.state_dict())
        model.lstm = baseline
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help="Tiny Shakespeare text file")
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per model")
    parser.add_argument("--rounds", type=int, default=0,
                        help="alternating rounds the budget is split into (0: one per minute)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "lm_quality.json"))
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--weight-drop", type=float, default=0.0,
                        help="fastlstm_reg: DropConnect probability on the recurrent weights")
    parser.add_argument("--locked-dropout", type=float, default=0.0,
                        help="fastlstm_reg: variational dropout between LSTM layers")
    parser.add_argument("--zoneout", type=float, default=0.0,
                        help="fastlstm_reg: zoneout probability of h and c")
    parser.add_argument("--contestants", default="",
                        help="comma-separated subset of " + ",".join(CONTESTANTS) + " (default: "
                        "fastlstm,nn_lstm, and fastlstm_reg when a regularizer is on)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--sample-chars", type=int, default=400)
    args = parser.parse_args(argv)
    if not os.path.exists(args.data):
        print(f"lm_quality: {args.data} not found; pass --data PATH", file=sys.stderr)
        return 2
    if not args.minutes > 0:
        parser.error("--minutes must be > 0")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    for name in ("weight_drop", "locked_dropout", "zoneout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1)")
    regularized = any(value > 0 for value in _regularizers(args).values())
    if args.contestants:
        kinds = tuple(k.strip() for k in args.contestants.split(",") if k.strip())
        unknown = [k for k in kinds if k not in CONTESTANTS]
        if unknown or not kinds or len(set(kinds)) != len(kinds):
            parser.error(f"--contestants: expected distinct names from {', '.join(CONTESTANTS)}; "
                         f"got {args.contestants!r}")
    else:
        kinds = ("fastlstm", "nn_lstm") + (("fastlstm_reg",) if regularized else ())
    if "fastlstm_reg" in kinds and not regularized:
        parser.error("--contestants: fastlstm_reg needs --weight-drop, --locked-dropout or "
                     "--zoneout above 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or max(1, int(round(args.minutes)))
    device = torch.device(args.device)

    work = tempfile.mkdtemp(prefix="lm_quality_")
    configs = {kind: TrainConfig(
        text=args.data, out_dir=os.path.join(work, kind), level="char", val_fraction=0.1,
        embed_dim=args.embed_dim, hidden_size=args.hidden_size, num_layers=args.num_layers,
        dropout=args.dropout, batch_size=args.batch_size, seq_len=args.seq_len,
        steps=10 ** 9,  # the clock ends the run; a constant schedule does not depend on steps
        schedule="constant", warmup=100, lr=args.lr, clip=1.0, eval_interval=10 ** 9,
        eval_batches=1, log_interval=100, seed=args.seed, device=args.device, amp="off",
        plot=False) for kind in kinds}
    models, summaries = {}, {}
    trained_seconds = {kind: 0.0 for kind in kinds}
    print(f"lm_quality: {args.minutes} min per model in {rounds} alternating rounds, "
          f"{torch.get_num_threads()} threads, device {device}", flush=True)
    for round_index in range(rounds):
        for kind in kinds:
            config = configs[kind]
            config.max_minutes = args.minutes / rounds
            config.resume = round_index > 0
            if kind not in models:
                text = lm_data.read_text(args.data)
                vocab = len(set(text))
                models[kind] = _build(kind, vocab, args)
            summaries[kind] = train(config, model=models[kind], verbose=False)
            s = summaries[kind]
            trained_seconds[kind] += s["train_seconds"]
            print(f"  round {round_index + 1}/{rounds} {kind:12s}: step {s['step']}, train loss "
                  f"{s['train_loss']:.4f}", flush=True)

    results = {}
    for kind in kinds:
        checkpoint = load_checkpoint(os.path.join(work, kind, "checkpoint.pt"))
        tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
        model = models[kind]
        model.load_state_dict(checkpoint["model"])
        text = lm_data.read_text(args.data)
        _, val_text = lm_data.split_text(text, 0.1)
        val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.int64)
        batches = lm_data.ContiguousBatches(val_ids, 16, args.seq_len)
        started = time.perf_counter()
        val_loss = evaluate(model.to(device), batches, 0, _Dist(), device)
        history = checkpoint["history"]["train"]
        steps = checkpoint["step"]
        results[kind] = {
            "val_loss_nats_per_char": val_loss,
            "steps": steps,
            "train_tokens": steps * args.batch_size * args.seq_len,
            "final_train_loss": history[-1][1] if history else None,
            "train_seconds": trained_seconds[kind],
            "train_tokens_per_second": steps * args.batch_size * args.seq_len
            / max(trained_seconds[kind], 1e-9),
            "eval_seconds": time.perf_counter() - started,
        }
    torch.manual_seed(args.seed)
    sampled = [kind for kind in kinds if kind != "nn_lstm"]
    sampled = sampled[-1] if sampled else kinds[-1]
    model = models[sampled].eval()
    tokenizer = tokenizer_from_dict(load_checkpoint(
        os.path.join(work, sampled, "checkpoint.pt"))["tokenizer"])
    prompt = "ROMEO:\n"
    ids = generate(model, torch.tensor([tokenizer.encode(prompt)], device=device),
                   args.sample_chars, temperature=0.8,
                   generator=torch.Generator(device=device).manual_seed(args.seed))
    sample = prompt + tokenizer.decode(ids[0].tolist())

    record = {
        "benchmark": "lm_quality", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": _machine(), "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "config": {"data": os.path.basename(args.data), "split": "first 90% train, last 10% "
                   "validation", "minutes_per_model": args.minutes, "rounds": rounds,
                   "embed_dim": args.embed_dim, "hidden_size": args.hidden_size,
                   "num_layers": args.num_layers, "dropout": args.dropout,
                   "contestants": list(kinds),
                   "fastlstm_reg": _regularizers(args) if "fastlstm_reg" in kinds else None,
                   "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                   "optimizer": "adamw", "schedule": "constant after 100 warmup steps",
                   "device": str(device)},
        "results": results,
        "ratio_tokens_fastlstm_over_nn_lstm": (
            results["fastlstm"]["train_tokens"] / max(1, results["nn_lstm"]["train_tokens"])
            if "fastlstm" in results and "nn_lstm" in results else None),
        "sample": {"model": sampled, "prompt": prompt, "temperature": 0.8, "seed": args.seed,
                   "text": sample},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(record, handle, indent=2)
    print(f"\nvalidation loss after {args.minutes} min each (nats/char):")
    for kind in kinds:
        r = results[kind]
        print(f"  {kind:12s} {r['val_loss_nats_per_char']:.4f}  ({r['steps']} steps, "
              f"{r['train_tokens']:,} tokens)")
    print(f"\nsample ({sampled} model, temperature 0.8):\n{sample}\n\nrecord: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
