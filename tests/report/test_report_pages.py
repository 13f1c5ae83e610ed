"""The report leads with the findings, and every latent page it links has its piano rolls."""

from __future__ import annotations

import json
import re
from pathlib import Path


def test_findings_lead_and_every_page_has_piano_rolls(small_run: Path) -> None:
    index = (small_run / "report" / "index.html").read_text()
    assert "Findings that beat their controls" in index
    assert index.index("Findings that beat their controls") < index.index("Overview")
    findings = json.loads((small_run / "analyze" / "feature_token" / "findings.json").read_text())
    for hook, entry in findings["hooks"].items():
        assert f"{hook}: {len(entry['findings'])} findings" in index
    pages = sorted(set(re.findall(r'href="(latents/[^"]+\.html)"', index)))
    assert pages
    for page in pages:
        html = (small_run / "report" / page).read_text()
        pngs = re.findall(r'<img src="([^"]+\.png)"', html)
        assert pngs, f"{page} has no piano roll"
        assert all((small_run / "report" / page).parent.joinpath(p).exists() for p in pngs)


def test_top_examples_render_the_findings_first(small_run: Path) -> None:
    findings = json.loads((small_run / "analyze" / "feature_token" / "findings.json").read_text())
    for hook, entry in findings["hooks"].items():
        index = json.loads((small_run / "analyze" / "top_examples" / hook / "index.json").read_text())
        reasons = [e.get("reason") for e in index["latents"]]
        found = [f["latent"] for f in entry["findings"]]
        assert [e["latent"] for e in index["latents"][: len(found)]] == found
        assert reasons[: len(found)] == ["finding"] * len(found)
