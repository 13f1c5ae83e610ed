"""The HTML report of a small run, opened in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs a headless chromium: apt-get install -y chromium (make init does it as root)")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000")


def browse(page: Path, profile: Path, *args: str) -> str:
    """Run chromium on ``page``; returns its stdout (the DOM with ``--dump-dom``)."""
    result = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args,
                             page.resolve().as_uri()], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def body_attrs(dom: str) -> dict[str, str]:
    """The ``data-*`` attributes the report's script set on ``<body>`` after loading."""
    tag = re.search(r"<body([^>]*)>", dom)
    assert tag, dom[:500]
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', tag.group(1)))


@pytest.fixture(scope="module")
def report(small_run: Path) -> Path:
    return small_run / "report"


def test_index_loads_with_its_images(report, tmp_path):
    dom = browse(report / "index.html", tmp_path / "profile", "--dump-dom")
    attrs = body_attrs(dom)
    assert attrs["images-ok"] == "true", attrs
    assert int(attrs["images"]) >= 1  # the density histogram at least
    assert "small test run" in dom and "Overview" in dom and "holdout FVU" in dom
    assert re.search(r'href="latents/resid_post\.1/\d+\.html"', dom)


def test_latent_page_has_piano_roll_midi_and_text(report, tmp_path):
    import mido

    index = (report / "index.html").read_text()
    pages = re.findall(r'href="(latents/resid_post\.1/\d+\.html)"', index)
    rendered = [p for p in pages if 'src="latent_' in (report / p).read_text()]
    assert rendered, "no latent page with a piano roll"
    page = report / rendered[0]
    dom = browse(page, tmp_path / "profile", "--dump-dom")
    attrs = body_attrs(dom)
    assert attrs["images-ok"] == "true" and int(attrs["images"]) >= 1, attrs
    assert "Top-activating tokens" in dom and "Context notes" in dom
    midis = re.findall(r'href="([^"]+\.mid)"', dom)
    assert midis
    song = mido.MidiFile(str(page.parent / midis[0]))
    notes = [m for t in song.tracks for m in t if m.type == "note_on"]
    marks = [m for t in song.tracks for m in t if m.type in ("marker", "lyrics")]
    assert notes and marks and len(song.tracks) >= 2
    back = re.search(r'href="([^"]*index\.html[^"]*)"', dom)
    assert back and (page.parent / back.group(1).split("#")[0]).resolve() == (report / "index.html").resolve()


def test_latent_table_sorts_in_the_browser(report, tmp_path):
    probe = tmp_path / "copy"
    shutil.copytree(report, probe)
    html = (probe / "index.html").read_text()
    script = ("<script>window.addEventListener('load',function(){"
              "var t=document.querySelector('table.sortable'),th=t.tHead.rows[0].cells[0];"
              "th.click();var v=Array.prototype.map.call(t.tBodies[0].rows,"
              "function(r){return r.cells[0].textContent;});"
              "document.body.dataset.sorted=v.join(',');});</script>")
    (probe / "index.html").write_text(html.replace("</body>", script + "</body>"))
    attrs = body_attrs(browse(probe / "index.html", tmp_path / "profile", "--dump-dom"))
    values = [int(v) for v in attrs["sorted"].split(",")]
    assert values == sorted(values) and len(values) > 1


def test_report_folder_is_self_contained(report, tmp_path):
    moved = tmp_path / "elsewhere" / "report"
    shutil.copytree(report, moved)
    for html in moved.rglob("*.html"):
        text = html.read_text()
        assert not re.search(r'(src|href)="(https?:)?//', text), html
    attrs = body_attrs(browse(moved / "index.html", tmp_path / "profile", "--dump-dom"))
    assert attrs["images-ok"] == "true"
    shot = tmp_path / "index.png"
    browse(moved / "index.html", tmp_path / "profile", "--window-size=1280,1600",
           f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
