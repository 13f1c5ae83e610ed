"""Statistics and normalisation of an activation store: the entry points that take a store
path, and the seed-compatible command ``python -m music_interpret.preprocess``.

The library lives in :mod:`music_interpret.stats` (streaming statistics, ``stats.nc``) and
:mod:`music_interpret.normalize` (normalisation modes, :class:`Normalizer`, the normalised
copy); the functions here accept a store folder as well as an opened
:class:`~music_interpret.interfaces.StoreReader`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .normalize import (  # noqa: F401 - re-exported
    DEFAULT_MODE,
    MODES,
    STD_EPS,
    Mode,
    Normalizer,
    load_normalizer,
    write_normalization,
)
from .normalize import materialize as _materialize
from .stats import (  # noqa: F401 - re-exported
    NORMALIZATION_FILE,
    STATS_DIR,
    STATS_FILE,
    Moments,
    check_stats_for,
    load_stats,
    write_stats,
)
from .stats import compute_stats as _compute_stats

if TYPE_CHECKING:
    import xarray as xr

    from .interfaces import StoreReader


def _reader(store: str | Path | StoreReader) -> StoreReader:
    from .stores import open_store

    return open_store(store) if isinstance(store, (str, Path)) else store


def compute_stats(store: str | Path | StoreReader, hooks: list[str] | None = None,
                  **kwargs: Any) -> xr.Dataset:
    """Per-hook statistics of a store (see :func:`music_interpret.stats.compute_stats`)."""
    return _compute_stats(_reader(store), hooks, **kwargs)


def materialize(store: str | Path | StoreReader, out_path: str | Path, mode: str,
                stats: str | Path | xr.Dataset | None = None, *, block_tokens: int = 65_536) -> Path:
    """A normalised copy of a store (see :func:`music_interpret.normalize.materialize`)."""
    return _materialize(_reader(store), out_path, mode, stats, block_tokens=block_tokens)


# -- seed-compatible command ---------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from .seedcli import add_common

    p = argparse.ArgumentParser(prog="python -m music_interpret.preprocess",
                                description="Statistics and normalisation of an activation store "
                                "(data/activations/<dataset_name>/<data_repr>/ -> its stats/ folder).")
    add_common(p)
    p.add_argument("--layers", type=int, nargs="*", default=[],
                   help="check that resid_post.L was extracted (statistics cover every hook)")
    p.add_argument("--normalization", choices=MODES, default=DEFAULT_MODE)
    p.add_argument("--outlier-factor", type=float, default=4.0)
    p.add_argument("--materialize", action="store_true", help="also write a normalised copy")
    return p


def _run_cli(argv: list[str] | None) -> int:
    from .seedcli import run_seed, seed_pipeline, store_path

    ns = _parser().parse_args(argv)
    store = store_path(ns)
    info = _reader(store)
    for layer in ns.layers:
        info.hook_index(f"resid_post.{layer}")
    sections = {"extract": {"output": str(store)},
                "preprocess": {"normalization": ns.normalization, "outlier_factor": ns.outlier_factor,
                               "materialize": ns.materialize}}
    run_seed(seed_pipeline(ns, ["extract", "preprocess"], sections), ["preprocess"], ns.force, ns.root)
    print(store / STATS_DIR)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m music_interpret.preprocess <dataset_name> <data_repr> --layers 0 1 2 3``."""
    from .guard import guarded_main

    return guarded_main(_run_cli, argv)


if __name__ == "__main__":
    raise SystemExit(main())
