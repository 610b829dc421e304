"""Timing: interleaved runs of fastlstm and its baselines, medians of per-round ratios, floors.

Each round times every candidate once, in an order that rotates from round to round, so that a
slow drift of the machine (another process, clock changes, thermal state) falls on all of them
alike; the figure reported is the median over rounds of baseline time / fastlstm time.

On the CPU a timed sample is `inner` back-to-back calls between two perf_counter reads. On CUDA it
is the same calls between two CUDA events (the host only enqueues; the events measure the device),
or the replays of a CUDA graph holding one call where the callable allows capture.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch


def median(values):
    return statistics.median(values) if values else float("nan")


def ratios(baseline_times, fastlstm_times):
    """Per-round speedups: baseline time / fastlstm time (above 1: fastlstm is faster)."""
    if len(baseline_times) != len(fastlstm_times):
        raise ValueError(f"ratios: need one baseline time per fastlstm time; got "
                         f"{len(baseline_times)} and {len(fastlstm_times)}")
    return [b / f for b, f in zip(baseline_times, fastlstm_times)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """Seconds per call of `fn`, from `inner` back-to-back calls."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / inner
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - begin) / inner


def capture_graph(fn: Callable[[], object], device: torch.device):
    """A callable that replays a CUDA graph of one call of `fn`, or None when `fn` cannot be
    captured (host syncs, CPU work, unsupported ops): the caller then times `fn` eagerly."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as capture requires
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        synchronize(device)
    except Exception:  # noqa: BLE001 - any failure means "not capturable": time eagerly
        synchronize(device)
        return None
    return graph.replay


def interleaved(candidates: dict[str, Callable[[], object]], device, *, rounds: int,
                warmup: int = 2, min_sample_s: float = 0.02, max_inner: int = 10000,
                use_graphs: bool = False, max_seconds: float | None = None,
                min_rounds: int = 3) -> dict:
    """Time every candidate `rounds` times, interleaved, after `warmup` calls each.

    Returns {"times": {name: [seconds per call, one per round]}, "inner": {name: calls per
    sample}, "timer": {name: "perf_counter" | "cuda_events" | "cuda_graph"}}. `inner` is chosen
    per candidate so that one sample lasts about `min_sample_s`, which keeps timer resolution and
    call overhead out of fast calls without making slow ones repeat. With `max_seconds`, fewer
    rounds (never under `min_rounds`) are run when `rounds` of them would take longer; the
    result's "rounds" says how many ran.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1; got {rounds}")
    device = torch.device(device)
    names = list(candidates)
    calls, timers = {}, {}
    for name in names:
        fn = candidates[name]
        replay = capture_graph(fn, device) if use_graphs else None
        calls[name] = replay or fn
        timers[name] = ("cuda_graph" if replay else
                        "cuda_events" if device.type == "cuda" else "perf_counter")
    inner, once_times = {}, {}
    for name in names:
        fn = calls[name]
        for _ in range(warmup - 1):
            fn()
        # the last warm-up call (or the only call, with warmup=0) is timed to choose `inner`
        once = once_times[name] = time_calls(fn, device, 1)
        inner[name] = int(min(max_inner, max(1, math.ceil(min_sample_s / max(once, 1e-9)))))
    if max_seconds is not None:
        per_round = sum(once_times[name] * inner[name] for name in names)
        rounds = min(rounds, max(min_rounds, int(max_seconds / max(per_round, 1e-9))))
    times = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_calls(calls[name], device, inner[name]))
    return {"times": times, "inner": inner, "timer": timers, "rounds": rounds}


def _best_over_threads(device: torch.device, measure) -> float:
    """The least time `measure()` reports, with torch's thread count as set and with one thread.

    A ceiling is the best the machine can do. On a CPU shared with other processes, parallel
    regions stall whenever one of their threads loses its core (0.65 GB/s for a 16 MiB sum with
    2 threads under load, 3.2 GB/s with 1): a floor computed from such a rate would be far too
    high and easy to "reach"."""
    best = measure()
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        try:
            best = min(best, measure())
        finally:
            torch.set_num_threads(threads)
    return best


def measure_read_bandwidth(device, nbytes: int | None = None, rounds: int = 7) -> dict:
    """Bytes per second at which torch reads a buffer much larger than the caches (one sum over
    it): the bandwidth floors of memory-bound work are computed from this, in the same run."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 31) if device.type == "cuda" else (1 << 27)
    buffer = torch.rand(nbytes // 4, device=device)
    fn = lambda: buffer.sum()  # noqa: E731
    seconds = _best_over_threads(device, lambda: min(interleaved(
        {"read": fn}, device, rounds=rounds, warmup=2, min_sample_s=0.05)["times"]["read"]))
    return {"bytes": buffer.numel() * 4, "seconds": seconds,
            "bytes_per_s": buffer.numel() * 4 / seconds,
            "method": f"best torch.sum over a {buffer.numel() * 4 >> 20} MiB float32 buffer"}


def matmul_callables(device, a: torch.Tensor, b: torch.Tensor) -> dict:
    """The matrix-product libraries torch offers for a @ b on `device`, as callables by name:
    torch.mm (MKL on x86 CPUs, cuBLAS on CUDA) and, on the CPU where torch has it, oneDNN (the
    library of nn.LSTM's CPU kernel; MKL runs without AVX-512 on processors other than Intel's,
    where oneDNN is about twice as fast)."""
    found = {"torch.mm": lambda: a @ b}
    if (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled):
        try:
            linear = torch.ops.mkldnn._linear_pointwise
            b_t = b.t().contiguous()
            linear(a[:2], b_t, None, "none", [], "")
            found["oneDNN"] = lambda: linear(a, b_t, None, "none", [], "")
        except (AttributeError, RuntimeError):
            pass
    return found


def measure_matmul_peak(device, dtype: torch.dtype, size: int | None = None,
                        rounds: int = 7) -> dict:
    """FLOP/s of one large square matrix product in `dtype` on the fastest library torch offers
    (matmul_callables): the arithmetic floor of training is FLOPs over this rate, measured in the
    same run."""
    device = torch.device(device)
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best_name, best_seconds = None, float("inf")
    for name, fn in matmul_callables(device, a, b).items():
        seconds = _best_over_threads(device, lambda fn=fn: min(interleaved(
            {"mm": fn}, device, rounds=rounds, warmup=2, min_sample_s=0.05)["times"]["mm"]))
        if seconds < best_seconds:
            best_name, best_seconds = name, seconds
    return {"flops": 2 * size ** 3, "size": size, "seconds": best_seconds,
            "flops_per_s": 2 * size ** 3 / best_seconds, "library": best_name,
            "method": f"best {size}x{size}x{size} {str(dtype).replace('torch.', '')} matmul, "
                      f"{best_name}"}
