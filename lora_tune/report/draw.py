"""Panel drawing: plain data (from ``data.py``) -> a Plotly figure or an HTML fragment."""
from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go

BITS_COLOURS = {"none": "#1f77b4", "8": "#ff7f0e", "4": "#2ca02c"}
STATE_COLOURS = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e", "FAIL": "#d62728",
                 "RUNNING": "#9467bd", "WAITING": "#7f7f7f"}
EMPTY = "no complete trials yet"


def _layout(fig: go.Figure, title: str, **kwargs: Any) -> go.Figure:
    layout = {"title": title, "template": "plotly_white", "height": 420,
              "margin": {"l": 60, "r": 30, "t": 50, "b": 50}}
    fig.update_layout(**{**layout, **kwargs})
    return fig


def _empty(fig: go.Figure, message: str = EMPTY) -> go.Figure:
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 16, "color": "#888"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# -- HTML panels -----------------------------------------------------------------------------------
def draw_summary(d: dict[str, Any], title: str) -> str:
    counts = d["counts"]
    done = f"{d['done']}/{d['budget']}" if d["budget"] else f"{d['done']}"
    rows = [("study", d["study"]), ("trials", f"{done} finished ({d['n_trials']} stored)")]
    rows += [(s.lower(), counts[s]) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING") if counts.get(s)]
    best = d["best"]
    if best is None:
        rows.append(("best trial", f"none: {EMPTY}"))
    else:
        rows.append(("best trial", f"#{best['number']}" + (" (the baseline)" if best["is_baseline"] else "")))
        rows.append((f"best {d['metric']} ({d['direction']})", _fmt(best["value"])))
        if d["multi_objective"]:
            rows.append(("best values", ", ".join(_fmt(v) for v in best["values"])))
        rows.append(("parameters", ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(best["params"].items()))))
        if best.get("trainable_params") is not None:
            rows.append(("trainable parameters", f"{best['trainable_params']:,}"))
    base = d["baseline"]
    if base is None:
        rows.append(("baseline", "no baseline trial"))
    elif base["value"] is None:
        rows.append(("baseline", f"#{base['number']} ({base['state'].lower()}, no value)"))
    else:
        rows.append(("baseline", f"#{base['number']}: {d['metric']} = {_fmt(base['value'])}"))
    if d["gain"] is not None:
        rel = f" ({d['gain_relative']:+.1%})" if d["gain_relative"] is not None else ""
        rows.append(("gain over baseline", f"{d['gain']:+.4g}{rel}"))
    if d["multi_objective"]:
        rows.append(("Pareto-optimal trials", ", ".join(f"#{n}" for n in d["pareto_numbers"]) or "none"))
    rows.append(("compute", d["compute"]["line"]))
    if d.get("time", {}).get("line"):
        rows.append(("time", d["time"]["line"]))
    p = d["pruning"]
    if p["trials_counted"]:
        rows.append(("training steps run", f"{p['steps_run']:,} (unpruned: {p['steps_unpruned']:,})"))
        rows.append(("compute saved by pruning",
                     f"{p['steps_saved']:,} steps ({p['fraction_saved']:.1%}), "
                     f"≈ {p['seconds_saved_estimate']:.1f} s of training"))
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def draw_table(d: dict[str, Any], title: str) -> str:
    df = d["frame"].copy()
    for col in ("datetime_start", "datetime_complete"):
        if col in df:
            df[col] = df[col].map(lambda v: "" if v is None or v != v else v.strftime("%Y-%m-%d %H:%M:%S"))
    table = df.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.6g}",
                       classes="trials sortable", border=0, escape=True)
    hint = '<p class="hint">Click a column header to sort.</p>'
    return hint + f'<div class="table-wrap">{table}</div>'


# -- Plotly panels ---------------------------------------------------------------------------------
def draw_history(d: dict[str, Any], title: str) -> go.Figure:
    fig = _layout(go.Figure(), title, xaxis_title="trial", yaxis_title=d["metric"])
    if not d["numbers"]:
        return _empty(fig)
    text = ["baseline" if b else "" for b in d["is_baseline"]]
    fig.add_trace(go.Scatter(x=d["numbers"], y=d["values"], mode="markers", name=d["metric"],
                             text=text, marker={"size": 8}))
    fig.add_trace(go.Scatter(x=d["numbers"], y=d["best_so_far"], mode="lines", name="best so far",
                             line={"shape": "hv", "color": "#d62728"}))
    base = [(n, v) for n, v, b in zip(d["numbers"], d["values"], d["is_baseline"]) if b]
    if base:
        fig.add_trace(go.Scatter(x=[base[0][0]], y=[base[0][1]], mode="markers", name="baseline",
                                 marker={"symbol": "star", "size": 16, "color": "#000"}))
    return fig


def draw_importances(d: dict[str, Any], title: str) -> go.Figure:
    fig = _layout(go.Figure(), f"{title} ({d['evaluator'].replace('ImportanceEvaluator', '')})",
                  xaxis_title="importance")
    imp = d["importances"]
    if not imp:
        return _empty(fig, d["note"] or "no importances")
    names = list(imp)[::-1]
    fig.add_trace(go.Bar(x=[imp[n] for n in names], y=names, orientation="h",
                         text=[f"{imp[n]:.2f}" for n in names], textposition="auto"))
    return fig


def draw_rank_alpha(d: dict[str, Any], title: str) -> go.Figure:
    fig = _layout(go.Figure(), title, xaxis_title="rank", yaxis_title=d["alpha_label"])
    if not d["ranks"]:
        return _empty(fig)
    custom = [[(n if n is not None else -1, c) for n, c in zip(rn, rc)]
              for rn, rc in zip(d["trial_numbers"], d["counts"])]
    fig.add_trace(go.Heatmap(
        x=[str(r) for r in d["ranks"]], y=[_fmt(a) for a in d["alphas"]], z=d["z"], customdata=custom,
        colorscale="Viridis" if d["maximize"] else "Viridis_r", colorbar={"title": d["metric"]},
        texttemplate="%{z:.3g}", hoverongaps=False,
        hovertemplate="rank %{x}, alpha %{y}<br>best %{z:.4g} (trial #%{customdata[0]}, "
                      "%{customdata[1]} trials)<extra></extra>"))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def draw_layers(d: Any, title: str) -> go.Figure:
    """``d``: :class:`lora_tune.report.layer_ranges.LayersPanel` -- a box of the metric per layer range."""
    fig = _layout(go.Figure(), title, xaxis_title="layers LoRA was on", yaxis_title=d.metric, showlegend=False)
    if not d.ranges:
        return _empty(fig)
    for r in d.ranges:
        fig.add_trace(go.Box(y=[p.value for p in r.points], name=f"{r.label} (n={r.n})", boxpoints="all",
                             jitter=0.4, pointpos=0,
                             text=[f"trial #{p.number}, targets {p.targets}" + (" (baseline)" if p.is_baseline else "")
                                   for p in r.points]))
    return fig


def draw_presets(d: dict[str, Any], title: str) -> go.Figure:
    fig = _layout(go.Figure(), title, xaxis_title="target preset", yaxis_title=d["metric"], showlegend=False)
    if not d["presets"]:
        return _empty(fig)
    for p in d["presets"]:
        fig.add_trace(go.Box(y=p["values"], name=f"{p['preset']} (n={p['n']})", boxpoints="all",
                             jitter=0.4, pointpos=0, text=[f"trial #{n}" for n in p["numbers"]]))
    return fig


def draw_cost(d: dict[str, Any], title: str) -> go.Figure:
    mib = d["x"].endswith("_bytes")
    label = d["x_label"].replace("(bytes)", "(MiB)") if mib else d["x_label"]
    legend = "quant bits, LoRA / DoRA" if d.get("dora_varies") else "quant bits"
    time_line = (d.get("time") or {}).get("line")  # what a trial costs besides its training
    if time_line:
        title = f"{title}<br><sup>{html.escape(time_line)}</sup>"
    fig = _layout(go.Figure(), title, xaxis_title=label, yaxis_title=d["metric"], legend_title=legend)
    if time_line:
        fig.update_layout(margin={"t": 70})
    if not d["points"]:
        return _empty(fig, "no complete trial recorded " + d["x"])

    def xs(pts: list[dict[str, Any]]) -> list[float]:
        return [p["x"] / 2**20 if mib else p["x"] for p in pts]

    for series in d["series"]:  # colour: quant bits; symbol: diamond for DoRA, star for the baseline
        pts = [p for p in d["points"] if p["series"] == series]
        fig.add_trace(go.Scatter(
            x=xs(pts), y=[p["y"] for p in pts], mode="markers", name=series,
            marker={"size": 9, "color": BITS_COLOURS.get(pts[0]["quant_bits"]),
                    "symbol": ["star" if p["is_baseline"] else "diamond" if p["use_dora"] else "circle" for p in pts],
                    "line": {"width": [2 if p["pareto"] else 0 for p in pts], "color": "#000"}},
            text=[f"trial #{p['number']} {p['preset']} r={p['rank']}" for p in pts]))
    front = sorted((p for p in d["points"] if p["pareto"]), key=lambda p: p["x"])
    fig.add_trace(go.Scatter(x=xs(front), y=[p["y"] for p in front], mode="lines",
                             name="Pareto front", line={"shape": "hv", "dash": "dash", "color": "#000"}))
    if all(p["x"] > 0 for p in d["points"]):  # a log axis would drop zeros (e.g. no memory growth)
        fig.update_xaxes(type="log")
    return fig


def draw_curves(d: dict[str, Any], title: str) -> go.Figure:
    fig = _layout(go.Figure(), f"{title} ({d['n_pruned']} pruned)", xaxis_title="evaluation (report step)",
                  yaxis_title=d["metric"])
    if not d["curves"]:
        return _empty(fig, "no intermediate values reported yet")
    shown: set[str] = set()
    for c in d["curves"]:
        state = "baseline" if c["is_baseline"] else c["state"]
        colour = "#000" if c["is_baseline"] else STATE_COLOURS.get(c["state"], "#7f7f7f")
        fig.add_trace(go.Scatter(
            x=c["steps"], y=c["values"], mode="lines+markers", legendgroup=state,
            name=f"pruned ({d['n_pruned']})" if state == "PRUNED" else state.lower(),
            showlegend=state not in shown, opacity=0.9 if c["state"] != "PRUNED" else 0.6,
            line={"color": colour, "dash": "dot" if c["state"] == "PRUNED" else "solid", "width": 1.5},
            marker={"size": 4, "symbol": "x" if c["state"] == "PRUNED" else "circle"},
            text=f"trial #{c['number']} ({c['state'].lower()})"))
        shown.add(state)
    return fig


def draw_parallel(d: dict[str, Any], title: str) -> go.Figure:
    fig = _layout(go.Figure(), title)
    if not d["numbers"]:
        return _empty(fig)
    dims = []
    for dim in d["dimensions"]:
        item = {"label": dim["label"], "values": dim["values"]}
        if "tickvals" in dim:
            item.update(tickvals=dim["tickvals"], ticktext=dim["ticktext"])
        dims.append(item)
    fig.add_trace(go.Parcoords(dimensions=dims, line={
        "color": d["color"], "colorscale": "Viridis", "reversescale": not d["maximize"], "showscale": True,
        "colorbar": {"title": d["metric"]}}))
    fig.update_layout(margin={"l": 80, "r": 80, "t": 80, "b": 40})
    return fig


def draw_timeline(d: dict[str, Any], title: str) -> go.Figure:
    fig = _layout(go.Figure(), title, xaxis_title="time", yaxis_title="worker",
                  height=max(260, 60 + 45 * len(d["workers"])))
    if not d["bars"]:
        return _empty(fig, "no trials started yet")
    for state in STATE_COLOURS:
        bars = [b for b in d["bars"] if b["state"] == state]
        if not bars:
            continue
        fig.add_trace(go.Bar(
            base=[b["start"].isoformat() for b in bars], x=[b["seconds"] * 1000.0 for b in bars],
            y=[b["worker"] for b in bars], orientation="h", name=state.lower(),
            marker={"color": STATE_COLOURS[state], "line": {"width": 1, "color": "#fff"}},
            text=[f"#{b['number']}" for b in bars], textposition="inside",
            hovertemplate="trial %{text}: %{customdata:.1f} s<extra></extra>",
            customdata=[b["seconds"] for b in bars]))
    fig.update_xaxes(type="date")
    fig.update_yaxes(type="category", categoryorder="category descending")
    fig.update_layout(barmode="overlay")
    return fig


def draw_pareto(d: dict[str, Any], title: str) -> go.Figure:
    names = d["names"]
    fig = _layout(go.Figure(), title, xaxis_title=names[0], yaxis_title=names[-1])
    if not d["points"]:
        return _empty(fig, d.get("note") or EMPTY)
    for on_front, label, colour in ((False, "dominated", "#aaa"), (True, "Pareto front", "#d62728")):
        pts = [p for p in d["points"] if p["pareto"] == on_front]
        fig.add_trace(go.Scatter(x=[p["x"] for p in pts], y=[p["y"] for p in pts], mode="markers",
                                 name=label, marker={"size": 9, "color": colour},
                                 text=[f"trial #{p['number']} bits={p['quant_bits']}" for p in pts]))
    return fig
