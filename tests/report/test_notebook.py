"""notebooks/feature_exploration.ipynb runs end to end (nbclient) on a small run and the demo."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "feature_exploration.ipynb"
DEMO_RUN = REPO / "reports" / "demo"
DEMO_STORE = REPO / "data" / "activations" / "demo"


def execute(monkeypatch: pytest.MonkeyPatch, run_dir: Path, store: Path) -> object:
    """Run every cell with the paths given through the notebook's environment variables."""
    nbclient = pytest.importorskip("nbclient", reason="pip install nbclient (dev extra)")
    nbformat = pytest.importorskip("nbformat", reason="pip install nbformat (dev extra)")
    pytest.importorskip("ipykernel", reason="pip install ipykernel (dev extra)")
    monkeypatch.setenv("MI_RUN_DIR", str(run_dir))
    monkeypatch.setenv("MI_STORE", str(store))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # coalesce_streams: one print may reach the client as several stream messages (the
    # kernel flushes on a timer), which a loaded machine splits mid-line
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", coalesce_streams=True,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    return nb


def outputs(nb: object) -> str:
    """The printed text and the plain-text results of every cell, stream text unbroken."""
    text = []
    for c in nb.cells:  # type: ignore[attr-defined]
        for out in c.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out.get("text", ""))
            else:
                text.append(f"\n{out.get('data', {}).get('text/plain', '')}\n")
    return "".join(text)


def test_notebook_on_a_small_run(small_run, monkeypatch):
    nb = execute(monkeypatch, small_run, small_run.parent.parent / "acts")
    text = outputs(nb)
    assert "latents: [" in text and "'latent': 4} | coordinates:" in text and "pitch_class" in text
    assert "findings;" in text and "permutation null" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images  # the activation profiles at least


@pytest.mark.skipif(not (DEMO_RUN / "analyze").is_dir() or not DEMO_STORE.is_dir(),
                    reason="the demo has not been analysed yet (make demo)")
def test_notebook_on_the_demo(monkeypatch):
    nb = execute(monkeypatch, DEMO_RUN, DEMO_STORE)
    assert "latents: [" in outputs(nb)
