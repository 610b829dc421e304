"""Runs the suites: builds each workload, times it interleaved with its baselines, and turns the
figures into records of the one schema (see records.py)."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid

import torch

from . import records, shapes, timing, workloads

FLOOR = "floor"  # the floor's own measurement, timed in the rounds of each comparison


@dataclasses.dataclass
class Options:
    device: str = "cpu"
    dtype: str = "float32"
    baseline_dtype: str | None = None
    suites: tuple = shapes.SUITES
    backends: tuple | None = None  # None: the fused backends of the device
    shapes: dict | None = None  # {suite: shapes}; suites not named use their defaults
    rounds: int | None = None
    warmup: int | None = None
    quick: bool = False
    decode_tokens: int | None = None
    cuda_graphs: bool = True
    budget_s: float | None = None  # spread over the comparisons left; fewer rounds if needed
    command: str = "fastlstm bench"
    progress: object = sys.stderr  # a file for progress lines, or None
    regularizers: dict | None = None  # train suite: fastlstm.LSTM(weight_drop=..., ...) on


def default_backends(device_type: str) -> tuple:
    """What `fastlstm bench` measures unless told: the fused backends of the device."""
    return ("cuda", "triton") if device_type == "cuda" else ("cpu",)


def all_backends(device_type: str) -> tuple:
    # triton on the CPU runs only under its interpreter, far too slow to time meaningfully
    return ("cuda", "triton", "torch") if device_type == "cuda" else ("cpu", "torch")


class Runner:
    def __init__(self, options: Options, writer: records.ResultWriter | None = None):
        self.options = options
        self.device = torch.device(options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA GPU here")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda (optionally cuda:N); got "
                             f"{options.device!r}")
        self.dtype = workloads.dtype_from_name(options.dtype)
        self.baseline_dtype = workloads.dtype_from_name(options.baseline_dtype or options.dtype)
        self.backends = tuple(options.backends or default_backends(self.device.type))
        self.rounds = options.rounds or (3 if options.quick else
                                         10 if self.device.type == "cuda" else 5)
        self.warmup = options.warmup if options.warmup is not None else (
            3 if self.device.type == "cuda" else 1)
        self.min_sample_s = 0.005 if options.quick else 0.02
        self.decode_tokens = options.decode_tokens or (8 if options.quick else
                                                       128 if self.device.type == "cuda" else 64)
        self.writer = writer or records.ResultWriter(None)
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.started = time.perf_counter()
        self.jobs_left = 0
        self._peak = {}
        self._bandwidth = None

    # --- floors, measured once per run and only when a suite needs them ----------------------
    def peak(self, dtype) -> dict:
        if dtype not in self._peak:
            self.say(f"measuring the matmul rate in {workloads.dtype_name(dtype)} for the "
                     f"training floor")
            size = 256 if self.options.quick else None
            self._peak[dtype] = timing.measure_matmul_peak(self.device, dtype, size=size)
        return self._peak[dtype]

    def bandwidth(self) -> dict:
        if self._bandwidth is None:
            self.say("measuring the memory read bandwidth for the decode and sampling floors")
            nbytes = (1 << 24) if self.options.quick else None
            self._bandwidth = timing.measure_read_bandwidth(self.device, nbytes)
        return self._bandwidth

    def say(self, text: str) -> None:
        if self.options.progress is not None:
            elapsed = time.perf_counter() - self.started
            print(f"[bench {elapsed:6.1f}s] {text}", file=self.options.progress, flush=True)

    # --- records ---------------------------------------------------------------------------
    def _record(self, suite, shape, backend, baseline, **fields) -> dict:
        if suite == "train" and self.options.regularizers:
            # Its own suite name, so tables of the plain train suite never take these records
            # (their nn.LSTM rows would otherwise replace the plain run's); the values are in
            # the command.
            suite = "train_regularized"
        record = {
            "schema": records.SCHEMA, "run_id": self.run_id, "time": records.now(),
            "command": self.options.command, "suite": suite,
            "shape": dataclasses.asdict(shape), "shape_label": shape.label,
            "device": self.device.type, "dtype": workloads.dtype_name(self.dtype),
            "baseline_dtype": workloads.dtype_name(self.baseline_dtype), "backend": backend,
            "backend_ran": None, "baseline": baseline, "status": "ok", "reason": None,
            "unit": "s/token" if suite == "decode" or getattr(shape, "per_token", False) else "s",
            "fastlstm_times": None, "baseline_times": None, "ratios": None,
            "fastlstm_median": None, "baseline_median": None, "ratio_median": None,
            "rounds": self.rounds, "inner": None, "timer": None, "work": {},
            "floor_s": None, "floor_basis": None, "peak_flops_per_s": None,
            "read_bytes_per_s": None, "memory_floor_s": None, "floor_times": None,
            "cuda_graph": None,
            "machine": records.machine(self.device.type), "software": records.software(),
            "git_commit": records.git_commit(),
        }
        record.update(fields)
        self.writer.write(record)
        return record

    def _floor(self, suite, work, floor_times) -> dict:
        if suite == "quant":  # compared with its baselines only
            return {}
        if suite in ("train", "forward"):
            # The rate is a ceiling: the best of the run's own measurement and of the same matrix
            # product timed in this comparison's rounds (the load of a shared machine moves both).
            peak = self.peak(self.dtype)
            rate, method = peak["flops_per_s"], peak["method"]
            if floor_times:
                in_rounds = peak["flops"] / min(floor_times)
                if in_rounds > rate:
                    rate, method = in_rounds, method + ", timed in this comparison's rounds"
            return {"floor_s": work["flops"] / rate, "floor_times": floor_times,
                    "floor_basis": f"{work['flops']:.3g} FLOP / {rate:.3g} FLOP/s ({method})",
                    "peak_flops_per_s": rate}
        # The floor of a memory-bound call: reading its bytes once, timed (in the same rounds
        # as the candidates) on a buffer of the same size kept warm as the real data is between
        # calls, so cache-resident weights get the cache's rate. Bytes over the bandwidth of a
        # buffer far larger than the caches is kept beside it: the memory's own rate.
        bandwidth = self.bandwidth()
        nbytes = self._floor_bytes(suite, work)
        what = "logits" if suite == "sample" else "weights per token"
        seconds = timing.median(floor_times)
        return {"floor_s": seconds, "floor_times": floor_times,
                "floor_basis": f"one read of {nbytes:.3g} B of {what} (torch.mv over a warm "
                               f"float32 matrix of that size, median of the rounds: "
                               f"{nbytes / seconds:.3g} B/s); from memory at "
                               f"{bandwidth['bytes_per_s']:.3g} B/s ({bandwidth['method']}): "
                               f"{nbytes / bandwidth['bytes_per_s']:.3g} s",
                "read_bytes_per_s": bandwidth["bytes_per_s"],
                "memory_floor_s": nbytes / bandwidth["bytes_per_s"]}

    @staticmethod
    def _floor_bytes(suite, work):
        return work["bytes"] if suite == "sample" else work["bytes_per_token"]

    def _floor_read(self, suite, work):
        if suite == "quant":
            return None
        if suite in ("train", "forward"):
            peak = self.peak(self.dtype)
            size = peak["size"]
            a = torch.randn(size, size, device=self.device, dtype=self.dtype)
            b = torch.randn(size, size, device=self.device, dtype=self.dtype)
            return timing.matmul_callables(self.device, a, b)[peak["library"]]
        # A matrix-vector product streams its matrix once, as the GEMVs of a decode step do; it
        # reads faster than torch.sum (5.0 against 3.8 GB/s on one core here for 35 MB).
        elements = max(self._floor_bytes(suite, work) // 4, 1)
        columns = min(1024, elements)
        matrix = torch.rand(-(-elements // columns), columns, device=self.device)
        vector = torch.rand(columns, device=self.device)
        return lambda: torch.mv(matrix, vector)

    def measure(self, suite: str, shape, backend: str) -> list[dict]:
        """One shape on one backend: a record per baseline (or one skipped/error record)."""
        build = workloads.BUILDERS[suite]
        kwargs = {"baseline_dtype": self.baseline_dtype}
        if suite in ("decode", "quant"):
            kwargs["new_tokens"] = self.decode_tokens
        if suite == "train" and self.options.regularizers:
            kwargs["regularizers"] = self.options.regularizers
        try:
            workload = build(shape, self.device, self.dtype, backend, **kwargs)
        except workloads.Unavailable as reason:
            return [self._record(suite, shape, backend, "-", status="skipped", reason=str(reason))]
        except Exception as error:  # noqa: BLE001 - record it and go on with the next shape
            return [self._record(suite, shape, backend, "-", status="error",
                                 reason=f"building the workload failed: "
                                        f"{type(error).__name__}: {error}")]
        candidates = {"fastlstm": workload.fastlstm, **workload.baselines}
        floor_read = self._floor_read(suite, workload.work)
        if floor_read is not None:
            # timed in the same rounds as the candidates, so it sees the same machine state
            candidates[FLOOR] = floor_read
        use_graphs = (self.options.cuda_graphs and workload.graph_safe
                      and self.device.type == "cuda")
        max_seconds = None
        if self.options.budget_s:
            left = self.options.budget_s - (time.perf_counter() - self.started)
            max_seconds = max(left, 0.0) / max(self.jobs_left, 1)
        try:
            result = timing.interleaved(candidates, self.device, rounds=self.rounds,
                                        warmup=self.warmup, min_sample_s=self.min_sample_s,
                                        use_graphs=use_graphs, max_seconds=max_seconds)
        except Exception as error:  # noqa: BLE001 - e.g. a kernel that fails at this shape
            return [self._record(suite, shape, backend, name, status="error",
                                 backend_ran=workload.backend_ran,
                                 reason=f"timing failed: {type(error).__name__}: {error}")
                    for name in workload.baselines]
        per_unit = workload.calls_per_unit
        fast_times = [t / per_unit for t in result["times"]["fastlstm"]]
        floor = self._floor(suite, workload.work, result["times"].get(FLOOR))
        made = []
        for name in workload.baselines:
            base_times = [t / per_unit for t in result["times"][name]]
            pair_ratios = timing.ratios(base_times, fast_times)
            made.append(self._record(
                suite, shape, backend, name, backend_ran=workload.backend_ran,
                rounds=result["rounds"],
                fastlstm_times=fast_times, baseline_times=base_times, ratios=pair_ratios,
                fastlstm_median=timing.median(fast_times),
                baseline_median=timing.median(base_times),
                ratio_median=timing.median(pair_ratios),
                inner={"fastlstm": result["inner"]["fastlstm"], "baseline": result["inner"][name]},
                timer={"fastlstm": result["timer"]["fastlstm"], "baseline": result["timer"][name]},
                cuda_graph={"fastlstm": result["timer"]["fastlstm"] == "cuda_graph",
                            "baseline": result["timer"][name] == "cuda_graph"},
                work=dict(workload.work), **floor))
        return made

    def run_suite(self, suite: str) -> list[dict]:
        chosen = self.suite_shapes(suite)
        jobs = [(shape, backend) for shape in chosen for backend in self.backends]
        made = []
        for index, (shape, backend) in enumerate(jobs, 1):
            self.say(f"{suite} {index}/{len(jobs)}: {shape.label}, backend {backend}")
            for record in self.measure(suite, shape, backend):
                made.append(record)
                if record["status"] == "ok":
                    self.say(f"  {record['ratio_median']:.2f}x against {record['baseline']}")
                else:
                    self.say(f"  {record['status']}: {record['reason']}")
            self.jobs_left = max(self.jobs_left - 1, 0)
        return made

    def suite_shapes(self, suite: str) -> tuple:
        return (self.options.shapes or {}).get(suite) or shapes.default_shapes(
            suite, self.device.type, self.options.quick)

    def warn_if_loaded(self) -> None:
        if self.device.type != "cpu":
            return
        try:
            load = os.getloadavg()[0]
        except OSError:
            return
        cores = os.cpu_count() or 1
        if load > cores:
            self.say(f"warning: load average {load:.1f} on {cores} cores: other processes "
                     f"compete for the CPU and the figures move with them "
                     f"({torch.get_num_threads()} torch thread(s))")

    def run(self, on_suite=None) -> list[dict]:
        self.warn_if_loaded()
        made = []
        self.jobs_left = sum(len(self.suite_shapes(s)) * len(self.backends)
                             for s in self.options.suites)
        for suite in self.options.suites:
            suite_records = self.run_suite(suite)
            made.extend(suite_records)
            if on_suite is not None:
                on_suite(suite, suite_records)
        return made
