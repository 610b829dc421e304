"""The `fastlstm` command (also `python -m fastlstm`): train, generate, bench.

    fastlstm train --text corpus.txt --out-dir run          # char level; --level word for words
    fastlstm generate --checkpoint run --prompt "ROMEO:"    # streams text to the terminal
    fastlstm bench ...                                      # the benchmark runner

With no --text, `train` uses a corpus present wherever Python is installed (the standard
library's own source files), so it works out of the box. Multi-GPU / multi-node:
`torchrun --nproc_per_node N -m fastlstm train ...` (DDP; gloo on the CPU, nccl on CUDA).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence



def _zoneout_value(text):
    parts = [float(part) for part in text.split(",")]
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"--zoneout: expected z or z_h,z_c; got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _train_parser(subparsers):
    from .lm.train import TrainConfig
    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train a character- or word-level LSTM language model",
        description="Train an LSTM language model with teacher forcing and truncated BPTT. "
                    "Writes OUT_DIR/checkpoint.pt (resumable), tokenizer.json, history.json and "
                    "loss.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--text", default=None,
                      help="UTF-8 text file to train on (default: the Python standard library's "
                           "own sources, a bounded amount)")
    data.add_argument("--level", choices=("char", "word"), default=d.level)
    data.add_argument("--max-vocab", type=int, default=d.max_vocab,
                      help="word level: vocabulary size limit, <unk> and <eol> included")
    data.add_argument("--min-freq", type=int, default=d.min_freq,
                      help="word level: words seen fewer times become <unk>")
    data.add_argument("--val-fraction", type=float, default=d.val_fraction,
                      help="the last fraction of the text is held out for validation")
    model = p.add_argument_group("model")
    model.add_argument("--embed-dim", type=int, default=d.embed_dim)
    model.add_argument("--hidden-size", type=int, default=d.hidden_size)
    model.add_argument("--num-layers", type=int, default=d.num_layers)
    model.add_argument("--dropout", type=float, default=d.dropout)
    model.add_argument("--weight-drop", type=float, default=d.weight_drop,
                       help="DropConnect on the LSTM's recurrent weights (AWD-LSTM)")
    model.add_argument("--locked-dropout", type=float, default=d.locked_dropout,
                       help="variational dropout between LSTM layers (one mask per sequence)")
    model.add_argument("--zoneout", type=_zoneout_value, default=d.zoneout,
                       help="zoneout probability of h and c, or 'z_h,z_c'")
    model.add_argument("--tie-weights", action="store_true",
                       help="share embedding and output weights (needs embed-dim == hidden-size)")
    model.add_argument("--backend", default=d.backend,
                       help="fastlstm.LSTM backend: auto, cpu, cuda, triton or torch")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per process")
    opt.add_argument("--seq-len", type=int, default=d.seq_len, help="truncated BPTT length")
    opt.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in total")
    opt.add_argument("--max-minutes", type=float, default=d.max_minutes,
                     help="stop after this much training time (a checkpoint is written)")
    opt.add_argument("--optimizer", choices=("adamw", "sgd"), default=d.optimizer)
    opt.add_argument("--lr", type=float, default=d.lr)
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--momentum", type=float, default=d.momentum, help="sgd only")
    opt.add_argument("--clip", type=float, default=d.clip, help="max gradient norm (0: off)")
    opt.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule)
    opt.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps")
    opt.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                     help="cosine: final lr as a fraction of --lr")
    run = p.add_argument_group("run")
    run.add_argument("--out-dir", default=d.out_dir)
    run.add_argument("--resume", action="store_true",
                     help="continue from OUT_DIR/checkpoint.pt (exactly where it stopped)")
    run.add_argument("--eval-interval", type=int, default=d.eval_interval,
                     help="steps between validations and checkpoints")
    run.add_argument("--eval-batches", type=int, default=d.eval_batches,
                     help="validation batches per evaluation (0: the whole split)")
    run.add_argument("--log-interval", type=int, default=d.log_interval,
                     help="steps between progress lines when the output is not a terminal")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument("--amp", choices=("auto", "bf16", "off"), default=d.amp,
                     help="auto: bf16 autocast on CUDA, none on the CPU")
    run.add_argument("--no-plot", action="store_true", help="do not draw loss.png")
    p.set_defaults(handler=_run_train)


def _generate_parser(subparsers):
    p = subparsers.add_parser(
        "generate", help="generate text from a trained checkpoint",
        description="Continue a prompt with a trained model, printing the text as it is made.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt, or the --out-dir of `fastlstm train`")
    p.add_argument("--prompt", default=None,
                   help="text to continue (default: a line break)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=500)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="keep tokens at least this fraction as likely as the most likely one, "
                        "after top-k and top-p (0.0: off)")
    p.add_argument("--greedy", action="store_true", help="always the most likely token")
    p.add_argument("--seed", type=int, default=None, help="fixes the draws (default: random)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(handler=_run_generate)


def _bench_parser(subparsers):
    p = subparsers.add_parser("bench", help="run the benchmarks (fastlstm bench --help)",
                              add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_run_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlstm", description="Fused LSTM kernels and LSTM language models for PyTorch.")
    subparsers = parser.add_subparsers(dest="command", metavar="{train,generate,bench}")
    subparsers.required = True
    _train_parser(subparsers)
    _generate_parser(subparsers)
    _bench_parser(subparsers)
    return parser


# ------------------------------------------------------------------------------------------------

def _run_train(args) -> int:
    from .lm.train import TrainConfig, train
    config = TrainConfig(
        text=args.text, out_dir=args.out_dir, level=args.level, max_vocab=args.max_vocab,
        min_freq=args.min_freq, val_fraction=args.val_fraction, embed_dim=args.embed_dim,
        hidden_size=args.hidden_size, num_layers=args.num_layers, dropout=args.dropout,
        tie_weights=args.tie_weights, batch_size=args.batch_size, seq_len=args.seq_len,
        steps=args.steps, max_minutes=args.max_minutes, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, momentum=args.momentum, clip=args.clip,
        schedule=args.schedule, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
        eval_interval=args.eval_interval, eval_batches=args.eval_batches,
        log_interval=args.log_interval, seed=args.seed, device=args.device, amp=args.amp,
        resume=args.resume, plot=not args.no_plot, backend=args.backend,
        weight_drop=args.weight_drop, locked_dropout=args.locked_dropout, zoneout=args.zoneout)
    summary = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        val = summary["val_loss"]
        print(f"done: {summary['step']} steps, train loss {summary['train_loss']:.4f}"
              + (f", validation loss {val:.4f}" if val is not None else "")
              + f"; checkpoint {summary['checkpoint']}")
    return 0


class _TextStream:
    """Turns token ids into text piece by piece, as they are generated."""

    def __init__(self, tokenizer):
        from .lm.tokenizers import WordTokenizer
        self.tokenizer = tokenizer
        self.words = isinstance(tokenizer, WordTokenizer)
        self.after_word = False

    def prime(self, prompt_ids) -> None:
        if self.words and prompt_ids:
            self.after_word = prompt_ids[-1] != self.tokenizer.eol_id

    def piece(self, ids) -> str:
        if not self.words:
            return self.tokenizer.decode(ids)
        out = []
        for i in ids:
            if i == self.tokenizer.eol_id:
                out.append("\n")
                self.after_word = False
            else:
                out.append((" " if self.after_word else "") + self.tokenizer.itos[i])
                self.after_word = True
        return "".join(out)


def _run_generate(args) -> int:
    import torch

    from .lm.generate import Decoder
    from .lm.train import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint

    path = args.checkpoint
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0; got {args.max_new_tokens}")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    model, tokenizer = model_from_checkpoint(load_checkpoint(path), device=device)
    if args.prompt is None or args.prompt == "":
        if tokenizer.kind == "word":
            prompt_ids = [tokenizer.eol_id]
        else:
            prompt_ids = [tokenizer.stoi.get("\n", 0)]
        shown = ""
    else:
        prompt_ids = tokenizer.encode(args.prompt)
        if not prompt_ids:
            raise ValueError("--prompt: the prompt encodes to no tokens")
        shown = args.prompt
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed if args.seed is not None else torch.seed())
    temperature = 0.0 if args.greedy else args.temperature
    decoder = Decoder(model, torch.tensor([prompt_ids], device=device), temperature,
                      args.top_k, args.top_p, generator, min_p=args.min_p)
    stream = _TextStream(tokenizer)
    stream.prime(prompt_ids)
    out = sys.stdout
    out.write(shown)
    out.flush()
    remaining = args.max_new_tokens
    chunk = 1
    while remaining > 0:
        # Small chunks first so text appears at once, then larger ones (fewer calls).
        count = min(chunk, remaining)
        ids = decoder.next(count)[0].tolist()
        out.write(stream.piece(ids))
        out.flush()
        remaining -= count
        chunk = min(chunk * 2, 32)
    out.write("\n")
    out.flush()
    return 0


def _run_bench(args) -> int:
    import importlib
    try:
        bench = importlib.import_module("fastlstm.bench")
    except ModuleNotFoundError as error:
        if error.name == "fastlstm.bench":
            print("fastlstm bench: the benchmark runner (fastlstm.bench) is not part of this "
                  "installation; install fastlstm from a complete source tree", file=sys.stderr)
            return 2
        raise
    return int(bench.main(list(args.bench_args)) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to the runner
        return _run_bench(argparse.Namespace(bench_args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"fastlstm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfastlstm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
