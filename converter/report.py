"""The conversion report: a plain dict (stored in the manifest and printed with ``--json``),
rendered here as a table for people and as a PNG chart for ``--report-dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from sdk.deps import require

__all__ = ["render_table", "write_report_dir", "metric_label"]


def _kb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1024:.1f} KB"


def _f(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def metric_label(c: dict[str, Any]) -> str:
    metric = c.get("metric")
    if metric == "accuracy":
        return f"acc {100 * c['accuracy']:.2f}%"
    if metric == "top1_agreement":
        return f"agree {100 * c['top1_agreement']:.2f}%"
    if metric == "cosine":
        return f"cos {c['cosine']:.5f}"
    return "-"


def _quality(q: dict[str, Any]) -> str:
    if "accuracy" in q:
        return f"{100 * q['accuracy']:.2f}%"
    return f"agree {100 * q['top1_agreement']:.2f}%" if "top1_agreement" in q else "-"


def _distillation_lines(d: dict[str, Any]) -> list[str]:
    """Teacher and student side by side (and the student trained alone, if it was)."""
    head = f"  {'':<22}{'params':>10}{'file':>11}{d['recipe']:>18}{'p50 ms':>9}  {'float':>8}  {'converted':>9}"
    lines = ["", f"distillation: T={d['temperature']}, alpha={d['alpha']}, {d['epochs']} epochs on {d['train_samples']} "
                 f"samples; P = N'/N = {d['param_ratio']:.4f}, size ratio {d['size_ratio']:.3f}", head]
    for who in ("teacher", "student"):
        r = d[who]
        lines.append(f"  {who:<22}{r['params']:>10,}{_kb(r['file_bytes']):>11}{_kb(r['tflite_bytes']):>18}"
                     f"{r['p50_ms']:>9.3f}  {_quality(r['float']):>8}  {_quality(r['converted']):>9}")
    if "alone" in d:
        lines.append(f"  {'student, labels alone':<22}{d['student']['params']:>10,}{'':>11}{'':>18}{'':>9}  "
                     f"{_quality(d['alone']['float']):>8}  (distilling bought {d['gain_over_alone_pts']:+.2f} pts)")
    return lines


def render_table(report: dict[str, Any]) -> str:
    """The human-readable report: one row per recipe tried, then sizes, ops and notes."""
    lines = []
    src = report["source"]
    lines.append(
        f"source: {src['path']} ({src['kind']}, {_kb(src['bytes'])})  target: {report['target']}  "
        f"quantize: {report['quantize']}  optimize: {report['optimize']}"
    )
    ev = report.get("evaluation", {})
    if ev:
        ref = ev.get("reference_accuracy")
        ref_s = f", original model accuracy {100 * ref:.2f}%" if ref is not None else ""
        lines.append(f"evaluated on: {ev.get('data')} ({ev.get('samples')} samples, metric {ev.get('metric')}{ref_s})")
    lat = report.get("latency_setup", {})
    if lat:
        lines.append(
            f"latency: {lat['runtime']} on {lat['delegate']}, {lat['threads']} threads, "
            f"{lat['warmup']} warm-up, then at least {lat['runs']} runs per recipe over at least "
            f"{lat.get('min_seconds', 0)} s, recipes interleaved in blocks of 10, batch 1"
        )
    header = f"{'':2}{'recipe':<22}{'size':>11}{'zipped':>11}{'ratio':>7}{'p50 ms':>9}{'p99 ms':>9}  {'quality':<18}{'drop':>7}  status"
    lines += ["", header, "-" * len(header)]
    for c in report["candidates"]:
        mark = "*" if c.get("chosen") else " "
        status = c.get("status", "")
        if c.get("error"):
            status += f": {c['error']}"
        lat_c = c.get("latency") or {}
        lines.append(
            f"{mark:2}{c['label']:<22}{_kb(c.get('size_bytes')):>11}{_kb(c.get('compressed_bytes')):>11}"
            f"{_f(c.get('ratio_to_float32')):>7}{_f(lat_c.get('p50_ms'), '{:.3f}'):>9}{_f(lat_c.get('p99_ms'), '{:.3f}'):>9}  "
            f"{metric_label(c):<18}{_f(c.get('drop_pts')):>7}  {status}"
        )
    size = report.get("size", {})
    if size:
        lines += [
            "",
            f"size: source {_kb(size['source_bytes'])}, float32 tflite {_kb(size['float32_bytes'])}, "
            f"converted {_kb(size['converted_bytes'])} (P = N'/N = {size['compression_ratio']:.3f}), "
            f"compressed in the bundle {_kb(size['compressed_bytes'])}",
        ]
    pr = report.get("pruning")
    if pr:
        lines.append(
            f"pruning: target {100 * pr['target_sparsity']:.0f}%, achieved {100 * pr['achieved_sparsity']:.1f}% of "
            f"{pr['total_weights']} kernel weights; {pr['recipe']} compressed {_kb(pr['compressed_bytes_before'])} → "
            f"{_kb(pr['compressed_bytes_after'])} (tflite {_kb(pr['tflite_bytes_before'])} → {_kb(pr['tflite_bytes_after'])})"
            + (f"; fine-tuned {pr['fine_tune_epochs']} epochs" if pr.get("fine_tune_epochs") else "")
        )
    if report.get("distillation"):
        lines += _distillation_lines(report["distillation"])
    ops = report.get("ops", {})
    for accel in ("cpu", "gpu", "edgetpu"):
        a = ops.get(accel)
        if a:
            on = a[f"ops_on_{accel}"]
            total = len(a["nodes"])
            extra = "" if accel == "cpu" else f" ({a['ops_on_cpu']} on CPU)"
            first = next((n for n in a["nodes"] if n["placement"] != accel), None)
            why = f"; first CPU op #{first['index']} {first['op']}: {first['reason']}" if first and accel != "cpu" else ""
            lines.append(f"ops on {accel}: {on}/{total}{extra}{why}")
            for p in a.get("model_problems", []):
                lines.append(f"  {accel}: {p}")
    etpu = report.get("edgetpu_compiler")
    if etpu:
        lines.append(f"edgetpu_compiler: {etpu['status']}: {etpu['message']}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_report_dir(report: dict[str, Any], directory: Path) -> list[Path]:
    """Write ``report.json`` and ``conversion.png`` (size, latency, quality per recipe)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "report.json"]
    written[0].write_text(json.dumps(report, indent=2, sort_keys=True))
    matplotlib = require("matplotlib", "converter", "to draw report charts")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "converter", "to draw report charts")
    rows = [c for c in report["candidates"] if c.get("size_bytes")]
    labels = [c["label"] + (" *" if c.get("chosen") else "") for c in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [
        ("size (KB)", [c["size_bytes"] / 1024 for c in rows]),
        ("latency p50 (ms)", [(c.get("latency") or {}).get("p50_ms", 0.0) for c in rows]),
        ("quality drop (points)", [c.get("drop_pts") or 0.0 for c in rows]),
    ]
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(range(len(values)), values, color=["#d62728" if c.get("chosen") else "#1f77b4" for c in rows])
        ax.set_title(title)
        ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    fig.suptitle(f"{Path(report['source']['path']).name} → target {report['target']} (* = chosen)")
    fig.tight_layout()
    chart = directory / "conversion.png"
    fig.savefig(chart, dpi=110)
    plt.close(fig)
    written.append(chart)
    return written
