"""The command line of `fastlstm bench` (and `python -m fastlstm.bench`): options, the run, the
outputs. The package docstring (fastlstm/bench/__init__.py) says what the suites measure."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch

from . import plot, records, report, runner, shapes, timing, workloads  # noqa: F401
from .shapes import OPT_IN_SUITES, SUITES


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark fastlstm against nn.LSTM, the eager decode loop and "
                    "softmax + multinomial; record results and draw tables and plots.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  fastlstm bench                                  # default CPU tables\n"
               "  fastlstm bench --quick                          # tiny shapes, seconds\n"
               "  fastlstm bench --device cuda --dtype bfloat16 --suites train "
               "--shapes train=16x1024x768x768x1\n"
               "  fastlstm bench --from benchmarks/results --markdown\n"
               "  fastlstm bench --from benchmarks/results --plot benchmarks/results/plots\n"
               "  fastlstm bench --from benchmarks/results --update-doc BENCHMARKS.md\n")
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    run.add_argument("--dtype", default="float32",
                     help="float32, bfloat16, float16 or float64 (default float32)")
    run.add_argument("--baseline-dtype", default=None,
                     help="dtype of the baselines when it should differ (e.g. fp16 cuDNN against "
                          "bf16 fastlstm); default: --dtype")
    run.add_argument("--suites", default=",".join(SUITES),
                     help=f"comma-separated subset of {','.join(SUITES + OPT_IN_SUITES)} (default "
                          f"{','.join(SUITES)})")
    run.add_argument("--backends", default=None,
                     help="comma-separated fastlstm backends to measure (cpu, cuda, triton, "
                          "torch, auto), or 'all'; default: the fused backends of the device "
                          "(cpu; or cuda,triton)")
    run.add_argument("--shapes", action="append", default=[], metavar="SUITE=SHAPE[,SHAPE]",
                     help="shapes for one suite, repeatable: train/forward BxTxIxH[xL], "
                          "sample BxV, decode VxExHxL; 'train=gpu-grid' / 'gpu-headline' name "
                          "the GPU grid. Suites not named use their defaults")
    run.add_argument("--repeats", type=int, default=None,
                     help="interleaved rounds per comparison (default 5 on the CPU, 10 on CUDA, "
                          "3 with --quick)")
    run.add_argument("--warmup", type=int, default=None,
                     help="warm-up calls per candidate before timing (default 1 CPU, 3 CUDA)")
    run.add_argument("--decode-tokens", type=int, default=None,
                     help="tokens generated per timed decode call (default 64 CPU, 128 CUDA)")
    run.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                     help="time budget of the run, spread over the comparisons left: a slow "
                          "comparison runs fewer rounds (at least 3; records say how many). "
                          "Default 150 for the default CPU configuration, else none; 0: none")
    run.add_argument("--no-cuda-graphs", action="store_true",
                     help="time forward and sampling eagerly on CUDA instead of as graph replays")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (torch.set_num_threads) for both sides; default: "
                          "torch's own choice, or 1 when the CPU is already loaded (load average "
                          "above the core count), where parallel regions stall and figures "
                          "swing by 10x. Each record keeps machine.torch_threads")
    run.add_argument("--quick", action="store_true",
                     help="tiny shapes and few rounds: checks the harness in seconds")
    run.add_argument("--out", default=None,
                     help="JSON-lines file for the records (default: benchmarks/results/"
                          "<device>-<run>.jsonl when ./benchmarks/results exists; 'none': "
                          "do not write)")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--regularizers", default=None, metavar="WD,LD,Z",
                     help="train suite: fastlstm.LSTM with weight_drop, locked_dropout and "
                          "zoneout on (e.g. 0.5,0.3,0.1), the same model without them timed "
                          "as a second baseline")
    results = parser.add_argument_group("from recorded results (no run)")
    results.add_argument("--from", dest="sources", nargs="+", default=None, metavar="RESULTS",
                         help="JSON-lines files or folders of them to read instead of running")
    results.add_argument("--markdown", action="store_true", help="print Markdown tables")
    results.add_argument("--brief", action="store_true",
                         help="print one short line per comparison instead of the full tables")
    results.add_argument("--plot", metavar="DIR", default=None, help="draw PNG plots into DIR")
    results.add_argument("--update-doc", metavar="FILE", default=None,
                         help="rewrite the bench-table blocks of FILE (e.g. BENCHMARKS.md), "
                              "and with --plot its bench-plots block")
    return parser


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _options(args, argv, prog) -> runner.Options:
    suites = _split(args.suites)
    for suite in suites:
        if suite not in SUITES + OPT_IN_SUITES:
            raise ValueError(f"--suites: {suite!r} is not a suite; expected "
                             f"{', '.join(SUITES + OPT_IN_SUITES)}")
    device_type = args.device.split(":")[0]
    backends = None
    if args.backends:
        backends = (runner.all_backends(device_type) if args.backends == "all"
                    else _split(args.backends))
        for backend in backends:
            if backend not in ("auto", "cpu", "cuda", "triton", "torch"):
                raise ValueError(f"--backends: {backend!r} is not a backend; expected auto, cpu, "
                                 f"cuda, triton, torch or all")
    for name, value in (("--repeats", args.repeats), ("--decode-tokens", args.decode_tokens),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1; got {value}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be at least 0; got {args.warmup}")
    workloads.dtype_from_name(args.dtype)
    if args.baseline_dtype:
        workloads.dtype_from_name(args.baseline_dtype)
    regularizers = None
    if args.regularizers:
        values = [float(value) for value in _split(args.regularizers)]
        if len(values) != 3:
            raise ValueError(f"--regularizers: expected weight_drop,locked_dropout,zoneout; got "
                             f"{args.regularizers!r}")
        regularizers = dict(zip(("weight_drop", "locked_dropout", "zoneout"), values))
    return runner.Options(
        regularizers=regularizers,
        device=args.device, dtype=args.dtype, baseline_dtype=args.baseline_dtype,
        suites=tuple(suites), backends=tuple(backends) if backends else None,
        shapes=shapes.parse_shapes_option(args.shapes) or None, rounds=args.repeats,
        warmup=args.warmup, quick=args.quick, decode_tokens=args.decode_tokens,
        cuda_graphs=not args.no_cuda_graphs, budget_s=_budget(args, device_type),
        command=" ".join([prog, shlex.join(list(argv))]).strip(),
        progress=None if args.quiet else sys.stderr)


def _threads_for_load(args) -> int | None:
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load <= cores or torch.get_num_threads() == 1:
        return None
    if not args.quiet:
        print(f"[bench] load average {load:.1f} on {cores} cores: running both sides with 1 "
              f"thread (--threads N to choose)", file=sys.stderr)
    return 1


def _budget(args, device_type: str) -> float | None:
    if args.budget is not None:
        if args.budget < 0:
            raise ValueError(f"--budget must be at least 0 seconds; got {args.budget}")
        return args.budget or None
    # The default CPU tables must finish in about 3 minutes even on a busy machine.
    if device_type == "cpu" and not args.quick and not args.shapes and args.repeats is None:
        return 150.0
    return None


def _default_out(device: str) -> str | None:
    folder = os.path.join("benchmarks", "results")
    if not os.path.isdir(folder):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(folder, f"{device.split(':')[0]}-{stamp}.jsonl")


def _outputs(args, made: list[dict]) -> None:
    if args.markdown:
        print(report.markdown_tables(made))
    drawn = []
    if args.plot:
        drawn = plot.draw(made, args.plot)
        for path in drawn:
            print(f"wrote {path}")
    if args.update_doc:
        with open(args.update_doc) as handle:
            text = handle.read()
        text, filled = report.update_document(text, made)
        if args.plot:
            text = report.update_plots(text, drawn,
                                       os.path.dirname(os.path.abspath(args.update_doc)))
        with open(args.update_doc, "w") as handle:
            handle.write(text)
        print(f"updated {args.update_doc}: {filled} table(s) filled from results")


def main(argv: list[str] | None = None, prog: str = "fastlstm bench") -> int:
    """Entry point of `fastlstm bench` (and `python -m fastlstm.bench`); returns the exit code.
    `prog` is how the command was invoked, as records and tables show it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(prog)
    args = parser.parse_args(argv)
    try:
        if args.sources is not None:
            made = records.load(args.sources)
            if not made:
                print(f"{prog}: no records in {' '.join(args.sources)}", file=sys.stderr)
                return 1
            if args.brief:
                print(report.brief_table(records.latest(made)))
            elif not (args.markdown or args.plot or args.update_doc):
                print(report.text_tables(records.latest(made)))
            _outputs(args, made)
            return 0
        options = _options(args, argv, prog)
    except (ValueError, FileNotFoundError) as error:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    threads_before = torch.get_num_threads()
    threads = args.threads
    if threads is None and options.device.startswith("cpu"):
        threads = _threads_for_load(args)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(args, options, prog)
    finally:  # a caller in the same process (tests, notebooks) keeps its own setting
        torch.set_num_threads(threads_before)


def _run(args, options, prog) -> int:
    out = args.out if args.out is not None else _default_out(options.device)
    if out == "none":
        out = None
    writer = records.ResultWriter(out)
    try:
        bench_runner = runner.Runner(options, writer)
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2

    def print_suite(suite, suite_records):
        print(report.text_tables(suite_records), flush=True)

    made = bench_runner.run(on_suite=print_suite)
    if out:
        print(f"records: {out}")
    _outputs(args, made)
    errors = [r for r in made if r["status"] == "error"]
    return 1 if errors else 0
