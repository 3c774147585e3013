"""Assembling panels into one self-contained HTML page (Plotly's JavaScript embedded)."""
from __future__ import annotations

import html
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import plotly.io as pio
from plotly.offline import get_plotlyjs

from lora_tune import __version__
from lora_tune.report import frame
from lora_tune.report.definitions import ReportDefinition, definition_for
from lora_tune.report.panels import PANELS
from lora_tune.safe_files import write_output

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#222}
header{background:#20232a;color:#fff;padding:16px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#bbb;font-size:13px}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:16px;padding:16px 28px}
section.panel{background:#fff;border:1px solid #e3e5e8;border-radius:6px;padding:8px 14px;min-width:0}
section.wide{grid-column:1/-1}section.panel h2{font-size:16px;margin:6px 0 8px}
.notice{background:#fff4d6;border:1px solid #e8c65a;padding:10px 14px;border-radius:6px;grid-column:1/-1}
table.summary th{text-align:left;padding:3px 16px 3px 0;color:#555;font-weight:600;vertical-align:top}
table.summary td{padding:3px 0}
.table-wrap{overflow:auto;max-height:520px}table.trials{border-collapse:collapse;font-size:12px}
table.trials th{position:sticky;top:0;background:#eef0f3;cursor:pointer;padding:4px 8px;white-space:nowrap}
table.trials td{padding:3px 8px;border-top:1px solid #eee;white-space:nowrap}
table.trials th.asc::after{content:" \\25B2"}table.trials th.desc::after{content:" \\25BC"}
.hint{font-size:12px;color:#777;margin:0 0 6px}
"""

# Sort a table by the clicked column: numbers numerically, the rest as text, empty cells last.
_SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function(table){
  var heads=table.querySelectorAll("thead th");
  heads.forEach(function(th,col){th.addEventListener("click",function(){
    var asc=!th.classList.contains("asc");
    heads.forEach(function(h){h.classList.remove("asc","desc");});
    th.classList.add(asc?"asc":"desc");
    var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
    function key(r){var t=r.cells[col].textContent.trim();if(t==="")return null;
      var n=Number(t.replace(/,/g,""));return isNaN(n)?t.toLowerCase():n;}
    rows.sort(function(a,b){var x=key(a),y=key(b);
      if(x===null)return y===null?0:1;if(y===null)return -1;
      if(typeof x!==typeof y){x=String(x);y=String(y);}
      return (x<y?-1:x>y?1:0)*(asc?1:-1);});
    rows.forEach(function(r){body.appendChild(r);});
  });});
});
"""

_WIDE = {"summary", "table", "parallel", "timeline", "curves"}


def render_panel(study: optuna.Study, panel_name: str, title: str, options: dict[str, Any]) -> Any:
    """Data then drawing for one panel: a Plotly figure or an HTML fragment."""
    panel = PANELS[panel_name]
    return panel.draw(panel.data(study, **options), title)


def build_report(study: optuna.Study, definition: ReportDefinition | None = None,
                 *, storage_display: str | None = None) -> str:
    """The whole report as one HTML string."""
    definition = definition or definition_for(study)
    sections = []
    if not frame.complete_trials(study):
        n = len(study.get_trials(deepcopy=False))
        sections.append(f'<div class="notice" id="no-complete">Study {html.escape(study.study_name)!s} has '
                        f"no complete trial yet ({n} trial(s) in total); panels show what exists.</div>")
    for i, spec in enumerate(definition.panels):
        out = render_panel(study, spec.panel, spec.title, spec.options)
        pid = f"panel-{i}-{spec.panel}"
        wide = " wide" if spec.panel in _WIDE else ""
        if PANELS[spec.panel].html:
            inner = f'<div class="panel-body" id="{pid}-body">{out}</div>'
        else:
            top = out.layout.margin.t if out.layout.margin.t is not None else 50
            out.update_layout(title=None, margin={"t": 30 if top <= 50 else top})  # the heading names it
            inner = pio.to_html(out, full_html=False, include_plotlyjs=False, div_id=f"{pid}-plot",
                                config={"displaylogo": False, "responsive": True})
            inner = f'<div class="plot" data-panel="{spec.panel}">{inner}</div>'
        sections.append(f'<section class="panel{wide}" id="{pid}" data-panel="{spec.panel}">'
                        f"<h2>{html.escape(spec.title)}</h2>{inner}</section>")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sub = f"study {study.study_name}"
    if storage_display:
        sub += f" · {storage_display}"
    sub += f" · {len(study.get_trials(deepcopy=False))} trials · generated {when} by lora-tune {__version__}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(definition.title)}: {html.escape(study.study_name)}</title>"
        f"<style>{_CSS}</style><script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
        f"<header><h1>{html.escape(definition.title)}</h1><p>{html.escape(sub)}</p></header>"
        f"<main>{''.join(sections)}</main><script>{_SORT_JS}</script></body></html>\n"
    )


def write_report(study: optuna.Study, path: str | os.PathLike, definition: ReportDefinition | None = None,
                 *, storage_display: str | None = None) -> Path:
    """Render the report and write it to ``path`` (whole or not at all)."""
    text = build_report(study, definition, storage_display=storage_display)
    return write_output(path, text)[0]
