"""The one result schema of every benchmark: JSON lines, one record per measured comparison.

A record holds what was measured (suite, shape, dtype, backend, baseline), every timed figure
(one per round, for fastlstm and the baseline, and their per-round ratios), the medians, the floor
that the time is chasing, and where it was measured (machine, software versions, git commit), so
that a table or a plot can be redrawn from the records alone.
"""
from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import platform
import subprocess

import torch

SCHEMA = "fastlstm-bench/1"
STATUSES = ("ok", "skipped", "error")

# Every record has these keys (values may be None where they do not apply, e.g. the figures of a
# skipped comparison).
REQUIRED_KEYS = {
    "schema": str, "run_id": str, "time": str, "command": str, "suite": str, "shape": dict,
    "shape_label": str, "device": str, "dtype": str, "baseline_dtype": str, "backend": str,
    "backend_ran": (str, type(None)), "baseline": str, "status": str, "reason": (str, type(None)),
    "unit": str, "fastlstm_times": (list, type(None)), "baseline_times": (list, type(None)),
    "ratios": (list, type(None)), "fastlstm_median": (float, type(None)),
    "baseline_median": (float, type(None)), "ratio_median": (float, type(None)),
    "rounds": int, "inner": (dict, type(None)), "timer": (dict, type(None)), "work": dict,
    "floor_s": (float, type(None)), "floor_basis": (str, type(None)), "machine": dict,
    "software": dict, "git_commit": (str, type(None)),
}


def _read_cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None


@functools.lru_cache(maxsize=None)
def _static_machine(device_type: str) -> dict:
    info = {"cpu_model": _read_cpu_model(), "cpu_cores": os.cpu_count(),
            "platform": platform.platform(), "gpu_name": None, "gpu_count": 0,
            "gpu_driver": None, "gpu_memory_gib": None, "gpu_sm_count": None}
    if device_type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_driver=_nvidia_driver(), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_sm_count=props.multi_processor_count)
    return info


def machine(device_type: str) -> dict:
    """The machine the figures hold for: CPU model and cores, the GPU with its driver, and the
    state that moves CPU figures: torch's thread count and the load average (other processes
    competing for the cores) when the record was made."""
    info = dict(_static_machine(device_type))
    info["torch_threads"] = torch.get_num_threads()
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        info["load_average_1min"] = None
    return info


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def software() -> dict:
    """Versions of everything that decides the figures, and the math settings that change them."""
    import fastlstm
    cudnn = None
    try:
        cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except RuntimeError:
        cudnn = None
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": cudnn, "triton": _package_version("triton"),
        "fastlstm": fastlstm.__version__,
        "onednn_available": bool(torch.backends.mkldnn.is_available()),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }


@functools.lru_cache(maxsize=None)
def git_commit() -> str | None:
    """The commit the measured code was at (with "-dirty" when the tree had changes), from
    FASTLSTM_GIT_COMMIT if set (for copies of the tree without .git), else from git."""
    override = os.environ.get("FASTLSTM_GIT_COMMIT")
    if override:
        return override
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=20)
        if head.returncode != 0:
            return None
        # changed or new files of the code that runs count; recorded results do not
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "fastlstm",
                                "csrc", "setup.py", "CMakeLists.txt", "benchmarks",
                                ":!benchmarks/results"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def validate(record: dict) -> None:
    """Raise ValueError naming the first key of `record` that breaks the schema."""
    if not isinstance(record, dict):
        raise ValueError(f"record must be a dict; got {type(record).__name__}")
    for key, kind in REQUIRED_KEYS.items():
        if key not in record:
            raise ValueError(f"record lacks key {key!r}")
        if not isinstance(record[key], kind) or isinstance(record[key], bool) and kind is int:
            raise ValueError(f"record[{key!r}] = {record[key]!r} is not of type {kind}")
    if record["schema"] != SCHEMA:
        raise ValueError(f"record['schema'] must be {SCHEMA!r}; got {record['schema']!r}")
    if record["status"] not in STATUSES:
        raise ValueError(f"record['status'] must be one of {STATUSES}; got {record['status']!r}")
    if record["status"] == "ok":
        for key in ("fastlstm_times", "baseline_times", "ratios", "fastlstm_median",
                    "baseline_median", "ratio_median"):
            if record[key] is None:
                raise ValueError(f"an 'ok' record needs {key!r}")
        lengths = {len(record[k]) for k in ("fastlstm_times", "baseline_times", "ratios")}
        if lengths != {record["rounds"]}:
            raise ValueError(f"an 'ok' record needs {record['rounds']} figures per list; got "
                             f"lengths {sorted(lengths)}")
    elif not record["reason"]:
        raise ValueError(f"a {record['status']!r} record needs a 'reason'")


class ResultWriter:
    """Appends records to a JSON-lines file as they are made, so a run cut short keeps them."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)

    def write(self, record: dict) -> None:
        validate(record)
        if self.path:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")


def load(paths) -> list[dict]:
    """Records from JSON-lines files (or directories of *.jsonl files), in file order."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(sorted(os.path.join(path, name) for name in os.listdir(path)
                                if name.endswith(".jsonl")))
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"results: no such file or directory: {path}")
    records = []
    for name in files:
        with open(name) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    validate(record)
                except ValueError as error:
                    raise ValueError(f"{name}:{number}: not a fastlstm-bench record: {error}") \
                        from None
                records.append(record)
    return records


def machine_name(record: dict, cores: bool = False) -> str:
    """The machine a record ran on: its GPU's name, else its CPU model (with the core count)."""
    machine = record["machine"]
    if machine.get("gpu_name"):
        return machine["gpu_name"]
    if cores:
        return f"{machine.get('cpu_model')}, {machine.get('cpu_cores')} cores"
    return machine.get("cpu_model") or "?"


def group_by(records: list[dict], key) -> dict:
    """Records grouped by key(record), in order of first appearance."""
    groups: dict = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return groups


def latest(records: list[dict]) -> list[dict]:
    """For each comparison (suite, device, dtypes, shape, backend, baseline, machine), the record
    of the latest run: what tables and plots show."""
    chosen: dict = {}
    for record in sorted(records, key=lambda r: r["time"]):
        key = (record["suite"], record["device"], record["dtype"], record["baseline_dtype"],
               record["shape_label"], record["backend"], record["baseline"],
               machine_name(record))
        chosen[key] = record
    return list(chosen.values())
