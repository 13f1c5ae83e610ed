"""Dictionary files: ``weights.safetensors`` + ``config.json`` + ``metrics.json``.

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
    model.input_norm = input_norm(cfg)
    return model.to(device).eval().requires_grad_(False)  # inference: no autograd graph


def input_norm(cfg: dict[str, Any]) -> float | None:
    """Mean L2 norm of the raw activations a dictionary was trained on, when it can be told:
    recorded in ``config.json`` (``input.mean_norm``), implied by a ``unit_mean_norm``
    normalisation, or read from the statistics it was normalised with."""
    import math

    from ..normalize import UNIT_MEAN_NORM

    recorded = (cfg.get("input") or {}).get("mean_norm")
    if recorded:
        return float(recorded)
    norm = cfg.get("normalization") or {}
    loader = norm.get("loader") or {}
    if loader.get("mode") == UNIT_MEAN_NORM and loader.get("scale_value"):
        return math.sqrt(int(cfg["d_in"])) / float(loader["scale_value"])
    stats = norm.get("stats_dir")
    if stats and cfg.get("hook_point"):
        try:
            from ..stats import load_stats

            return float(load_stats(stats)["mean_norm"].sel(hook=cfg["hook_point"]))
        except (UserError, KeyError, ValueError, OSError):
            return None
    return None
