"""``python -m music_interpret.activation_extraction <dataset_name> <data_repr> --layers 0 1 2 3``.

Reads ``data/base/<dataset_name>_notes/notes/`` and ``models/<dataset_name>/<data_repr>/``,
writes the activation store to ``data/activations/<dataset_name>/<data_repr>/`` and prints
its path. Rerunning after a crash resumes from the last complete shard.
"""

from __future__ import annotations

import argparse
from typing import Any

from .config import DEFAULT_STORE
from .seedcli import add_common, guarded_main, run_seed, seed_pipeline, store_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m music_interpret.activation_extraction",
                                description="Extract token activations of an MMT model into a netCDF store.")
    add_common(p)
    p.add_argument("--layers", type=int, nargs="*", default=[], help="layers L: hook points resid_post.L")
    p.add_argument("--hooks", nargs="*", default=[], help="hook points (resid_pre.L, resid_mid.L, ...)")
    p.add_argument("--events", choices=("all", "notes"), default="all", help="which tokens to keep")
    p.add_argument("--split", choices=("all", "train", "valid", "test"), default="all")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--shard-mb", type=float, default=256.0, help="size of a shard file in MiB")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="stored precision of the activations (read back as float32)")
    p.add_argument("--max-songs", type=int, default=None, help="only the first N songs")
    p.add_argument("--forward-workers", type=int, default=None,
                   help="threads running forward batches side by side (default: 2 on CPU, 1 on GPU)")
    return p


def run(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    out = store_path(ns)
    extract: dict[str, Any] = {
        "layers": ns.layers, "hooks": ns.hooks, "events": ns.events, "batch_size": ns.batch_size,
        "dtype": ns.dtype, "output": str(out), "store": {"name": DEFAULT_STORE, "shard_mb": ns.shard_mb},
    }
    for key in ("max_songs", "forward_workers"):
        if getattr(ns, key) is not None:
            extract[key] = getattr(ns, key)
    run_seed(seed_pipeline(ns, ["extract"], {"extract": extract}), ["extract"], ns.force, ns.root)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return guarded_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
