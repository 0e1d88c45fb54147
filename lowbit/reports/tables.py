"""The report's tables with measured numbers joined to its cells, the plots, and the
Markdown and HTML files of `lowbit report` (the measurements: `lowbit.reports.compression`)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from lowbit.reports.compression import RECIPES, Results

# the report's own cells, kept beside the measured ones (report §5.3, §7.6, §9.3)
REPORT_53 = {
    "Workflow": ("Applied to a fully trained model; no retraining.", "Simulates quantization during training/fine-tuning."),
    "Computational Cost": ("Low; requires only calibration steps.", "High; requires full or partial retraining."),
    "Data Requirement": ("Small, representative calibration dataset.", "Large, representative training dataset."),
    "Accuracy Preservation": ("Moderate; can degrade at ≤4-bit.", "High; model learns to compensate for noise."),
}
REPORT_76 = {  # column -> (mechanism, target, hardware, calibration, strength)
    "LLM.int8()": ("llm-int8", "Mixed Precision (Outlier Separation)", "Weight & Activation (INT8)", "Standard GPUs (slow due to split)",
                   "No (Dynamic)", "Accuracy at Scale (>6.7B)"),
    "GPTQ": ("gptq W4 g128", "Hessian-based Error Minimisation", "Weight Only (INT4/3)", "Efficient Custom Kernels", "Yes (Hessian)",
             "High Compression (4-bit)"),
    "AWQ": ("awq W4 g128", "Activation-aware Scaling", "Weight Only (INT4)", "Efficient Custom Kernels", "Yes (Scaling Search)",
            "Hardware Efficiency"),
    "SmoothQuant": ("smoothquant", "Activation Smoothing", "Weight & Activation (INT8)", "Integer GEMM Units", "Yes (Smoothing Factor)",
                    "GenSpeed (W8A8 GEMM)"),
    "QLoRA (NF4)": ("nf4 g64", "NormalFloat Data Type", "Weight Only (INT4)", "Efficient Dequant Kernels", "No (Data Type Fixed)",
                    "Training/Finetuning Efficiency"),
}
REPORT_93 = {  # family -> (goal, training cost, speed-up, memory, suitability)
    "PTQ": ("Reduce Precision", "Low (Calibration)", "High (Tensor Cores)", "2x - 4x - 8x", "Excellent (GPTQ/AWQ)"),
    "unstructured pruning": ("Remove Weights", "High (Retraining)", "Low (without specialized HW)", "Sparse (needs compression)", "Good (SpQR)"),
    "structured pruning": ("Remove Structures", "High (Retraining)", "Moderate (2:4 support)", "Moderate", "Moderate"),
    "distillation": ("Architecture Reduction", "Very High (Retraining)", "High (Smaller Model)", "High", "Moderate (Data hungry)"),
}


def _delta(score: dict) -> float:
    return score["perplexity"] / score["reference_perplexity"] - 1


def quality(row: dict) -> str:
    """Δppl per corpus, KLD and top-1 on the first: the quality cell of every table."""
    parts = [f"{corpus} {_delta(s):+.1%}" for corpus, s in row["scores"].items()]
    first = next(iter(row["scores"].values()))
    if first["kld"] is not None:
        parts.append(f"KLD {first['kld']:.3f}, top-1 {first['top1_percent']:.1f}%")
    return ", ".join(parts)


def _bytes(row: dict) -> int:
    return next(iter(row["scores"].values()))["model_bytes"]


def _roofline_per_bandwidth(row: dict) -> float:
    """The roofline's tokens/s per GB/s of read bandwidth. Each row's prediction used the
    bandwidth measured when it ran, and that reading varies between runs on some machines;
    a decode step is memory-bound, so dividing it out compares the rows at one bandwidth."""
    roofline = row["roofline"]
    return roofline["tokens_per_second"] / roofline.get("bandwidth_gbps", 1.0)


def speed(row: dict, float_row: dict | None) -> str:
    """Measured decode tokens/s and its ratio to the float model's, beside the roofline's
    (at one bandwidth)."""
    measured = row.get("decode_tokens_per_second")
    text = "not measured" if measured is None else f"{measured:.1f} tok/s"
    if float_row is not None and measured and float_row.get("decode_tokens_per_second"):
        text += f" ({measured / float_row['decode_tokens_per_second']:.2f}x float)"
    if float_row is not None:
        text += f"; roofline {_roofline_per_bandwidth(row) / _roofline_per_bandwidth(float_row):.2f}x"
    return text


def _cells(rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731  (a bar inside a cell would end it)
    lines = ["| " + " | ".join(esc(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(["\n".join(lines)] + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows[1:]])


def table_53(results: Results) -> str:
    rows, ptq, qat = results.rows, [k for k in ("rtn W4 g128", "gptq W4 g128") if k in results.rows], results.rows.get("qat W4 g128")
    if not ptq or qat is None:
        return "(not measured: needs rtn or gptq W4 g128 and qat W4 g128)"
    p = results.protocol
    measured = {
        "Computational Cost": ("; ".join(f"{k}: {rows[k]['cost_seconds']:.0f} s" for k in ptq), f"qat: {qat['cost_seconds']:.0f} s"),
        "Data Requirement": (f"{p.calib_samples} x {p.calib_ctx} = {p.calib_samples * p.calib_ctx} calibration tokens (gptq; rtn none)",
                             f"{p.train_steps} steps x 4 x {p.train_ctx} = {p.train_steps * 4 * p.train_ctx} training tokens"),
        "Accuracy Preservation": ("; ".join(f"{k}: {quality(rows[k])}" for k in ptq), f"qat: {quality(qat)}"),
    }
    table = [["Feature", "Post-Training Quantisation (PTQ)", "Quantisation-Aware Training (QAT)"]]
    for feature, (a, b) in REPORT_53.items():
        if feature in measured:
            a, b = f"{a} **Measured:** {measured[feature][0]}", f"{b} **Measured:** {measured[feature][1]}"
        table.append([feature, a, b])
    return _cells(table)


def table_76(results: Results) -> str:
    float_row = results.rows.get("float")
    names = [n for n, cell in REPORT_76.items() if cell[0] in results.rows]
    if not names:
        return "(not measured)"
    table = [["Feature", *names]]
    labels = ["Primary Mechanism", "Quantisation Target", "Inference Hardware", "Calibration Needed?", "Key Strength"]
    for i, label in enumerate(labels):
        cells = []
        for name in names:
            key, *text = REPORT_76[name]
            row = results.rows[key]
            cell = text[i]
            if label == "Quantisation Target":
                cell += f" **Measured:** {next(iter(row['scores'].values()))['bits_per_weight']:.2f} bits/weight ({key})"
            elif label == "Inference Hardware":
                cell += f" **Measured (this CPU):** {speed(row, float_row)}"
            elif label == "Calibration Needed?":
                cell += f" **Measured:** {row['cost_seconds']:.0f} s to quantise"
            elif label == "Key Strength":
                cell += f" **Measured:** {quality(row)}"
            cells.append(cell)
        table.append([label, *cells])
    return _cells(table)


def table_83(results: Results) -> str:
    table = [["Model", "Baseline", "Method", "Benchmark", "Baseline Score", "Quantised Score", "Recovery"]]
    for key, row in results.rows.items():
        if key == "float":
            continue
        for corpus, s in row["scores"].items():
            table.append([Path(results.model).name, "float32 source", key, f"{corpus} perplexity", f"{s['reference_perplexity']:.3f}",
                          f"{s['perplexity']:.3f}", f"{s['reference_perplexity'] / s['perplexity']:.1%}"])
        first = next(iter(row["scores"].items()))
        if first[1]["top1_percent"] is not None:
            table.append([Path(results.model).name, "float32 source", key, f"{first[0]} top-1 agreement", "100.0", f"{first[1]['top1_percent']:.1f}",
                          f"{first[1]['top1_percent'] / 100:.1%}"])
    return _cells(table)


def best_of(results: Results, family: str) -> tuple[str, dict] | None:
    """The family's measured row with the lowest Δppl on the first corpus."""
    rows = [(k, r) for k, r in results.rows.items() if r["family"] == family]
    return min(rows, key=lambda kr: _delta(next(iter(kr[1]["scores"].values()))), default=None)


def table_93(results: Results) -> str:
    float_row = results.rows.get("float")
    families = [f for f in REPORT_93 if best_of(results, f) is not None]
    if not families:
        return "(not measured)"
    table = [["Feature", *[f.capitalize() if f != "PTQ" else "Quantisation (PTQ)" for f in families]]]
    labels = ["Primary Goal", "Training Cost", "Hardware Speedup", "Memory Reduction", "LLM Suitability"]
    for i, label in enumerate(labels):
        cells = []
        for family in families:
            key, row = best_of(results, family)
            cell = REPORT_93[family][i]
            if label == "Training Cost":
                cell += f" **Measured:** {row['cost_seconds']:.0f} s ({key})"
            elif label == "Hardware Speedup":
                cell += f" **Measured:** {speed(row, float_row)} ({key})"
            elif label == "Memory Reduction" and float_row is not None:
                cell += f" **Measured:** {_bytes(row) / 1e6:.1f} MB, {_bytes(float_row) / _bytes(row):.2f}x smaller than float ({key})"
            elif label == "LLM Suitability":
                cell += f" **Measured:** {quality(row)} ({key})"
            cells.append(cell)
        table.append([label, *cells])
    return _cells(table) + "\n\nEach measured cell is the family's best row on the first corpus (named in brackets); the table of every row follows."


def peak(row: dict) -> str:
    """A row's peak RSS in MB: its steps' own peaks, or "≤ N" for rows measured before
    `lowbit.reports.measured` (the kernel's count then, which a forked step inherits from the
    larger report process: a bound, not the step's peak)."""
    if row["peak_rss_mb"] is None:
        return "-"
    return str(row["peak_rss_mb"]) if row.get("peak_rss_own") else f"≤ {row['peak_rss_mb']}"


def every_row(results: Results) -> str:
    float_row = results.rows.get("float")
    table = [["recipe", "family", "bits/w", "MB", *[f"{c} Δppl" for c in results.protocol.corpora], "KLD", "top-1", "cost s", "peak RSS MB",
              "decode", "commands"]]
    order = [r.key for r in RECIPES]
    for key in sorted(results.rows, key=lambda k: order.index(k) if k in order else len(order)):
        row = results.rows[key]
        first = next(iter(row["scores"].values()))
        table.append([key, row["family"], f"{first['bits_per_weight']:.2f}", f"{first['model_bytes'] / 1e6:.1f}",
                      *[f"{_delta(s):+.1%}" for s in row["scores"].values()],
                      "-" if first["kld"] is None else f"{first['kld']:.3f}", "-" if first["top1_percent"] is None else f"{first['top1_percent']:.1f}",
                      f"{row['cost_seconds']:.0f}", peak(row), speed(row, float_row),
                      "<br>".join(f"`{s['command']}`" for s in row["steps"]) or "(source)"])
    return _cells(table)


def plots(results: Results, out: Path) -> dict[str, Path]:
    """The Pareto front (perplexity against bytes), the 4-bit cliff and quality against cost, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowbit.outputs import save_figure

    name = Path(results.model).name
    corpus = results.protocol.corpora[0]
    made = {}
    rows = results.rows
    colours = {"float": "black", "PTQ": "tab:blue", "QAT": "tab:purple", "unstructured pruning": "tab:orange",
               "structured pruning": "tab:red", "distillation": "tab:green"}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, row in rows.items():
        s = row["scores"][corpus]
        ax.scatter(s["model_bytes"] / 1e6, s["perplexity"], color=colours[row["family"]], label=row["family"])
        ax.annotate(key, (s["model_bytes"] / 1e6, s["perplexity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_xlabel("model size (MB, every tensor)")
    ax.set_ylabel(f"{corpus} perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{name}: quality against memory, every method")
    made["pareto"] = save_figure(fig, out / f"{name}_pareto.png")
    plt.close(fig)

    cliff = [(k, rows[k]) for k in ("gptq W4 g128", "gptq W3 g128", "gptq W2 g64", "rtn W4 g128") if k in rows]
    if cliff:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, row in cliff:
            s = row["scores"][corpus]
            ax.scatter(s["bits_per_weight"], _delta(s) * 100, color="tab:blue" if k.startswith("gptq") else "tab:gray")
            ax.annotate(k, (s["bits_per_weight"], _delta(s) * 100), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel(f"{corpus} Δ perplexity (%)")
        ax.set_yscale("symlog")
        ax.set_title(f"{name}: the cliff below 4 bits")
        made["cliff"] = save_figure(fig, out / f"{name}_cliff.png")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, row in rows.items():
        if key == "float":
            continue
        s = row["scores"][corpus]
        ax.scatter(max(row["cost_seconds"], 1), s["perplexity"], color=colours[row["family"]])
        ax.annotate(key, (max(row["cost_seconds"], 1), s["perplexity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("seconds to make (quantise, prune, train)")
    ax.set_ylabel(f"{corpus} perplexity")
    ax.set_title(f"{name}: quality against cost")
    made["cost"] = save_figure(fig, out / f"{name}_cost.png")
    plt.close(fig)
    return made


def markdown(all_results: list[Results], images: dict[str, dict[str, Path]], command: str) -> str:
    """The whole report as Markdown; image links relative to the report's directory."""
    parts = ["# lowbit report: the report's comparison tables, measured", "",
             f"Produced by `{command}`. Every row is a real lowbit process on this machine; the protocol and the commands are below.", ""]
    for results in all_results:
        p = results.protocol
        name = Path(results.model).name
        parts += [f"## {name}", "",
                  f"Calibration {p.calib_samples} x {p.calib_ctx} tokens of {p.calib_corpus}'s first half; training {p.train_steps} steps of "
                  f"4 x {p.train_ctx} tokens; scored on {p.windows} x {p.ctx} held-out tokens of "
                  f"{', '.join(p.corpora)} against the float model; decode {p.decode_tokens} tokens after a short prompt, "
                  f"roofline at this machine's measured read bandwidth. A packaged model's float32 source is its GGUF file "
                  f"dequantised (docs/models.md).", "",
                  "### Table 5.3: PTQ against QAT", "", table_53(results), "",
                  "### Table 7.6: the algorithms", "", table_76(results), "",
                  "### Table 8.3: performance and recovery", "", table_83(results), "",
                  "### Table 9.3: quantisation against pruning and distillation", "", table_93(results), "",
                  "### Every row", "", every_row(results), ""]
        if any(peak(row).startswith("≤") for row in results.rows.values()):
            parts += ["Peak RSS is each step's own high-water mark; \"≤ N\" marks rows cached before it was: the kernel's count then, "
                      "which a forked step inherits from the larger report process, a bound rather than the step's peak.", ""]
        for label, path in images.get(results.model, {}).items():
            parts += [f"![{name} {label}]({path.name})", ""]
    return "\n".join(parts)


def to_html(text: str, out: Path) -> str:
    """A self-contained HTML page of the Markdown report: tables as tables, images inline."""
    body, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = [[_inline(c.strip().replace("\\|", "|")) for c in r.strip().strip("|").split(" | ")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
            body.append(f"<table><tr>{head}</tr>{rest}</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            target = line[line.index("(") + 1 : -1]
            data = base64.b64encode((out / target).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(target)}" src="data:image/png;base64,{data}">')
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush()
    style = "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:13px}" \
            "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>lowbit report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold**, `code` and <br> as HTML."""
    out = html.escape(text).replace("&lt;br&gt;", "<br>")
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)
