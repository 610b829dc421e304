"""Tables from records: plain text for the terminal, Markdown for BENCHMARKS.md, and the rewrite
of BENCHMARKS.md's marked table blocks from recorded results."""
from __future__ import annotations

import re
import shlex

from . import records as records_module

UNITS = {"train": "per batch, forward + backward", "forward": "per batch, inference forward",
         "decode": "per generated token, batch 1", "sample": "per call",
         "quant": "quantized CPU inference: decode per token, forward per batch",
         "fastrnns_fwd": "fastrnns conventions, forward", "fastrnns_bwd":
         "fastrnns conventions, backward"}


def format_time(seconds: float | None, per_token: bool = False) -> str:
    if seconds is None:
        return "-"
    suffix = "/token" if per_token else ""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs{suffix}"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms{suffix}"
    return f"{seconds:.3g} s{suffix}"


def format_rate(per_second: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_second >= limit:
            return f"{per_second / limit:.3g}{suffix}"
    return f"{per_second:.3g}"


def _time_cell(record, which: str) -> str:
    seconds = record[f"{which}_median"]
    text = format_time(seconds, record["unit"] == "s/token")
    tokens = record["work"].get("tokens")
    if seconds and tokens and record["suite"] not in ("decode", "sample") \
            and record["unit"] != "s/token":
        text += f" ({format_rate(tokens / seconds)} tok/s)"
    return text


def _ratio_cell(record) -> str:
    if record["ratio_median"] is None:
        return "-"
    spread = record["ratios"]
    return f"{record['ratio_median']:.2f}x ({min(spread):.2f}-{max(spread):.2f})"


def _floor_cell(record) -> str:
    if record["floor_s"] is None:
        return "-"
    text = format_time(record["floor_s"], record["unit"] == "s/token")
    if record["fastlstm_median"]:
        text += f"; fastlstm at {record['fastlstm_median'] / record['floor_s']:.3g}x"
    return text


HEADERS = ("shape", "backend", "fastlstm (median)", "baseline", "baseline (median)",
           "speedup (range)", "floor", "note")


def rows(records: list[dict]) -> list[tuple]:
    made = []
    for record in records:
        backend = record["backend"]
        if record["backend_ran"] and record["backend_ran"] != backend:
            backend = f"{backend} -> {record['backend_ran']}"
        note = ""
        if record["status"] != "ok":
            note = f"{record['status']}: {record['reason']}"
        elif record.get("cuda_graph") and any(record["cuda_graph"].values()):
            graphed = [k for k, v in record["cuda_graph"].items() if v]
            note = "CUDA graph: " + ", ".join(graphed)
        made.append((record["shape_label"], backend, _time_cell(record, "fastlstm"),
                     record["baseline"], _time_cell(record, "baseline"), _ratio_cell(record),
                     _floor_cell(record), note))
    return made


def _groups(records):
    """Records grouped by what a table holds: one suite on one machine, device and dtype pair."""
    return records_module.group_by(
        records, lambda r: (r["suite"], r["device"], r["dtype"], r["baseline_dtype"],
                            records_module.machine_name(r, cores=True)))


def _title(key) -> str:
    suite, device, dtype, baseline_dtype, where = key
    dtypes = dtype if dtype == baseline_dtype else f"{dtype} (baseline {baseline_dtype})"
    return f"{suite} ({UNITS.get(suite, suite)}) - {device} {dtypes} - {where}"


def text_tables(records: list[dict]) -> str:
    out = []
    for key, group in _groups(records).items():
        table = [HEADERS] + rows(group)
        widths = [max(len(str(row[i])) for row in table) for i in range(len(HEADERS))]
        out.append(_title(key))
        for index, row in enumerate(table):
            out.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
            if index == 0:
                out.append("  ".join("-" * width for width in widths))
        out.append("")
    return "\n".join(out)


def brief_table(records: list[dict]) -> str:
    """One short line per comparison: what a terminal with little room should show last."""
    lines = [f"{'suite':<12} {'shape':<30} {'dtype':<9} {'backend':<8} {'fastlstm':>14} "
             f"{'baseline':>14} {'speedup':>8}  baseline"]
    for record in records:
        per_token = record["unit"] == "s/token"
        if record["status"] == "ok":
            cells = (format_time(record["fastlstm_median"], per_token),
                     format_time(record["baseline_median"], per_token),
                     f"{record['ratio_median']:.2f}x")
        else:
            cells = (record["status"], "-", "-")
        dtype = record["dtype"] if record["dtype"] == record["baseline_dtype"] else \
            f"{record['dtype']}/{record['baseline_dtype']}"
        lines.append(f"{record['suite']:<12} {record['shape_label']:<30} {dtype:<9} "
                     f"{(record['backend_ran'] or record['backend']):<8} {cells[0]:>14} "
                     f"{cells[1]:>14} {cells[2]:>8}  {record['baseline']}")
    return "\n".join(lines)


def markdown_table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    for row in rows(records):
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def markdown_tables(records: list[dict]) -> str:
    out = []
    for key, group in _groups(records).items():
        out.append(f"#### {_title(key)}\n")
        out.append(_provenance(group) + "\n")
        out.append(markdown_table(group) + "\n")
    return "\n".join(out)


def _provenance(group: list[dict]) -> str:
    commands = sorted({r["command"] for r in group})
    commits = sorted({(r["git_commit"] or "unknown")[:12] for r in group})
    runs = sorted({r["run_id"] for r in group})
    software = group[0]["software"]
    versions = f"torch {software.get('torch')}"
    if group[0]["device"] == "cuda":
        versions += (f", CUDA {software.get('cuda')}, cuDNN {software.get('cudnn')}, driver "
                     f"{group[0]['machine'].get('gpu_driver')}")
    if software.get("triton"):
        versions += f", Triton {software.get('triton')}"
    text = (f"Command: {', '.join(f'`{c}`' for c in commands)}; {versions}; commit "
            f"{', '.join(commits)}; run {', '.join(runs)}.")
    if group[0]["device"] == "cpu":
        threads = sorted({r["machine"].get("torch_threads") for r in group} - {None})
        loads = [r["machine"].get("load_average_1min") for r in group]
        loads = [value for value in loads if value is not None]
        if threads:
            text += f" torch threads: {', '.join(map(str, threads))}."
        if loads:
            text += (f" Load average (1 min) while measuring: {min(loads):.1f} to "
                     f"{max(loads):.1f} on {group[0]['machine'].get('cpu_cores')} cores.")
    return text


# A block of BENCHMARKS.md that `fastlstm bench --update-doc` rewrites:
#   <!-- bench-table suite=train device=cpu dtype=float32 -->
#   ...table...
#   <!-- /bench-table -->
# Filters (all optional but suite): device, dtype, baseline_dtype, backend, gpu / cpu (substring of
# the GPU name / CPU model), shapes ("label;label" to keep and order rows). `empty="..."` is shown,
# with the block's filters, while no record matches.
_BLOCK = re.compile(r"(<!-- bench-table (?P<spec>.*?)-->\n)(?P<body>.*?)(<!-- /bench-table -->)",
                    re.S)


def _select(records, spec: dict) -> list[dict]:
    keep = []
    for record in records:
        if record["suite"] != spec.get("suite"):
            continue
        if any(k in spec and record[k] != spec[k]
               for k in ("device", "dtype", "baseline_dtype", "backend")):
            continue
        gpu = record["machine"].get("gpu_name") or ""
        if "gpu" in spec and spec["gpu"].lower() not in gpu.lower():
            continue
        cpu = record["machine"].get("cpu_model") or ""
        if "cpu" in spec and spec["cpu"].lower() not in cpu.lower():
            continue
        keep.append(record)
    if "shapes" in spec:
        order = [label.strip() for label in spec["shapes"].split(";")]
        keep = sorted((r for r in keep if r["shape_label"] in order),
                      key=lambda r: order.index(r["shape_label"]))
    return keep


def update_document(text: str, records: list[dict]) -> tuple[str, int]:
    """Rewrite every bench-table block of `text` from the latest matching records; returns the
    new text and how many blocks now hold a table."""
    chosen = records_module.latest(records)
    filled = 0

    def replace(match):
        nonlocal filled
        spec = dict(part.split("=", 1) for part in shlex.split(match.group("spec")))
        if "suite" not in spec:
            raise ValueError(f"bench-table block without suite=: {match.group(0)[:80]!r}")
        selected = _select(chosen, spec)
        if not selected:
            body = spec.get("empty", "No recorded result matches this table yet.") + "\n"
        else:
            filled += 1
            body = _provenance(selected) + "\n\n" + markdown_table(selected) + "\n"
        return match.group(1) + body + match.group(4)

    return _BLOCK.sub(replace, text), filled


_PLOTS = re.compile(r"(<!-- bench-plots -->\n)(?P<body>.*?)(<!-- /bench-plots -->)", re.S)
_PLOT_TITLES = {"train_speedup_vs_hidden.png": "Training speedup against hidden size",
                "train_speedup_vs_batch.png": "Training speedup against batch",
                "decode_latency.png": "Decode latency per token",
                "sample_time_vs_vocab.png": "Sampling time against vocabulary"}


def update_plots(text: str, paths: list[str], document_dir: str) -> str:
    """Fill the bench-plots block of a document with the PNGs drawn, linked relative to it."""
    import os
    lines = []
    for path in paths:
        name = os.path.basename(path)
        link = os.path.relpath(path, document_dir).replace(os.sep, "/")
        lines.append(f"![{_PLOT_TITLES.get(name, name)}]({link})\n")
    body = "\n".join(lines) if lines else "No plot yet: no suite has a recorded result.\n"
    return _PLOTS.sub(lambda m: m.group(1) + body + m.group(3), text)
