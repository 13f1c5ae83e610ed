"""Dictionary files: ``weights.safetensors`` + ``config.json`` + ``metrics.json``, and SAELens export.

The saved weights act on raw activations (normalisation and input scaling folded in)::

    f  = act((x - b_dec) @ W_enc + b_enc)     (b_dec subtracted when apply_b_dec_to_input)
    x^ = f @ W_dec + b_dec

with ``act`` = ReLU, or ReLU of the top ``k`` pre-activations for ``architecture: topk``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..jsonio import temporary_name, write_json_atomic, writing
from .dictionary import Dictionary

FORMAT = "music-interpret-dictionary"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _save_tensors(model: Dictionary, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: getattr(model, k).detach().float().cpu().contiguous() for k in KEYS}
    tmp = temporary_name(path)
    with writing(path, tmp):
        save_file(tensors, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def save_dictionary(out_dir: str | Path, model: Dictionary, config: dict[str, Any],
                    metrics: dict[str, Any] | None = None) -> Path:
    """Write a raw-space dictionary folder; ``config`` is completed with the architecture fields."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "architecture": "topk" if model.k is not None else "relu",
            "d_in": model.d_in, "d_sae": model.d_sae, "k": model.k,
            "apply_b_dec_to_input": model.apply_b_dec_to_input, "activation_space": "raw", **config}
    _save_tensors(model, out / WEIGHTS)
    write_json_atomic(out / METRICS, metrics or {})
    write_json_atomic(out / CONFIG, full)  # last: its presence marks a complete folder
    return out


def _folder(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a dictionary folder (or of the folder holding a weights file)."""
    cfg_path = _folder(path) / CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{cfg_path}: not a dictionary folder (no {CONFIG})") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{cfg_path}: unreadable dictionary config ({exc})") from None
    if cfg.get("format") != FORMAT:
        raise UserError(f"{cfg_path}: not a {FORMAT} config")
    return cfg


def load_dictionary(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """The dictionary saved in folder ``path`` (``encode``, ``decode``, ``forward``; ``.config``)."""
    from safetensors.torch import load_file

    folder = _folder(path)
    cfg = read_config(folder)
    try:
        tensors = load_file(str(folder / WEIGHTS), device=str(device))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{folder / WEIGHTS}: unreadable weights, truncated or damaged "
                        f"({reason})") from None
    model = Dictionary(cfg["d_in"], cfg["d_sae"], k=cfg.get("k"),
                       apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True))
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise UserError(f"{folder / WEIGHTS}: missing tensors {', '.join(missing)}")
    shapes = {"W_enc": (model.d_in, model.d_sae), "b_enc": (model.d_sae,),
              "W_dec": (model.d_sae, model.d_in), "b_dec": (model.d_in,)}
    bad = [f"{k} {tuple(tensors[k].shape)} (expected {shapes[k]})" for k in KEYS
           if tuple(tensors[k].shape) != shapes[k]]
    if bad:
        raise UserError(f"{folder / WEIGHTS}: tensor shapes disagree with {CONFIG}: {', '.join(bad)}")
    model.load_state_dict({k: tensors[k] for k in KEYS})
    model.config = cfg  # type: ignore[assignment]
    return model.to(device).eval()


def saelens_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens's ``cfg.json`` for one of our dictionaries (v6 layout plus the older flat keys)."""
    hook = cfg.get("hook_point")
    meta = {"model_name": cfg.get("model", {}).get("name") or "mmt", "hook_name": hook,
            "hook_layer": _layer(hook), "hook_head_index": None, "prepend_bos": False,
            "context_size": cfg.get("model", {}).get("context_size"),
            "dataset_path": cfg.get("data", {}).get("store_path")}
    out: dict[str, Any] = {
        "architecture": "topk" if cfg.get("k") else "standard",
        "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
        "normalize_activations": "none", "reshape_activations": "none",
        "meta": meta, **meta,
    }
    if cfg.get("k"):
        out["k"] = int(cfg["k"])
    out["activation_fn_str"] = "topk" if cfg.get("k") else "relu"
    out["activation_fn_kwargs"] = {"k": int(cfg["k"])} if cfg.get("k") else {}
    out["music_interpret"] = {k: cfg.get(k) for k in ("hook_point", "learner", "data", "normalization")}
    return out


def _layer(hook: str | None) -> int | None:
    tail = (hook or "").rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else None


def export_saelens(path: str | Path, out: str | Path) -> Path:
    """Write SAELens's layout (``cfg.json`` + ``sae_weights.safetensors``) of dictionary ``path``."""
    model = load_dictionary(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(model, out / "sae_weights.safetensors")
    write_json_atomic(out / "cfg.json", saelens_config(model.config))  # type: ignore[arg-type]
    return out
