"""PNG plots drawn from recorded results (never from anything else): training speedup against
hidden size and against batch, decode latency per token, and sampling time against vocabulary."""
from __future__ import annotations

import os

from . import records as records_module


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    return plt


def _panels(records, suite):
    """ok records of a suite grouped into panels: (machine, device, dtype, backend)."""
    return records_module.group_by(
        [r for r in records if r["suite"] == suite and r["status"] == "ok"],
        lambda r: (records_module.machine_name(r), r["device"], r["dtype"], r["baseline_dtype"],
                   r["backend_ran"] or r["backend"]))


def _panel_title(key) -> str:
    where, device, dtype, baseline_dtype, backend = key
    dtypes = dtype if dtype == baseline_dtype else f"{dtype} vs {baseline_dtype}"
    return f"{backend} on {where}\n{device} {dtypes}"


def _panel_figure(plt, panels, panel_width):
    """One figure with a panel per group, side by side: (figure, [(axis, (key, records))])."""
    figure, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), 4.2),
                                squeeze=False)
    return figure, list(zip(axes[0], sorted(panels.items())))


def _save(plt, figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _speedup_plot(plt, panels, x_field, line_fields, xlabel, path):
    figure, panel_axes = _panel_figure(plt, panels, 5.5)
    for axis, (key, group) in panel_axes:
        lines: dict = {}
        for record in group:
            shape = record["shape"]
            label = " ".join(f"{name}={shape[field]}" for name, field in line_fields)
            lines.setdefault((label, record["baseline"]), []).append(
                (shape[x_field], record["ratio_median"], min(record["ratios"]),
                 max(record["ratios"])))
        for (label, baseline), points in sorted(lines.items()):
            points.sort()
            xs = [p[0] for p in points]
            ys = [p[1] for p in points]
            errors = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
            axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label)
        axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(f"speedup over {group[0]['baseline']}")
        axis.set_title(_panel_title(key), fontsize=9)
        axis.legend(fontsize=7)
        axis.grid(True, alpha=0.3)
    _save(plt, figure, path)


def _decode_plot(plt, panels, path):
    figure, panel_axes = _panel_figure(plt, panels, 6)
    for axis, (key, group) in panel_axes:
        labels = sorted({r["shape_label"] for r in group})
        series: dict = {"fastlstm generate": {}, "floor (one read of the weights)": {}}
        for record in group:
            series["fastlstm generate"][record["shape_label"]] = record["fastlstm_median"]
            series["floor (one read of the weights)"][record["shape_label"]] = record["floor_s"]
            series.setdefault(record["baseline"], {})[record["shape_label"]] = \
                record["baseline_median"]
        width = 0.8 / len(series)
        for index, (name, values) in enumerate(series.items()):
            xs = [i + index * width for i in range(len(labels))]
            ys = [values.get(label, 0) * 1e6 for label in labels]
            axis.bar(xs, ys, width=width, label=name)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        axis.set_xticklabels(labels, fontsize=7)
        axis.set_yscale("log")
        axis.set_ylabel("µs per token (batch 1)")
        axis.set_title(_panel_title(key), fontsize=9)
        axis.legend(fontsize=7)
        axis.grid(True, axis="y", alpha=0.3)
    _save(plt, figure, path)


def _sample_plot(plt, panels, path):
    figure, panel_axes = _panel_figure(plt, panels, 5.5)
    for axis, (key, group) in panel_axes:
        by_batch: dict = {}
        for record in group:  # one line per batch and filter (top-k / top-p rows apart)
            shape = record["shape"]
            line = (shape["batch"], shape.get("top_k", 0), shape.get("top_p", 1.0))
            by_batch.setdefault(line, []).append(record)
        for (batch, top_k, top_p), batch_records in sorted(by_batch.items()):
            if top_k:
                batch = f"{batch} top-k={top_k}"
            if top_p < 1.0:
                batch = f"{batch} top-p={top_p:g}"
            batch_records.sort(key=lambda r: r["shape"]["vocab"])
            vocab = [r["shape"]["vocab"] for r in batch_records]
            line = axis.plot(vocab, [r["fastlstm_median"] * 1e6 for r in batch_records],
                             marker="o", label=f"fastlstm B={batch}")[0]
            axis.plot(vocab, [r["baseline_median"] * 1e6 for r in batch_records], marker="s",
                      linestyle="--", color=line.get_color(),
                      label=f"{batch_records[0]['baseline']} B={batch}")
            axis.plot(vocab, [r["floor_s"] * 1e6 for r in batch_records], linestyle=":",
                      marker="x", color=line.get_color(), label=f"floor B={batch}")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("vocabulary V")
        axis.set_ylabel("µs per call")
        axis.set_title(_panel_title(key), fontsize=9)
        axis.legend(fontsize=7)
        axis.grid(True, alpha=0.3)
    _save(plt, figure, path)


def draw(records: list[dict], directory: str, prefix: str = "") -> list[str]:
    """Draw every plot the records allow into `directory`; returns the PNG paths written."""
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    chosen = records_module.latest(records)
    written = []
    train = _panels(chosen, "train")
    if train:
        path = os.path.join(directory, f"{prefix}train_speedup_vs_hidden.png")
        _speedup_plot(plt, train, "hidden_size", (("B", "batch"), ("T", "steps"),
                                                  ("L", "num_layers")),
                      "hidden size H (training: forward + backward)", path)
        written.append(path)
        path = os.path.join(directory, f"{prefix}train_speedup_vs_batch.png")
        _speedup_plot(plt, train, "batch", (("H", "hidden_size"), ("T", "steps"),
                                            ("L", "num_layers")),
                      "batch B (training: forward + backward)", path)
        written.append(path)
    decode = _panels(chosen, "decode")
    if decode:
        path = os.path.join(directory, f"{prefix}decode_latency.png")
        _decode_plot(plt, decode, path)
        written.append(path)
    sample = _panels(chosen, "sample")
    if sample:
        path = os.path.join(directory, f"{prefix}sample_time_vs_vocab.png")
        _sample_plot(plt, sample, path)
        written.append(path)
    return written
