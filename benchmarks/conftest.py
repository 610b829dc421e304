"""pytest-benchmark suites: `pytest benchmarks/` (one file per suite).

Shapes, workloads and baselines come from fastlstm.bench, the same ones `fastlstm bench` times,
so the two agree on what is measured. Options:
  --bench-device cpu|cuda   --bench-dtype float32|bfloat16|...   --bench-backend cpu|cuda|triton|torch|auto
  --bench-quick             tiny shapes (checks the suites in seconds)
These files run only when benchmarks/ (or a file in it) is named on the command line, so a bare
`pytest` from the repository root does not start them.
"""
from __future__ import annotations

import pathlib

import pytest
import torch

from fastlstm.bench import runner, shapes, workloads

BENCH_DIR = pathlib.Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("fastlstm benchmarks")
    group.addoption("--bench-device", default="cpu", help="cpu or cuda (default cpu)")
    group.addoption("--bench-dtype", default="float32", help="dtype of both sides (default float32)")
    group.addoption("--bench-backend", default=None,
                    help="fastlstm backend (default: the device's first fused backend)")
    group.addoption("--bench-quick", action="store_true", help="tiny shapes")
    group.addoption("--bench-rounds", type=int, default=5, help="timed rounds per case")


def pytest_ignore_collect(collection_path, config):
    path = pathlib.Path(collection_path).resolve()
    if path == BENCH_DIR or BENCH_DIR not in path.parents:
        return None
    for arg in config.args:
        target = pathlib.Path(str(arg).split("::")[0]).resolve()
        if target == BENCH_DIR or BENCH_DIR in target.parents:
            return None
    return True


def _config(config):
    device = config.getoption("--bench-device")
    return {"device": device, "dtype": workloads.dtype_from_name(config.getoption("--bench-dtype")),
            "backend": config.getoption("--bench-backend")
            or runner.default_backends(device.split(":")[0])[0],
            "quick": config.getoption("--bench-quick"),
            "rounds": config.getoption("--bench-rounds")}


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        suite = metafunc.module.SUITE
        config = _config(metafunc.config)
        chosen = shapes.default_shapes(suite, config["device"].split(":")[0], config["quick"])
        metafunc.parametrize("shape", chosen, ids=[s.label.replace(" ", ",") for s in chosen])


@pytest.fixture
def run_case(benchmark, request):
    """run_case(suite, shape, side): time one side of a fastlstm.bench workload, where side is
    "fastlstm" or "baseline:N" (the N-th baseline of the suite)."""
    config = _config(request.config)
    if config["device"].startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA GPU here")

    def run(suite, shape, side):
        kwargs = {"new_tokens": 8 if config["quick"] else 64} if suite == "decode" else {}
        try:
            workload = workloads.BUILDERS[suite](shape, config["device"], config["dtype"],
                                                 config["backend"], **kwargs)
        except workloads.Unavailable as reason:
            pytest.skip(str(reason))
        if side == "fastlstm":
            name, fn = f"fastlstm ({workload.backend_ran})", workload.fastlstm
        else:
            index = int(side.split(":")[1])
            names = list(workload.baselines)
            if index >= len(names):
                pytest.skip(f"{suite} has no baseline {index} on {config['device']}")
            name, fn = names[index], workload.baselines[names[index]]
        device = torch.device(config["device"])

        def call():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        benchmark.group = f"{suite} {shape.label}"
        benchmark.name = name
        benchmark.extra_info.update(suite=suite, shape=shape.label, side=name,
                                    dtype=str(config["dtype"]), device=config["device"],
                                    calls_per_unit=workload.calls_per_unit, **workload.work)
        benchmark.pedantic(call, rounds=config["rounds"], iterations=1, warmup_rounds=1)

    return run
