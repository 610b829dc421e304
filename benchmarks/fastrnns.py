"""fastlstm in the conventions of PyTorch's own LSTM benchmark (pytorch/benchmarks/fastrnns).

Same defaults as that suite: sequence 100, 1 layer, input 512, hidden 512, batch 64, 100 timed
loops after 10 warm-up loops; forward (with the autograd graph built, as in training) and backward
(output.backward(grad_output)) timed separately; the same printed table, in milliseconds:

    name  avg_fwd  std_fwd  info_fwd  avg_bwd  std_bwd  info_bwd

so that these figures can be set next to that suite's. Runners: `cudnn` (its name there for
nn.LSTM; oneDNN on the CPU) and `fastlstm-<backend>`. All runners run in the same loop, one
after another in a rotating order, so machine drift falls on all alike; with --out the loops are
also written as records of fastlstm.bench's schema (suites fastrnns_fwd and fastrnns_bwd, each
fastlstm runner against cudnn), readable by `fastlstm bench --from`.

    python benchmarks/fastrnns.py --rnns cudnn fastlstm-cpu            # CPU
    python benchmarks/fastrnns.py --device cuda --rnns cudnn fastlstm-cuda fastlstm-triton
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
import time

import torch

import fastlstm
from fastlstm.bench import records, shapes, timing, workloads


@dataclasses.dataclass
class Runner:
    name: str
    model: torch.nn.Module
    backend_ran: str | None


def make_runners(names, args, device):
    baseline = torch.nn.LSTM(args.inputSize, args.hiddenSize, args.numLayers).to(device)
    made, skipped = [], {}
    for name in names:
        if name == "cudnn":
            made.append(Runner(name, baseline, None))
            continue
        if not name.startswith("fastlstm-"):
            raise SystemExit(f"--rnns: unknown runner {name!r}; expected cudnn or "
                             f"fastlstm-<backend>")
        backend = name.split("-", 1)[1]
        try:
            ran = workloads.resolve_backend(backend, device, torch.float32)
        except workloads.Unavailable as reason:
            skipped[name] = str(reason)
            continue
        model = fastlstm.LSTM(args.inputSize, args.hiddenSize, args.numLayers,
                              backend=backend).to(device)
        model.load_state_dict(baseline.state_dict())
        made.append(Runner(name, model, ran))
    return made, skipped


def time_region(fn, device):
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        stop.record()
        stop.synchronize()
        return result, start.elapsed_time(stop) / 1e3
    begin = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - begin


def run(args) -> int:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    runners, skipped = make_runners(args.rnns, args, device)
    x = torch.randn(args.seqLength, args.miniBatch, args.inputSize, device=device)
    hx = torch.randn(args.numLayers, args.miniBatch, args.hiddenSize, device=device)
    cx = torch.randn(args.numLayers, args.miniBatch, args.hiddenSize, device=device)
    grad_output = torch.randn(args.seqLength, args.miniBatch, args.hiddenSize, device=device)
    times = {r.name: {"fwd": [], "bwd": []} for r in runners}
    for loop in range(args.warmup + args.nloops):
        shift = loop % max(len(runners), 1)
        for runner in runners[shift:] + runners[:shift]:
            for parameter in runner.model.parameters():
                parameter.grad = None
            timing.synchronize(device)
            (output, _), fwd = time_region(lambda: runner.model(x, (hx, cx)), device)
            _, bwd = time_region(lambda: output.backward(grad_output), device)
            if loop >= args.warmup:
                times[runner.name]["fwd"].append(fwd)
                times[runner.name]["bwd"].append(bwd)
        if args.progress and (loop + 1) % max(1, (args.warmup + args.nloops) // 10) == 0:
            print(f"[fastrnns] loop {loop + 1}/{args.warmup + args.nloops}", file=sys.stderr,
                  flush=True)

    def ms(values):
        return (statistics.mean(values) * 1e3,
                statistics.stdev(values) * 1e3 if len(values) > 1 else 0.0)

    header = ("name", "avg_fwd", "std_fwd", "info_fwd", "avg_bwd", "std_bwd", "info_bwd")
    print(" ".join(f"{h:>16}" for h in header))
    for runner in runners:
        avg_fwd, std_fwd = ms(times[runner.name]["fwd"])
        avg_bwd, std_bwd = ms(times[runner.name]["bwd"])
        info = runner.backend_ran or ("cudnn" if device.type == "cuda" else "onednn")
        cells = (runner.name, f"{avg_fwd:.4g}", f"{std_fwd:.4g}", info, f"{avg_bwd:.4g}",
                 f"{std_bwd:.4g}", info)
        print(" ".join(f"{c:>16}" for c in cells))
    for name, reason in skipped.items():
        print(f"{name:>16} skipped: {reason}")
    if args.out:
        write_records(args, device, runners, skipped, times)
        print(f"records: {args.out}")
    return 0


def write_records(args, device, runners, skipped, times):
    shape = shapes.LSTMShape(args.miniBatch, args.seqLength, args.inputSize, args.hiddenSize,
                             args.numLayers)
    writer = records.ResultWriter(args.out)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-fastrnns"
    command = shlex.join(["python", "benchmarks/fastrnns.py"] + args.argv)
    base = {r.name: r for r in runners}.get("cudnn")
    common = {
        "schema": records.SCHEMA, "run_id": run_id, "command": command,
        "shape": dataclasses.asdict(shape), "shape_label": shape.label, "device": device.type,
        "dtype": "float32", "baseline_dtype": "float32", "unit": "s",
        "rounds": args.nloops, "inner": {"fastlstm": 1, "baseline": 1},
        "timer": {"fastlstm": "cuda_events" if device.type == "cuda" else "perf_counter",
                  "baseline": "cuda_events" if device.type == "cuda" else "perf_counter"},
        "floor_s": None, "floor_basis": None, "machine": records.machine(device.type),
        "software": records.software(), "git_commit": records.git_commit(),
        "baseline": f"nn.LSTM ({workloads.onednn_name(device)}; fastrnns' cudnn runner)",
    }
    for phase in ("fwd", "bwd"):
        flops = shape.forward_flops() * (1 if phase == "fwd" else 2)
        for name, reason in skipped.items():
            writer.write({**common, "time": records.now(), "suite": f"fastrnns_{phase}",
                          "backend": name.split("-", 1)[1], "backend_ran": None,
                          "status": "skipped", "reason": reason, "fastlstm_times": None,
                          "baseline_times": None, "ratios": None, "fastlstm_median": None,
                          "baseline_median": None, "ratio_median": None,
                          "work": {"tokens": shape.tokens, "flops": flops}})
        if base is None:
            continue
        for runner in runners:
            if runner.name == "cudnn":
                continue
            fast = times[runner.name][phase]
            slow = times["cudnn"][phase]
            ratios = timing.ratios(slow, fast)
            writer.write({**common, "time": records.now(), "suite": f"fastrnns_{phase}",
                          "backend": runner.name.split("-", 1)[1], "backend_ran": runner.backend_ran,
                          "status": "ok", "reason": None, "fastlstm_times": fast,
                          "baseline_times": slow, "ratios": ratios,
                          "fastlstm_median": timing.median(fast),
                          "baseline_median": timing.median(slow),
                          "ratio_median": timing.median(ratios),
                          "work": {"tokens": shape.tokens, "flops": flops}})


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rnns", nargs="+", default=None,
                        help="runners: cudnn, fastlstm-<backend> (default: cudnn and the "
                             "device's fused backends)")
    parser.add_argument("--seqLength", type=int, default=100)
    parser.add_argument("--numLayers", type=int, default=1)
    parser.add_argument("--inputSize", type=int, default=512)
    parser.add_argument("--hiddenSize", type=int, default=512)
    parser.add_argument("--miniBatch", type=int, default=64)
    parser.add_argument("--nloops", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="append records (JSON lines) here")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    for name in ("seqLength", "numLayers", "inputSize", "hiddenSize", "miniBatch", "nloops"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0; got {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rnns is None:
        from fastlstm.bench.runner import default_backends
        args.rnns = ["cudnn"] + [f"fastlstm-{b}" for b in default_backends(args.device.split(":")[0])]
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
