"""Load an MMT run directory: ``train-args.json`` + ``checkpoints/best_model.pt``.

Every user mistake raises :class:`UserError` with a one-line message naming the file.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import UserError
from . import representation as rep

if TYPE_CHECKING:
    import torch

    from .model import MMTConfig, MMTModel

TRAIN_ARGS = "train-args.json"
CHECKPOINT = Path("checkpoints") / "best_model.pt"
_INT_KEYS = ("dim", "layers", "heads", "max_seq_len", "max_beat")
_PREFIX = "decoder.net."


def read_train_args(path: Path) -> dict[str, Any]:
    """Read and check ``train-args.json`` (extra keys are tolerated)."""
    if not path.is_file():
        raise UserError(f"{path}: MMT train-args.json not found")
    try:
        args = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read JSON ({err})") from None
    if not isinstance(args, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(args).__name__}")
    for key in _INT_KEYS:
        value = args.get(key)
        if key not in args:
            raise UserError(f"{path}: missing key {key!r}")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{path}: {key}={value!r} must be a positive integer")
    for key, default in (("abs_pos_emb", True), ("rel_pos_emb", False)):
        value = args.get(key, default)
        if not isinstance(value, bool):
            raise UserError(f"{path}: {key}={value!r} must be true or false")
    dropout = args.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise UserError(f"{path}: dropout={dropout!r} must be a number in [0, 1)")
    return args


def config_from_args(args: dict[str, Any], n_tokens: list[int] | None = None) -> MMTConfig:
    """Build the :class:`MMTConfig` MMT's ``train.py`` would build from ``args``."""
    from .model import MMTConfig

    n = list(n_tokens if n_tokens is not None else rep.N_TOKENS)
    n[1] = args["max_beat"] + 1  # MMT replaces the beat vocabulary
    return MMTConfig(
        dim=args["dim"],
        layers=args["layers"],
        heads=args["heads"],
        max_seq_len=args["max_seq_len"],
        n_tokens=tuple(n),
        abs_pos_emb=args.get("abs_pos_emb", True),
        rel_pos_emb=args.get("rel_pos_emb", False),
        dropout=float(args.get("dropout", 0.0)),
    )


def describe_checkpoint(state: dict[str, Any]) -> str:
    """Guess the MMT variant a state dict holds, e.g. ``rotary MMT, 3 layers, dim 64, 2 heads``."""
    layer_ids = [int(m.group(1)) for k in state
                 if (m := re.match(r".*attn_layers\.layers\.(\d+)\.", k))]  # fmt: skip
    layers = (max(layer_ids) + 2) // 2 if layer_ids else 0
    if any(k.endswith("rotary_pos_emb.inv_freq") for k in state):
        pos = "rotary"
    elif any(k.endswith("pos_emb.emb.weight") for k in state):
        pos = "abs-pos"
    else:
        pos = "no-pos"
    norm = state.get(_PREFIX + "norm.weight")
    dim = tuple(norm.shape)[0] if norm is not None and hasattr(norm, "shape") else "?"
    q = state.get(_PREFIX + "attn_layers.layers.0.1.to_q.weight")
    heads = tuple(q.shape)[0] // 64 if q is not None and hasattr(q, "shape") else "?"
    return f"{pos} MMT, {layers} layers, dim {dim}, {heads} heads"


def _short(keys: list[str], n: int = 6, group: bool = True) -> str:
    """At most ``n`` entries; with ``group`` a layer's keys collapse to ``...layers.{i}.*``."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        if not group:
            groups[key] = [key]
            continue
        groups.setdefault(re.sub(r"(attn_layers\.layers\.\d+)\..*", r"\1.*", key), []).append(key)
    items = [g if len(members) > 1 else members[0] for g, members in groups.items()]
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors."""
    import torch

    if not path.is_file():
        raise UserError(f"{path}: MMT checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot load checkpoint with weights_only=True ({msg})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state_dict of tensors, got {type(state).__name__}")
    return state


def count_parameters(cfg: MMTConfig) -> int:
    """Parameters and buffers of the model ``cfg`` describes, counted without allocating them.

    The model is built on the meta device. ``nn.init.normal_`` (the embeddings' init) has no
    meta kernel and would load torch's compiler stack (about 2 s of imports) to fill values
    that do not exist, so it leaves meta tensors alone here (other tensors, as always).
    """
    import torch
    from torch.nn import init

    from .model import MMTModel

    with _META_INIT_LOCK:
        original = init.normal_

        def normal_(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return tensor if tensor.is_meta else original(tensor, *args, **kwargs)

        init.normal_ = normal_  # type: ignore[assignment]
        try:
            with torch.device("meta"):
                model = MMTModel(cfg)
        finally:
            init.normal_ = original  # type: ignore[assignment]
    return sum(t.numel() for t in model.state_dict().values())


_META_INIT_LOCK = threading.Lock()


def check_model_memory(cfg: MMTConfig, args_path: Path, device: str, itemsize: int = 4) -> int:
    """Refuse a ``train-args.json`` whose model would not fit in memory (before building it);
    returns the model's parameter count."""
    from ...resources import check_memory

    n = count_parameters(cfg)
    # the checkpoint's tensors and the model's are held at once while loading
    check_memory(n * (4 + itemsize), f"{args_path}: the model it describes ({n:,} parameters, "
                 f"max_seq_len {cfg.max_seq_len}, dim {cfg.dim}, {cfg.layers} layers)", device)
    return n


def check_finite(state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint holding NaN or infinite weights, naming the first such tensor."""
    import torch

    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{path}: tensor {key!r} holds {bad} NaN or infinite value(s); "
                            "the checkpoint is broken (a diverged or corrupted training run?)")


def upcast_half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with float16 and bfloat16 tensors converted to float32 (the rest as is).

    Our trainer can store ``best_model.pt`` in half precision (``--save-dtype``); MMT's
    own checkpoints are float32 and pass through untouched.
    """
    import torch

    half = (torch.float16, torch.bfloat16)
    if not any(v.dtype in half for v in state.values()):
        return state
    return {k: v.float() if v.dtype in half else v for k, v in state.items()}


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def torch_float_dtype(name: str) -> torch.dtype:
    """``torch.<name>`` if it is a floating-point dtype, else ``UserError``."""
    import torch

    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UserError(
            f"dtype={name!r} is not a torch floating-point dtype (e.g. float32, float64, bfloat16)"
        )
    return value


def load_mmt(
    model_dir: str | Path, device: str = "cpu", dtype: str = "float32"
) -> tuple[MMTModel, dict[str, Any]]:
    """Load ``<model_dir>/train-args.json`` and ``checkpoints/best_model.pt``.

    Returns ``(model, train_args)``; the model is in eval mode on ``device``.
    Half-precision checkpoints (float16/bfloat16 parameters) are upcast to float32
    first, the dtype being read from the tensors themselves.
    """
    from .model import MMTModel

    torch_dtype = torch_float_dtype(dtype)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: MMT model directory not found")
    args_path, ckpt_path = model_dir / TRAIN_ARGS, model_dir / CHECKPOINT
    args = read_train_args(args_path)
    cfg = config_from_args(args)
    check_model_memory(cfg, args_path, device, torch_dtype.itemsize)
    state = read_checkpoint(ckpt_path)
    check_finite(state, ckpt_path)
    model = MMTModel(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"{ckpt_path}: keys do not match {args_path.name} (expected {cfg.describe()}; "
            f"checkpoint looks like {describe_checkpoint(state)}); "
            f"missing: [{_short(missing)}]; unexpected: [{_short(unexpected)}]"
        )
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
           for k, v in expected.items() if state[k].shape != v.shape]  # fmt: skip
    if bad:
        raise UserError(
            f"{ckpt_path}: tensor shapes do not match {args_path.name} "
            f"(checkpoint vs expected {cfg.describe()}, n_tokens {list(cfg.n_tokens)}): "
            f"{_short(bad, 3, group=False)}"
        )
    model.load_state_dict(upcast_half(state), strict=True)
    try:
        model = model.to(device=device, dtype=torch_dtype)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"device={device!r}: cannot move the model there ({err})") from None
    return model.eval(), args
