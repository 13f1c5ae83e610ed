"""Loading a HuggingFace causal LM from a local folder, and its hook points through torch
forward hooks on the decoder blocks.

Hook points (hooks registered once, per-pass state thread-local): ``resid_pre.L`` (the residual stream entering block L, a forward pre-hook;
``resid_pre.0`` is the token plus position embedding), ``resid_post.L`` (leaving block
L) and ``final_norm`` (after the final layer norm, what the LM head reads). Blocks are
``transformer.h`` (GPT-2) or ``model.layers`` (Llama, Mistral, ...), found through
``model.base_model``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from music_interpret.plugin import UserError

WEIGHTS = "model.safetensors"
Patch = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


def hook_point_names(layers: int) -> list[str]:
    """``resid_pre.L``, ``resid_post.L`` for each layer, then ``final_norm``."""
    return [f"{kind}.{i}" for i in range(layers) for kind in ("resid_pre", "resid_post")] + ["final_norm"]


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_model_dir(model_dir: Path) -> Path:
    """``model_dir`` when it holds ``config.json`` and ``model.safetensors``; else ``UserError``."""
    model_dir = Path(model_dir)
    for name in ("config.json", WEIGHTS):
        if not (model_dir / name).is_file():
            raise UserError(f"{model_dir / name}: not found (a save_pretrained folder is expected)")
    return model_dir


def load_config(model_dir: Path) -> Any:
    """The model's ``transformers`` config, from local files only."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(check_model_dir(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir}: cannot read config.json: {exc}") from None


def load_model(model_dir: Path, device: str, dtype: str) -> Any:
    """The causal LM in eval mode on ``device`` in ``dtype``, from local files only."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise UserError(f"hf_remi adapter: dtype {dtype!r} is not a torch floating dtype")
    quiet = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on every load
    try:
        model = AutoModelForCausalLM.from_pretrained(check_model_dir(model_dir), local_files_only=True,
                                                     dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir}: cannot load the model: {exc}") from None
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def count_parameters(model_dir: Path) -> int:
    """Parameters in ``model.safetensors``, read from its header."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(model_dir) / WEIGHTS), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= int(d)
            total += n
    return total


def blocks_and_norm(model: Any) -> tuple[Sequence[torch.nn.Module], torch.nn.Module]:
    """The decoder blocks and the final norm of a causal LM."""
    base = model.base_model
    blocks = next((getattr(base, n) for n in ("h", "layers") if hasattr(base, n)), None)
    norm = next((getattr(base, n) for n in ("ln_f", "norm", "final_layer_norm") if hasattr(base, n)), None)
    if blocks is None or norm is None:
        raise UserError(f"hf_remi adapter: {type(model).__name__} has no transformer.h/ln_f or "
                        "model.layers/norm to hook")
    return blocks, norm


class _Stop(Exception):
    """Raised by the last capture hook to end a pass nothing more is needed from."""


@dataclass
class _Pass:
    """What the hooks do in one forward pass of one thread."""

    capture: frozenset[str]
    patch: Patch | None
    stop: bool
    acts: dict[str, torch.Tensor] = field(default_factory=dict)


class Hooks:
    """Forward hooks registered once on a model's blocks and final norm; each pass sets
    what they capture and patch in a thread-local :class:`_Pass`, so threads running
    passes on the same model at once (the extract stage's workers) do not mix."""

    def __init__(self, model: Any) -> None:
        blocks, norm = blocks_and_norm(model)
        self._local = threading.local()
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(self._pre(f"resid_pre.{i}"), with_kwargs=True)
            block.register_forward_hook(self._post(f"resid_post.{i}"))
        norm.register_forward_hook(self._post("final_norm"))

    def _visit(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        state: _Pass | None = getattr(self._local, "state", None)
        if state is None:
            return None
        new = state.patch[1](x) if state.patch is not None and state.patch[0] == name else None
        if name in state.capture:
            state.acts[name] = (x if new is None else new).detach()
            if state.stop and len(state.acts) == len(state.capture):
                raise _Stop
        return new

    def _pre(self, name: str) -> Callable[..., Any]:
        def hook(mod: Any, args: tuple, kwargs: dict) -> Any:
            new = self._visit(name, args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
        return hook

    def _post(self, name: str) -> Callable[..., Any]:
        def hook(mod: Any, args: tuple, out: Any) -> Any:
            new = self._visit(name, out[0] if isinstance(out, tuple) else out)
            if new is None:
                return None
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return hook

    @contextmanager
    def active(self, capture: Sequence[str] = (), patch: Patch | None = None,
               stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """One pass in this thread: the dict yielded fills with the activation at each
        ``capture`` hook point; ``patch = (hook point, fn)`` replaces one activation by
        ``fn(activation)``; with ``stop`` the pass ends once all are captured."""
        state = _Pass(frozenset(capture), patch, stop)
        self._local.state = state
        try:
            yield state.acts
        except _Stop:
            pass
        finally:
            self._local.state = None
