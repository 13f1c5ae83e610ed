"""Small HTML building blocks of the static report: page shell, tables, escaping.

Everything is inline (CSS and a few lines of JS), so a report folder works offline
and can be zipped and moved. Every page sets ``data-images-ok`` on ``<body>`` once
loaded (``true`` when each ``<img>`` decoded), which the browser tests read back.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#283848;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:1.4em}header a{color:#cde}
main{padding:12px 24px;max-width:1400px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 16px;margin:14px 0}
h2{font-size:1.2em;margin:6px 0 10px}h3{font-size:1.05em;margin:12px 0 6px}
table{border-collapse:collapse;font-size:.86em;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th:after{content:' \\2195';color:#999}
.scroll{max-height:520px;overflow:auto;display:inline-block}
pre{background:#f4f4f4;padding:8px;overflow:auto;font-size:.82em;max-height:480px}
img{max-width:100%;border:1px solid #eee}.muted{color:#777}
.grid{display:flex;flex-wrap:wrap;gap:16px}.grid>div{flex:1 1 420px;min-width:0}
input.filter{margin:4px 0;padding:3px 6px;width:260px}
"""

JS = """
function miSort(th){var t=th.closest('table'),b=t.tBodies[0],c=th.cellIndex,
a=th.dataset.dir!=='asc';th.dataset.dir=a?'asc':'desc';
var r=Array.prototype.slice.call(b.rows);r.sort(function(p,q){
var x=p.cells[c].dataset.v||p.cells[c].textContent,y=q.cells[c].dataset.v||q.cells[c].textContent,
u=parseFloat(x),w=parseFloat(y),d=(!isNaN(u)&&!isNaN(w))?u-w:x.localeCompare(y);return a?d:-d;});
r.forEach(function(e){b.appendChild(e);});}
function miFilter(inp){var t=document.getElementById(inp.dataset.table),s=inp.value.toLowerCase();
Array.prototype.forEach.call(t.tBodies[0].rows,function(r){
r.style.display=r.textContent.toLowerCase().indexOf(s)>=0?'':'none';});}
document.addEventListener('DOMContentLoaded',function(){
document.querySelectorAll('table.sortable th').forEach(function(th){
th.addEventListener('click',function(){miSort(th);});});});
window.addEventListener('load',function(){var i=Array.prototype.slice.call(document.images),
bad=i.filter(function(m){return !(m.complete&&m.naturalWidth>0);});
document.body.dataset.images=i.length;document.body.dataset.imagesOk=bad.length?'false':'true';
document.body.dataset.imagesBroken=bad.map(function(m){return m.getAttribute('src');}).join(' ');});
"""


def esc(value: Any) -> str:
    """HTML-escaped text of a value."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A compact display form of a number (or the value as text)."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def cell(value: Any, link: str | None = None) -> str:
    """A ``<td>`` with a sort key for numbers, optionally a link."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    text = esc(fmt(value))
    if link:
        text = f'<a href="{esc(link)}">{text}</a>'
    if numeric:
        return f'<td class="n" data-v="{esc(value)}">{text}</td>'
    return f"<td>{text}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, sortable: bool = False,
          table_id: str | None = None, links: Mapping[int, Sequence[str | None]] | None = None,
          scroll: bool = False) -> str:
    """An HTML table; ``links`` maps a column to one href (or None) per row."""
    attrs = ' class="sortable"' if sortable else ""
    if table_id:
        attrs += f' id="{esc(table_id)}"'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r, row in enumerate(rows):
        cells = [cell(v, links[c][r] if links and c in links else None)
                 for c, v in enumerate(row)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    out = f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{out}</div>' if scroll else out


def kv_table(items: Mapping[str, Any]) -> str:
    """Two-column key/value table (nested values as compact JSON)."""
    rows = [(k, v if isinstance(v, (int, float, str)) or v is None
             else json.dumps(v, default=str)) for k, v in items.items()]
    return table(["key", "value"], rows)


def filter_box(table_id: str) -> str:
    """A text box filtering the rows of table ``table_id``."""
    return (f'<input class="filter" placeholder="filter rows..." data-table="{esc(table_id)}" '
            'oninput="miFilter(this)">')


def page(title: str, body: str, *, nav: str = "") -> str:
    """A complete standalone HTML page."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style><script>{JS}</script></head>\n"
            f"<body><header><h1>{esc(title)}</h1>{nav}</header><main>\n{body}\n</main></body></html>\n")


def section(title: str, body: str, anchor: str | None = None) -> str:
    """A titled box."""
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{esc(title)}</h2>\n{body}\n</section>"
