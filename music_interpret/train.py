"""``python -m music_interpret.train <series_name> <experiment_name> <layer_dir> --input-dim D --latent-dim N``.

The seed project's training command. ``<layer_dir>`` is an activation store folder
relative to ``data/activations/`` (under ``--root``): ``<dataset>/<model>`` is the store
``python -m music_interpret.activation_extraction <dataset> <model>`` writes. One
dictionary is trained per hook point of the store unless ``--hook`` picks one. Results
go to ``reports/<series_name>/<experiment_name>/`` (``manifest.json`` and ``train/``:
``dictionaries/<hook>/`` and ``tensorboard/<hook>/``); a ``reports/<series_name>/`` that
is itself another run's folder (a pipeline's) is refused. The command runs the ``train``
stage through the engine, so rerunning it after a crash resumes from the last
checkpoint, and rerunning it unchanged does nothing.

Defaults that converge on a store of the demo's size (relu_l1's default preset): batch
1,024, lr 1e-3, l1_coeff 2.0 and ``max(2,500 steps, one epoch)``; the downstream loss
is measured on the model and data the store records.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .errors import UserError
from .normalize import AUTO, MODES
from .seedcli import guarded_main, run_seed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m music_interpret.train",
                                description="Train sparse dictionaries on a stored activation set.")
    p.add_argument("series_name", help="reports/<series_name>/")
    p.add_argument("experiment_name", help="reports/<series_name>/<experiment_name>/")
    p.add_argument("layer_dir", help="activation store folder, relative to data/activations/")
    p.add_argument("--input-dim", type=int, required=True, help="d_model of the activations")
    p.add_argument("--latent-dim", type=int, required=True, help="number of dictionary latents (d_sae)")
    p.add_argument("--hook", default=None, help="train only this hook point (default: every one)")
    p.add_argument("--learner", default="relu_l1", help="relu_l1 (default) or topk")
    p.add_argument("--preset", default=None, help="relu_l1 recipe: default or seed")
    p.add_argument("--l1-coeff", type=float, default=None, help="relu_l1: L1 coefficient")
    p.add_argument("--k", type=int, default=None, help="topk: active latents per token")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the learner's)")
    p.add_argument("--batch-size", type=int, default=None, help="tokens per step")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimiser steps (default: {DEFAULT_STEPS:,} or one epoch, the larger)")
    p.add_argument("--normalization", default=AUTO,
                   help=f"{AUTO} (from the preprocess stage), {', '.join(MODES[:-1])} or {MODES[-1]}")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="random seed (initialisation, shuffling, hold-out)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--root", type=Path, default=Path("."), help="project folder (default: .)")
    p.add_argument("--force", action="store_true",
                   help="replace a different run of the same name / redo an up-to-date one")
    return p


DEFAULT_STEPS = 2500
#: relu_l1 (default preset) recipe of the seed command: what the demo pipeline trains with
SEED_RECIPE = {"lr": 1e-3, "batch_size": 1024, "l1_coeff": 2.0}


def _learner(ns: argparse.Namespace) -> dict[str, Any]:
    from .plugins import get_registry

    registry = get_registry()
    names = registry.names("dictionary_learner")
    if ns.learner not in names:
        raise UserError(f"--learner: unknown learner {ns.learner!r} (available: {', '.join(names)})")
    options: dict[str, Any] = {"name": ns.learner, "d_sae": ns.latent_dim}
    if ns.preset is not None:
        if ns.learner != "relu_l1":
            raise UserError(f"--preset: presets belong to relu_l1, not {ns.learner!r}")
        if ns.preset not in ("default", "seed"):
            raise UserError(f"--preset: unknown preset {ns.preset!r} (available: default, seed)")
        options["preset"] = ns.preset
    if ns.l1_coeff is not None:
        if ns.learner == "topk":
            raise UserError("--l1-coeff: topk has no L1 penalty (use --k)")
        options["l1_coeff"] = ns.l1_coeff
    if ns.k is not None:
        if ns.learner != "topk":
            raise UserError(f"--k: only for --learner topk, not {ns.learner!r}")
        options["k"] = ns.k
    for key in ("lr", "batch_size"):
        if getattr(ns, key) is not None:
            options[key] = getattr(ns, key)
    if ns.learner == "relu_l1" and options.get("preset", "default") == "default":
        options = {**SEED_RECIPE, **options}
    return options


def build_pipeline(ns: argparse.Namespace) -> dict[str, Any]:
    """The raw pipeline mapping of the command (after checking the store)."""
    from .stores import open_store

    root = ns.root.resolve()
    info = open_store(_store_folder(root, ns.layer_dir))
    if ns.input_dim != info.d_model:
        raise UserError(f"--input-dim {ns.input_dim} disagrees with the store {info.path} "
                        f"(d_model {info.d_model})")
    if ns.hook is not None and ns.hook not in info.hooks:
        raise UserError(f"--hook: {ns.hook!r} is not in the store {info.path} "
                        f"(extracted: {', '.join(info.hooks)})")
    if ns.latent_dim < 1:
        raise UserError(f"--latent-dim must be positive, got {ns.latent_dim}")
    learner = _learner(ns)
    train: dict[str, Any] = {"learner": learner, "store": str(info.path),
                             "hooks": [ns.hook] if ns.hook else [], "normalization": ns.normalization,
                             "checkpoint_every": ns.checkpoint_every}
    batch = int(learner.get("batch_size") or 4096)
    train["steps"] = ns.steps if ns.steps is not None else \
        max(DEFAULT_STEPS, math.ceil(0.9 * info.n_tokens / batch))  # 0.9: the hold-out split
    series = root / "reports" / ns.series_name
    if (series / "manifest.json").exists():
        raise UserError(f"{series}: is the run folder of another run (it holds manifest.json); "
                        "choose another series name")
    return {"run": ns.experiment_name, "output_dir": str(series),
            "stages": ["train"], "seed": ns.seed, "device": ns.device, "train": train}


def _store_folder(root: Path, layer_dir: str) -> Path:
    """``data/activations/<layer_dir>``; when missing, the error lists the stores there are."""
    base = root / "data" / "activations"
    path = base / layer_dir
    if not (path / "store.json").exists() and base.is_dir():
        found = sorted(str(p.parent.relative_to(base)) for p in base.rglob("store.json")
                       if "stats" not in p.parent.relative_to(base).parts)
        if found:
            raise UserError(f"{path}: no activation store here (stores under {base}: "
                            f"{', '.join(found)}; the seed extraction command writes "
                            "<dataset>/<model>)")
    return path


def run(argv: list[str] | None = None) -> int:
    from .jsonio import to_jsonable

    ns = build_parser().parse_args(argv)
    raw = build_pipeline(ns)
    out = ns.root.resolve() / "reports" / ns.series_name / ns.experiment_name
    try:
        previous = json.loads((out / "manifest.json").read_text()).get("config")
    except (OSError, ValueError):
        previous = None
    if previous is not None and previous != to_jsonable(raw) and not ns.force:
        raise UserError(f"{out}: already holds a different run (other options); pass --force to "
                        "replace it or choose another experiment name")
    run_seed(raw, ["train"], ns.force, ns.root)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return guarded_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
