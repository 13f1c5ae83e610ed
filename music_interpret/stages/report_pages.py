"""The latent pages of the ``report`` stage (labels, top examples with piano rolls and MIDI)
and the density histograms of its index."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from . import report_html as H
from .report_data import LATENT_COLUMNS, HookData, _latent_value


def _density_png(hist: dict[str, Any], path: Path, hook: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.asarray(hist["edges"], float)
    counts = np.asarray(hist["counts"], float)
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4a7bb0",
           edgecolor="white")
    ax.set_xlabel("log10 firing density")
    ax.set_ylabel("latents")
    ax.set_title(f"{hook}: how often each latent fires", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _latent_page(data: HookData, latent: int, out: Path, top_labels: int, title: str) -> None:
    folder = out / "latents" / data.hook
    folder.mkdir(parents=True, exist_ok=True)
    stats = {c: _latent_value(data, c, latent) for c in (*LATENT_COLUMNS, "max_activation")}
    parts = [H.kv_table({k: v for k, v in stats.items() if v is not None})]
    if data.labels is not None:
        parts.append(_label_table(data.labels, latent, top_labels))
    entry = data.rendered.get(latent, {})
    files = [entry.get("png"), entry.get("txt"), *entry.get("midi", [])]
    for name in files:
        if name and data.examples_dir is not None and (data.examples_dir / name).exists():
            shutil.copy2(data.examples_dir / name, folder / name)
    if entry.get("png"):
        parts.append(f'<h3>Top examples (piano roll; red: activating note)</h3>'
                     f'<img src="{H.esc(entry["png"])}" alt="piano roll of latent {latent}">')
    if entry.get("midi"):
        links = " ".join(f'<a href="{H.esc(m)}" download>{H.esc(m)}</a>' for m in entry["midi"])
        parts.append(f"<h3>MIDI</h3><p>{links}</p>")
    if data.examples is not None:
        parts.append("<h3>Top-activating tokens</h3>" + _examples_table(data.examples, latent))
    if entry.get("txt") and (folder / entry["txt"]).exists():
        parts.append(f"<h3>Context notes</h3><pre>{H.esc((folder / entry['txt']).read_text())}</pre>")
    nav = (f'<a href="../../index.html#dict-{H.esc(data.hook)}">back to the report</a>')
    (folder / f"{latent}.html").write_text(
        H.page(f"{data.hook} latent {latent}", "\n".join(parts), nav=nav + f" - {H.esc(title)}"))


def _label_table(labels: Any, latent: int, top: int) -> str:
    row = labels.isel(latent=latent)
    key = next((k for k in ("auroc", "score", "f1", "precision", "auc") if k in row), next(iter(row)))
    values = np.nan_to_num(np.asarray(row[key].values, float), nan=-np.inf)
    best = np.argsort(-values, kind="stable")[:top]
    names = list(row.data_vars)
    label_values = row["label"].values if "label" in row.coords else np.arange(values.size)
    rows = [[str(label_values[j]), *(row[k].values[j].item() for k in names)] for j in best]
    return f"<h3>Top labels (by {H.esc(key)})</h3>" + H.table(["label", *names], rows, sortable=True)


def _vocabulary_names(ds: Any) -> tuple[list[str], list[str]]:
    """(event names, instrument names) the top examples were recorded in: the dataset's own
    record, else the vocabulary of the store it names (outputs written before the record)."""
    if "event_names" in ds.attrs:
        return json.loads(ds.attrs["event_names"]), json.loads(ds.attrs.get("instrument_names", "[]"))
    return _store_names(str(ds.attrs.get("store", "")))


@functools.lru_cache(maxsize=8)
def _store_names(store: str) -> tuple[list[str], list[str]]:
    from ..errors import UserError
    from ..vocabulary import default_vocabulary

    vocabulary = default_vocabulary()
    if store:
        try:
            from ..stores import open_store

            vocabulary = open_store(store).vocabulary
        except (OSError, UserError):
            pass
    return list(vocabulary.events), list(vocabulary.instruments)


def _examples_table(ds: Any, latent: int) -> str:
    TYPE_NAMES, INSTRUMENT_NAMES = _vocabulary_names(ds)  # noqa: N806
    row = ds.isel(latent=latent)
    names = [str(s) for s in ds.song_name.values]
    rows = []
    for r in range(row.sizes["rank"]):
        if int(row.token[r]) < 0:
            break
        song, et, inst = int(row.song[r]), int(row.event_type[r]), int(row.instrument[r])
        rows.append([r + 1, float(row.activation[r]), names[song] if 0 <= song < len(names) else song,
                     int(row.song_token[r]), TYPE_NAMES[et] if 0 <= et < len(TYPE_NAMES) else et,
                     int(row.beat[r]), int(row.position[r]), int(row.pitch[r]),
                     INSTRUMENT_NAMES[inst] if 0 < inst < len(INSTRUMENT_NAMES) else ""])
    return H.table(["rank", "activation", "song", "token", "event", "beat", "position", "pitch",
                    "instrument"], rows, sortable=True)
