"""Export a dictionary folder for SAELens (6.x) or EleutherAI sparsify.

* ``saelens``: ``cfg.json`` + ``sae_weights.safetensors`` + ``sparsity.safetensors``, in
  the layout ``sae_lens.SAE.load_from_disk`` reads through its current (6.x) path:
  ``architecture`` ``standard`` (``relu_l1``) or ``topk``, ``metadata`` with
  ``sae_lens_version`` (the release whose layout is written, tested with it), the hook
  point (``hook_name``, ``hook_layer``), the model, the data and the normalisation.
  ``sparsity.safetensors`` holds ``sparsity``: log10 of each latent's firing density
  (+1e-10, as SAELens logs it), counted in one pass over the held-out songs of the
  store the dictionary was trained on (all its tokens when none were held out).
* ``sparsify``: ``cfg.json`` + ``sae.safetensors`` as ``sparsify.Sae.load_from_disk``
  reads them (``encoder.weight`` = W_enc^T, ``encoder.bias``, ``W_dec``, ``b_dec``), and
  ``music_interpret.json`` with the metadata (sparsify's config takes no extra keys).
  sparsify only knows top-k coders: ``topk`` maps one to one; ``relu_l1`` becomes a
  top-k coder with k = d_sae, which keeps every positive pre-activation and is therefore
  exactly the ReLU dictionary (slow to decode: every latent is a candidate).

Both act on raw activations, as the dictionary folder does (normalisation folded in).
The export is written into a temporary sibling folder and renamed to ``out``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import UserError
from ..jsonio import write_json_atomic
from .dictionary import Dictionary

SAELENS_VERSION = "6.54.12"
RELU_NOTE = "relu_l1 exported as top-k with k = d_sae (exactly the ReLU dictionary)"
FORMATS = ("saelens", "sparsify")
EPS = 1e-10


def export_dictionary(path: str | Path, out: str | Path,
                      fmt: Literal["saelens", "sparsify"] = "saelens", *,
                      sparsity: bool = True, store: str | Path | None = None) -> Path:
    """Write dictionary folder ``path`` in format ``fmt`` to the new folder ``out``.

    ``sparsity`` (SAELens only): compute ``sparsity.safetensors`` from the held-out
    songs of the training store (``store`` overrides its recorded path).
    """
    from .io import load_dictionary

    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not an export format ({', '.join(FORMATS)})")
    model = load_dictionary(path)
    cfg: dict[str, Any] = model.config  # type: ignore[assignment]
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose another --out")
    files: dict[str, Any] = {}
    extra: dict[str, Any] = {}  # more JSON files
    if fmt == "saelens":
        files["sae_weights.safetensors"] = _tensors(model)
        config = saelens_config(cfg)
        if sparsity:
            log10, source = holdout_log10_density(model, cfg, store)
            files["sparsity.safetensors"] = {"sparsity": log10}
            config["metadata"]["sparsity_source"] = source
    else:
        files["sae.safetensors"] = sparsify_tensors(model)
        config = sparsify_config(cfg, model)
        extra["music_interpret.json"] = {**_metadata(cfg), "source_architecture":
                                         "topk" if model.k else "relu",
                                         "note": None if model.k else RELU_NOTE}
    return _publish(out, config, files, extra)


def _tensors(model: Dictionary) -> dict[str, torch.Tensor]:
    return {k: getattr(model, k).detach().float().cpu().contiguous()
            for k in ("W_enc", "b_enc", "W_dec", "b_dec")}


def _publish(out: Path, config: dict[str, Any], files: dict[str, dict[str, torch.Tensor]],
             extra: dict[str, Any]) -> Path:
    """Write the export into ``.<out>.partial-<pid>`` next to ``out``, then rename it."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from this process id
    tmp.mkdir()
    try:
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name))
        write_json_atomic(tmp / "cfg.json", config)
        for name, data in extra.items():
            write_json_atomic(tmp / name, data)
        if out.exists():
            out.rmdir()  # empty (checked before)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _layer(hook: str | None) -> int | None:
    tail = (hook or "").rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _metadata(cfg: dict[str, Any]) -> dict[str, Any]:
    """What the dictionary knows of its hook point, model, data and normalisation."""
    from ..provenance import source_checkpoint
    from .io import input_norm

    hook, model, data = cfg.get("hook_point"), cfg.get("model") or {}, cfg.get("data") or {}
    norm = cfg.get("normalization") or {}
    return {
        "model_name": model.get("name") or "mmt",
        "hook_name": hook, "hook_layer": _layer(hook), "hook_head_index": None,
        "context_size": model.get("context_size"),
        "dataset_path": data.get("dataset") or data.get("store_path"),
        "model_path": model.get("path") or source_checkpoint(model.get("source")),
        "model_sha256": model.get("sha256"),
        "activation_store": data.get("store_path"), "activation_store_id": data.get("store_id"),
        "activation_space": cfg.get("activation_space", "raw"),
        "normalization": {"training": (norm.get("loader") or {}).get("mode", "none"),
                          "input_scale": norm.get("input_scale"),
                          "folded_into_weights": bool(norm.get("folded", True))},
        "input_mean_norm": input_norm(cfg),
        "learner": (cfg.get("learner") or {}).get("name"),
        "music_interpret_version": cfg.get("music_interpret_version"),
    }


def saelens_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens 6's ``cfg.json`` (its current loading path) for one of our dictionaries."""
    topk = bool(cfg.get("k"))
    out: dict[str, Any] = {
        "architecture": "topk" if topk else "standard",
        "d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"]), "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
                     **_metadata(cfg)},
    }
    if topk:
        out.update(k=int(cfg["k"]), rescale_acts_by_decoder_norm=False)
    return out


def sparsify_tensors(model: Dictionary) -> dict[str, torch.Tensor]:
    """sparsify's parameters: it always subtracts ``b_dec`` before the encoder, so a
    dictionary that does not gets ``b_dec @ W_enc`` folded into the encoder bias."""
    t = _tensors(model)
    bias = t["b_enc"] if model.apply_b_dec_to_input else t["b_enc"] + t["b_dec"] @ t["W_enc"]
    return {"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": bias.contiguous(),
            "W_dec": t["W_dec"], "b_dec": t["b_dec"]}


def sparsify_config(cfg: dict[str, Any], model: Dictionary) -> dict[str, Any]:
    """sparsify's ``cfg.json``; ``relu_l1`` maps to k = d_sae (see the module doc)."""
    norms = model.W_dec.detach().norm(dim=1)
    return {
        "activation": "topk", "expansion_factor": max(1, model.d_sae // model.d_in),
        "normalize_decoder": bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3)),
        "num_latents": model.d_sae, "k": int(model.k or model.d_sae),
        "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": model.d_in,
    }


@torch.no_grad()
def holdout_log10_density(model: Dictionary, cfg: dict[str, Any], store: str | Path | None = None,
                          batch_size: int = 8192) -> tuple[torch.Tensor, str]:
    """log10(firing density + 1e-10) per latent over the held-out songs of the training store."""
    from ..loader import ActivationLoader
    from ..stores import is_store, open_store

    data = cfg.get("data") or {}
    path = Path(store or data.get("store_path") or "")
    if not is_store(path):
        raise UserError(f"{path}: the activation store the dictionary was trained on is not there, "
                        "so sparsity.safetensors cannot be computed; pass --store PATH "
                        "(or --no-sparsity)")
    info = open_store(path)
    if data.get("store_id") and info.store_id != data["store_id"]:
        raise UserError(f"{path}: store_id {info.store_id} is not the store the "
                        f"dictionary was trained on ({data['store_id']})")
    training = cfg.get("training") or {}
    index = {name: i for i, name in enumerate(info.songs)}
    held = [index[n] for n in training.get("holdout_songs") or [] if n in index]
    filters = dict(training.get("filters") or {})
    if held:
        filters["song"] = held
    loader = ActivationLoader(info, cfg["hook_point"], batch_size, shuffle=False, filters=filters,
                              prefetch=0)
    fired = torch.zeros(model.d_sae, dtype=torch.float64)
    for x in loader:
        fired += (model.encode(x) > 0).sum(0, dtype=torch.float64)
    loader.close()
    density = fired / loader.n_tokens
    what = f"{len(held)} held-out songs" if held else "all songs (none were held out)"
    return torch.log10(density + EPS).float(), f"{loader.n_tokens} tokens of {what} of {path}"


def export_saelens(path: str | Path, out: str | Path, *, sparsity: bool = True) -> Path:
    """Write SAELens's layout of dictionary ``path`` to ``out`` (see :func:`export_dictionary`)."""
    return export_dictionary(path, out, "saelens", sparsity=sparsity)
