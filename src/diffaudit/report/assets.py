"""The page's inline stylesheet (screen and print) and its one optional script.

The script only enhances: clicking a column header of a ``table.sortable`` sorts it. Every number and figure
is in the HTML itself, so the page reads the same with JavaScript off, and the Content-Security-Policy allows
this one script by hash and nothing else.
"""

from __future__ import annotations

import base64
import hashlib

CSS = """
:root{--risk:#b42318;--clear:#067647;--unclear:#b54708;--none:#667085;--line:#d0d5dd}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1b1b1b;line-height:1.45}
nav.toc{position:fixed;top:0;left:0;bottom:0;width:230px;overflow-y:auto;padding:1rem .8rem;background:#f8f9fb;
border-right:1px solid var(--line);font-size:.85rem}
nav.toc h2{font-size:.8rem;text-transform:uppercase;letter-spacing:.05em;color:#555;margin:1rem 0 .3rem;border:0}
nav.toc ul{list-style:none;margin:0;padding:0}nav.toc li{margin:.15rem 0}
nav.toc ul ul{padding-left:.8rem;font-size:.8rem}
nav.toc a{color:#1d4ed8;text-decoration:none}nav.toc a:hover{text-decoration:underline}
main{margin-left:230px;padding:1rem 2rem 3rem;max-width:1180px}
h1{font-size:1.5rem;margin:.3rem 0}
h2{font-size:1.25rem;border-bottom:1px solid var(--line);padding-bottom:.2rem;margin-top:2.2rem}
h3{font-size:1rem;margin:1.2rem 0 .4rem}
.cards{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:.8rem;margin:.8rem 0}
.card{border:1px solid var(--line);border-left:6px solid var(--none);border-radius:6px;padding:.6rem .8rem;
background:#fff;break-inside:avoid}
.card.risk{border-left-color:var(--risk)}.card.clear{border-left-color:var(--clear)}
.card.unclear{border-left-color:var(--unclear)}
.card h3{margin:0 0 .3rem;font-size:1rem;display:flex;justify-content:space-between;gap:.5rem}
.badge{font-size:.75rem;font-weight:600;padding:.05rem .45rem;border-radius:999px;color:#fff;background:var(--none);
white-space:nowrap}
.risk .badge{background:var(--risk)}.clear .badge{background:var(--clear)}.unclear .badge{background:var(--unclear)}
.verdict{margin:.2rem 0;font-weight:600}.number{margin:.2rem 0;font-variant-numeric:tabular-nums}
.comparison,.notes{margin:.2rem 0;color:#444;font-size:.85rem}.notes{padding-left:1.1rem}
.card .links{font-size:.82rem;margin:.3rem 0 0}
table{border-collapse:collapse;margin:.5rem 0;font-size:.82rem;font-variant-numeric:tabular-nums}
td,th{border:1px solid #e4e7ec;padding:.2rem .5rem;text-align:left;vertical-align:top}
thead th,table.keys th{background:#f4f5f7}caption{text-align:left;font-weight:600;padding:.2rem 0}
table.sortable thead th{cursor:pointer}table.sortable thead th[aria-sort]::after{content:" \\2195";color:#999}
.findings li{margin:.25rem 0}.figs{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
figure{margin:0;max-width:100%}figure.wide{flex-basis:100%}
figure img{max-width:100%;image-rendering:pixelated;border:1px solid #e4e7ec}
figcaption{font-size:.78rem;color:#555;max-width:60ch}
pre{background:#f7f7f7;padding:.6rem;overflow-x:auto;font-size:.75rem;white-space:pre-wrap;word-break:break-all}
.meta{color:#555;font-size:.82rem;overflow-wrap:anywhere}.warn{color:#9a3412}
details.raw{margin:.4rem 0;border:1px solid #eaecf0;border-radius:4px;padding:.2rem .6rem}
details.raw summary{cursor:pointer;color:#344054;font-size:.88rem}
.scroll{overflow-x:auto;max-height:32rem}
section.run{border-top:2px solid #eaecf0;margin-top:2rem}
@media (max-width:900px){nav.toc{position:static;width:auto;border-right:0;border-bottom:1px solid var(--line)}
main{margin-left:0}.cards{grid-template-columns:1fr}}
@media print{
nav.toc,details.raw,.noprint{display:none!important}
main{margin:0;padding:0;max-width:none}body{font-size:10.5pt}
a{color:inherit;text-decoration:none}
.cards{grid-template-columns:repeat(2,minmax(0,1fr))}
.card,figure,table{break-inside:avoid}h2,h3{break-after:avoid}
section.run{break-before:page;border:0}
.badge{-webkit-print-color-adjust:exact;print-color-adjust:exact}
.card{-webkit-print-color-adjust:exact;print-color-adjust:exact}
figure img{max-height:9cm}
@page{margin:1.5cm}
}
"""

# Sort a table.sortable by the clicked column: numbers by data-v, text otherwise; a second click reverses.
JS = """
document.querySelectorAll('table.sortable').forEach(function (tbl) {
  var heads = tbl.querySelectorAll('thead th');
  heads.forEach(function (th, col) {
    th.setAttribute('aria-sort', 'none');
    th.title = 'Sort by this column';
    th.addEventListener('click', function () {
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      heads.forEach(function (h) { h.setAttribute('aria-sort', 'none'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var body = tbl.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col];
        if (!x || !y) { return 0; }
        var vx = x.getAttribute('data-v'), vy = y.getAttribute('data-v');
        var r = (vx !== null && vy !== null) ? parseFloat(vx) - parseFloat(vy)
          : x.textContent.localeCompare(y.textContent, undefined, {numeric: true});
        return asc ? r : -r;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def script_hash(script: str = JS) -> str:
    """The CSP source for ``script`` (``'sha256-...'``), so the page runs that script and no other."""
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def csp(script: str = JS) -> str:
    """No fetches of any kind; images only from data URIs; inline styles; the one hashed script."""
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src {script_hash(script)}; base-uri 'none'; form-action 'none'"
    )
