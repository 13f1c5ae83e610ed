"""Shared plumbing of the seed-compatible per-step commands.

``python -m music_interpret.activation_extraction <dataset> <model> --layers 0 1`` and
friends build the same pipeline a ``pipeline.yaml`` would, rooted at ``--root``
(default: the current folder, laid out as ``data/base/<dataset>_notes/notes/``,
``models/<dataset>/<model>/``, ``data/activations/``, ``reports/``), and run it through
the engine, so skip-if-done, resume and the run manifest work the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .config import DEFAULT_ADAPTER


def add_common(parser: argparse.ArgumentParser) -> None:
    """Arguments every seed command shares."""
    parser.add_argument("dataset_name", help="dataset name: data/base/<dataset_name>_notes/notes/")
    parser.add_argument("data_repr", help="model name: models/<dataset_name>/<data_repr>/")
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder (default: .)")
    parser.add_argument("--force", action="store_true", help="redo the step even when up to date")


def seed_pipeline(ns: argparse.Namespace, stages: list[str], sections: dict[str, Any]) -> dict[str, Any]:
    """The raw pipeline mapping of a seed command."""
    root = ns.root.resolve()
    return {
        "run": f"{ns.dataset_name}_{ns.data_repr}",
        "output_dir": str(root / "reports"),
        "stages": stages,
        "device": getattr(ns, "device", "auto"),
        "model": {"adapter": DEFAULT_ADAPTER, "path": str(root / "models" / ns.dataset_name / ns.data_repr)},
        "data": {"path": str(root / "data" / "base" / f"{ns.dataset_name}_notes" / "notes"),
                 "split": getattr(ns, "split", "all")},
        **sections,
    }


def store_path(ns: argparse.Namespace) -> Path:
    """``data/activations/<dataset_name>/<data_repr>`` under the root."""
    return ns.root.resolve() / "data" / "activations" / ns.dataset_name / ns.data_repr


def run_seed(raw: dict[str, Any], only: list[str], force: bool, base: Path) -> dict[str, Any]:
    """Validate and run; user errors become one line on stderr and exit status 2."""
    from .config import parse_pipeline
    from .engine import Engine
    from .plugins import get_registry

    registry = get_registry()
    pipeline = parse_pipeline(raw, registry, base.resolve())
    return Engine(pipeline, registry).run(only=only, force=force)


def guarded_main(func: Any, argv: list[str] | None) -> int:
    """Run ``func(argv)`` under the one error guard (:func:`music_interpret.guard.guarded_main`)."""
    from .guard import guarded_main as guard

    return guard(func, argv)
