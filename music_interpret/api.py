"""The Python API: ``run``, ``load_model``, ``load_dictionary``, ``encode``, ``open_activations``.

>>> import music_interpret as mi
>>> mi.run("pipeline.yaml", only=["extract"], **{"extract.max_songs": 20})
>>> model = mi.load_model("models/bach/demo")                  # the MMT adapter, loaded
>>> sae = mi.load_dictionary("reports/demo/train/dictionaries/resid_post.3")
>>> codes = mi.encode("data/activations/demo", sae)            # DataArray (token, latent)
>>> codes.where(codes.event_type == 3, drop=True).mean("token")

Everything raises :class:`music_interpret.errors.UserError` (one line naming the file or
key) for bad input, as the command line reports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError


def run(pipeline_or_path: str | Path | dict[str, Any] | Any, *, only: list[str] | None = None,
        force: bool = False, **overrides: Any) -> dict[str, Any]:
    """Run a pipeline; returns the run manifest (``reports/<run>/manifest.json``).

    ``pipeline_or_path``: a ``pipeline.yaml`` path, the same mapping as a dict (relative
    paths resolve against the current folder), or a parsed :class:`~music_interpret.config.Pipeline`.
    ``overrides`` set values as ``--set`` does, keyed ``section.key`` (``**{"train.steps":
    100}``) or ``section__key`` (``train__steps=100``). ``only`` runs a subset of the
    stages (``--stages``), ``force`` redoes up-to-date ones.
    """
    from .config import Pipeline, apply_override, load_yaml, parse_pipeline
    from .engine import Engine
    from .plugins import get_registry

    registry = get_registry()
    if isinstance(pipeline_or_path, Pipeline):
        if overrides:
            raise UserError("run: overrides need a pipeline path or mapping, not a parsed Pipeline")
        pipeline = pipeline_or_path
    else:
        if isinstance(pipeline_or_path, dict):
            raw, base, source = json.loads(json.dumps(pipeline_or_path, default=str)), Path.cwd(), None
        else:
            source = Path(pipeline_or_path).resolve()
            raw, base = load_yaml(source), source.parent
        for key, value in overrides.items():
            apply_override(raw, f"{key.replace('__', '.')}={json.dumps(value, default=str)}")
        pipeline = parse_pipeline(raw, registry, base, source=source)
    return Engine(pipeline, registry).run(only=only, force=force)


def load_model(path: str | Path, *, adapter: str = "mmt", device: str = "cpu") -> Any:
    """The model adapter ``adapter`` with the model folder ``path`` loaded onto ``device``
    (``run_with_hooks``, ``run_with_patch``, ``token_metadata``, ``hook_points`` ...)."""
    from .plugins import get_registry, unknown_plugin_message

    registry = get_registry()
    cls = registry.find("model_adapter", adapter)
    if cls is None:
        raise UserError(unknown_plugin_message(registry, "model_adapter", adapter))
    model = cls(cls.Config())
    model.load(Path(path), device=device)
    return model


def load_dictionary(path: str | Path, device: str = "cpu") -> Any:
    """The dictionary in folder ``path`` (raw activation space; inference only)."""
    from .learners.io import load_dictionary as load

    return load(path, device=device)


def encode(ds_or_store: Any, dictionary: Any, hook: str | None = None, *,
           chunk_tokens: int | None = None) -> Any:
    """Codes of every token as an ``xarray.DataArray`` (token, latent), float32.

    ``ds_or_store``: a store path or a Dataset from :func:`open_activations` (raw
    activations); ``dictionary``: a dictionary or its folder; ``hook`` defaults to the
    dictionary's hook point. The codes carry the Dataset's token coordinates; with dask
    activations they stay lazy, one chunk per activation chunk (encoded under
    ``torch.no_grad`` when computed), else they are computed now.
    """
    import numpy as np
    import xarray as xr

    from .activations import open_activations

    model = load_dictionary(dictionary) if isinstance(dictionary, (str, Path)) else dictionary
    hook = hook or (getattr(model, "config", None) or {}).get("hook_point")
    ds = open_activations(ds_or_store) if isinstance(ds_or_store, (str, Path)) else ds_or_store
    if hook is None:
        raise UserError("encode: name the hook point (hook=...); the dictionary does not record one")
    if "activations" not in ds or "hook" not in ds.dims:
        raise UserError("encode: expected a Dataset from open_activations (variable 'activations')")
    hooks = [str(h) for h in ds["hook"].values]
    if hook not in hooks:
        raise UserError(f"encode: hook point {hook!r} is not in the activations "
                        f"(have: {', '.join(hooks)})")
    acts = ds["activations"].sel(hook=hook)
    if acts.sizes["d_model"] != model.d_in:
        raise UserError(f"encode: the dictionary takes {model.d_in}-dimensional inputs, the "
                        f"activations of {hook} have {acts.sizes['d_model']}")
    data = acts.data
    if chunk_tokens is not None and hasattr(data, "rechunk"):
        data = data.rechunk({0: chunk_tokens})
    if hasattr(data, "map_blocks"):  # dask: lazy, block by block
        codes = data.rechunk({1: -1}).map_blocks(_encode_block, model, dtype=np.float32,
                                                 chunks=(data.chunks[0], (model.d_sae,)))
    else:
        codes = _encode_block(np.asarray(data), model)
    coords = {name: c for name, c in acts.coords.items() if c.dims == ("token",)}
    attrs = {"long_name": "dictionary codes", "hook_point": hook}
    if isinstance(dictionary, (str, Path)):
        attrs["dictionary"] = str(dictionary)
    return xr.DataArray(codes, dims=("token", "latent"), name="codes", attrs=attrs,
                        coords={**coords, "latent": np.arange(model.d_sae)})


def _encode_block(block: Any, model: Any) -> Any:
    """Codes of one (tokens, d_model) block, on the dictionary's device, as float32 numpy."""
    import numpy as np
    import torch

    if block.shape[0] == 0:
        return np.zeros((0, model.d_sae), np.float32)
    with torch.no_grad():
        return model.encode_host(torch.from_numpy(np.ascontiguousarray(block, np.float32))).numpy()
