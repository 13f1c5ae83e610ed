"""Command line: ``python -m music_interpret {run,validate,plugins,registry,export,schema}``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from .guard import EXIT_OK, guarded
from .version import __version__

NO_PUBLISH = "no output was published for the unfinished stage"


def command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A subcommand under the one error guard (:mod:`music_interpret.guard`)."""
    return guarded(func, NO_PUBLISH)


# -- commands -------------------------------------------------------------------------------

@command
def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import get_registry

    registry = get_registry()
    rows = [info.as_dict() for info in registry.infos]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        table = [["KIND", "NAME", "DISTRIBUTION", "STATUS", "DESCRIPTION"]]
        for r in rows:
            status = r["status"] if r["status"] == "loaded" else f"failed: {r['error']}"
            table.append([r["kind"], r["name"], f"{r['distribution']} {r['version']}", status,
                          r["description"]])
        _print_table(table)
    return EXIT_OK


@command
def cmd_registry(args: argparse.Namespace) -> int:
    from .catalogue import load_catalogue
    from .plugins import get_registry

    entries = load_catalogue(args.path)
    registry = get_registry()
    for entry in entries:
        entry["installed"] = registry.find(entry["kind"], entry["name"]) is not None
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        table = [["KIND", "NAME", "DISTRIBUTION", "INSTALLED", "DESCRIPTION"]]
        for e in entries:
            table.append([e["kind"], e["name"], e["distribution"], "yes" if e["installed"] else "no",
                          e["description"]])
        _print_table(table)
    return EXIT_OK


@command
def cmd_validate(args: argparse.Namespace) -> int:
    from .config import load_pipeline
    from .engine import preflight
    from .errors import ConfigError
    from .plugins import get_registry

    registry = get_registry()
    pipeline = load_pipeline(Path(args.pipeline), registry, args.set)
    problems = preflight(pipeline, registry)
    if problems:
        raise ConfigError(problems)
    stages = ", ".join(pipeline.header.stages)
    print(f"{args.pipeline}: valid (run {pipeline.header.run!r}; stages: {stages}; "
          f"output: {pipeline.run_dir})")
    return EXIT_OK


@command
def cmd_run(args: argparse.Namespace) -> int:
    from . import ranks
    from .config import load_pipeline
    from .engine import Engine
    from .plugins import get_registry

    registry = get_registry()
    pipeline = load_pipeline(Path(args.pipeline), registry, args.set)
    only = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages is not None else None
    dist = ranks.start(pipeline.header.device)  # under torchrun: see music_interpret.ranks
    ok = False
    try:
        manifest = Engine(pipeline, registry).run(only=only, force=args.force)
        ok = True
    finally:
        ranks.stop(ok)
    if not dist.main:
        return EXIT_OK
    examined = [manifest["stages"][n] for n in manifest["examined"]]
    done = [e for e in examined if e.get("status") == "done"]
    skipped = [e for e in examined if e.get("status") == "skipped"]
    print(f"run {pipeline.header.run!r} complete: {len(done)} stage(s) run, {len(skipped)} skipped; "
          f"manifest: {pipeline.run_dir / 'manifest.json'}")
    return EXIT_OK


@command
def cmd_export(args: argparse.Namespace) -> int:
    from .learners.export import export_dictionary

    out = export_dictionary(args.dictionary, args.out, args.format, sparsity=not args.no_sparsity,
                            store=args.store)
    print(out)
    return EXIT_OK


@command
def cmd_schema(args: argparse.Namespace) -> int:
    from .jsonio import write_json_atomic
    from .plugins import get_registry
    from .schema import pipeline_schema

    schema = pipeline_schema(get_registry())
    if args.out is None:
        print(json.dumps(schema, indent=2))
    else:
        write_json_atomic(args.out, schema)
        print(args.out)
    return EXIT_OK


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        cells = [str(c).ljust(w) for c, w in zip(r[:-1], widths, strict=False)] + [str(r[-1])]
        print("  ".join(cells).rstrip())


# -- parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m music_interpret",
        description="Interpretability of symbolic-music transformers: extract activations, "
        "train sparse autoencoders, analyse what the model learned about music.",
    )
    parser.add_argument("--version", action="version", version=f"music-interpret {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the stages of a pipeline.yaml",
                       description="Run the stages of PIPELINE in order. A stage whose output is "
                       "complete for the same config and inputs is skipped; --force redoes it.")
    p.add_argument("pipeline", metavar="PIPELINE.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (typed like YAML: 1e-3, true, [0, 1]); repeatable")
    p.add_argument("--stages", metavar="A,B", help="run only these stages (comma separated)")
    p.add_argument("--force", action="store_true", help="redo stages even when their output is up to date")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a pipeline.yaml without running anything",
                       description="Check PIPELINE: unknown keys, types, plugin names and configs, "
                       "input paths. Prints one line per problem; exit status 2 if any.")
    p.add_argument("pipeline", metavar="PIPELINE.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value before checking; repeatable")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plugins", help="list installed plugins",
                       description="List every plugin found through the 'music_interpret' entry "
                       "points, with its kind, distribution and load status.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("registry", help="show the committed catalogue of known plugins",
                       description="Show registry/plugins.yaml: known plugins and whether each "
                       "is installed here.")
    p.add_argument("--path", type=Path, default=None, help="catalogue file (default: the repository's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("export", help="export a dictionary for SAELens or sparsify",
                       description="Write the dictionary folder DICTIONARY (config.json + "
                       "weights.safetensors) in SAELens 6's layout (cfg.json, sae_weights."
                       "safetensors, sparsity.safetensors) or sparsify's (cfg.json, sae.safetensors) "
                       "to the new folder DIR.")
    p.add_argument("dictionary", type=Path, metavar="DICTIONARY")
    p.add_argument("--format", choices=("saelens", "sparsify"), default="saelens")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="new (or empty) folder")
    p.add_argument("--store", type=Path, default=None,
                   help="activation store for sparsity.safetensors (default: the recorded one)")
    p.add_argument("--no-sparsity", action="store_true", help="SAELens: skip sparsity.safetensors")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("schema", help="JSON Schema of pipeline.yaml (for editor completion)",
                       description="Print (or write to FILE) the JSON Schema of pipeline.yaml, "
                       "built from the config dataclasses and every installed plugin's Config.")
    p.add_argument("--out", type=Path, default=None, metavar="FILE")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))
