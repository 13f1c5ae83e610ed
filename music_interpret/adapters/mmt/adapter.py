"""``mmt`` model adapter: loading, identity, hook points and patching for MMT; the data side
of its door (datasets, tokens, windows, rendering) is :class:`.data.MMTData`.

torch is imported inside the methods, so importing this module (and reading
``MMTAdapter.name``/``description``/``Config``) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import UserError
from ...interfaces import Batch, ModelAdapter, ModelInfo
from .data import MMTData

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .model import MMTModel
    from .windows import SongTokens, Window


@dataclass
class MMTAdapterConfig:
    """Options of the ``mmt`` adapter.

    ``dtype``: torch floating dtype the model runs in (``float32``, ``float64``, ...).
    ``max_seq_len``: longest sequence accepted (default: ``max_seq_len`` of
    ``train-args.json``; it may not exceed it for models with absolute positions).
    """

    dtype: str = "float32"
    max_seq_len: int | None = None


class MMTAdapter(MMTData, ModelAdapter):
    """Multitrack Music Transformer (MMT) checkpoints, reimplemented in plain torch."""

    name = "mmt"
    description = "Multitrack Music Transformer (Dong et al. 2023) checkpoints from MMT's train.py"
    Config = MMTAdapterConfig

    def __init__(self, config: MMTAdapterConfig | None = None) -> None:
        super().__init__(config)
        self._model: MMTModel | None = None
        self._train_args: dict[str, Any] = {}
        self._sha256 = ""
        self._device = "cpu"

    # -- loading -----------------------------------------------------------------------

    def load(self, model_dir: Path, device: str = "cpu") -> None:
        """Load ``<model_dir>/train-args.json`` and ``checkpoints/best_model.pt``."""
        from .loading import CHECKPOINT, load_mmt, sha256_file

        model, args = load_mmt(model_dir, device=device, dtype=self.config.dtype)
        limit = self.config.max_seq_len
        if limit is not None:
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 2:
                raise UserError(f"mmt adapter: max_seq_len={limit!r} must be an integer >= 2")
            if model.cfg.use_abs_pos and limit > model.cfg.max_seq_len:
                raise UserError(
                    f"mmt adapter: max_seq_len={limit} exceeds the {model.cfg.max_seq_len} "
                    f"learned positions of {Path(model_dir) / 'train-args.json'}"
                )
        self._model, self._train_args, self._device = model, args, device
        self._sha256 = sha256_file(Path(model_dir) / CHECKPOINT)

    def describe(self, model_dir: Path, device: str = "cpu") -> ModelInfo:
        """Width, hook points and parameter count from ``train-args.json`` alone; checks that
        the checkpoint file exists and that the model fits in ``device``'s memory."""
        from .loading import (
            CHECKPOINT,
            TRAIN_ARGS,
            check_model_memory,
            config_from_args,
            read_train_args,
        )
        from .model import hook_point_names

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise UserError(f"{model_dir}: MMT model directory not found")
        args = read_train_args(model_dir / TRAIN_ARGS)
        if not (model_dir / CHECKPOINT).is_file():
            raise UserError(f"{model_dir / CHECKPOINT}: MMT checkpoint not found")
        cfg = config_from_args(args)
        n_parameters = check_model_memory(cfg, model_dir / TRAIN_ARGS, device)
        return ModelInfo(cfg.dim, hook_point_names(cfg.layers), n_parameters)

    @property
    def model(self) -> MMTModel:
        """The loaded :class:`MMTModel` (eval mode)."""
        if self._model is None:
            raise RuntimeError("MMTAdapter: call load() first")
        return self._model

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return self.model.cfg.dim

    @property
    def n_layers(self) -> int:
        """Number of transformer layers."""
        return self.model.cfg.layers

    @property
    def max_seq_len(self) -> int:
        """Longest sequence (in codes) a forward pass accepts."""
        return self.config.max_seq_len or self.model.cfg.max_seq_len

    @property
    def max_beat(self) -> int:
        """Beats ``0..max_beat-1`` are representable (beat vocabulary ``max_beat + 1``)."""
        return self.model.cfg.n_tokens[1] - 1

    @property
    def train_args(self) -> dict[str, Any]:
        """A copy of ``train-args.json``."""
        return dict(self._train_args)

    @property
    def model_config(self) -> dict[str, Any]:
        """``train-args.json`` (what stores record as the model's configuration)."""
        self.model  # noqa: B018 - raises if not loaded
        return self.train_args

    @property
    def checkpoint_sha256(self) -> str:
        """SHA-256 of ``checkpoints/best_model.pt``."""
        self.model  # noqa: B018 - raises if not loaded
        return self._sha256

    # -- data --------------------------------------------------------------------------

    def encode(self, notes: np.ndarray, max_seq_len: int | None = None) -> np.ndarray:
        """Codes (T, 6) for notes (N, 5) as MMT's dataset makes them (no augmentation).

        Notes at beats >= ``max_beat`` are dropped when the song is longer; with
        ``max_seq_len`` the codes are cut to that length, keeping the end-of-song code.
        """
        from .representation import encode_song

        return encode_song(notes, max_beat=self.max_beat, max_seq_len=max_seq_len)

    def windows(self, notes: np.ndarray, stride: int | None = None) -> tuple[SongTokens, list[Window]]:
        """The whole song as tokens, and model windows covering every token once.

        See :mod:`music_interpret.adapters.mmt.windows` for the window layout, the
        stride (half a window of notes by default) and how ``seq_pos`` is defined.
        """
        from .windows import song_windows, tokenize_song

        song = tokenize_song(notes)
        return song, song_windows(song, self.max_seq_len, self.max_beat, stride)

    def check_encoding(self, encoding: Mapping[str, Any], source: str | Path) -> None:
        """Refuse a dataset whose ``encoding.json`` disagrees with the checkpoint's vocabularies."""
        from .model import FIELDS

        n_tokens = encoding.get("n_tokens") if isinstance(encoding, Mapping) else None
        if not isinstance(n_tokens, list) or len(n_tokens) != len(FIELDS):
            raise UserError(f"{source}: 'n_tokens' must be a list of {len(FIELDS)} sizes")
        model = list(self.model.cfg.n_tokens)
        for i, field in enumerate(FIELDS):
            if i == 1:  # MMT replaces the beat vocabulary with max_beat + 1
                continue
            if n_tokens[i] != model[i]:
                raise UserError(
                    f"{source}: {field} vocabulary {n_tokens[i]} does not match the checkpoint's "
                    f"{model[i]} (n_tokens {n_tokens} vs model {model})"
                )

    def token_metadata(self, codes: np.ndarray) -> Mapping[str, np.ndarray]:
        """Per-token metadata, see :func:`representation.token_metadata`."""
        from .representation import token_metadata

        return token_metadata(codes)

    def input_embeddings(self) -> tuple[list[str], torch.Tensor]:
        """Every row of the six field embeddings (code 0 of a field is ``<field>=none``),
        named by the value it encodes: ``type=note``, ``beat=3``, ``position=6``,
        ``pitch=C4``, ``duration=1/2``, ``instrument=violin``. Float32, on the model's device."""
        import torch

        from .model import FIELDS
        from .representation import CODE_TO_DURATION, INSTRUMENT_NAMES, TYPE_NAMES

        def value(field: str, code: int) -> str:
            if code == 0 and field != "type":
                return "none"
            if field == "type":
                return TYPE_NAMES[code] if code < len(TYPE_NAMES) else str(code)
            if field == "pitch":
                p = code - 1
                return f"{('C', 'C#', 'D', 'D#', 'E', 'F', 'F#', 'G', 'G#', 'A', 'A#', 'B')[p % 12]}{p // 12 - 1}"
            if field == "duration":
                from fractions import Fraction

                return str(Fraction(int(CODE_TO_DURATION[code]), 12))
            if field == "instrument":
                return INSTRUMENT_NAMES[code]
            return str(code - 1)

        names, rows = [], []
        for field, emb in zip(FIELDS, self.model.net.token_emb, strict=True):
            weight = emb.emb.weight.detach().float()
            names += [f"{field}={value(field, c)}" for c in range(weight.shape[0])]
            rows.append(weight)
        return names, torch.cat(rows)

    # -- forward passes ----------------------------------------------------------------

    def hook_points(self) -> list[str]:
        """``resid_pre.L``, ``resid_mid.L``, ``resid_post.L`` for each layer, ``final_norm``."""
        from .model import hook_point_names

        return hook_point_names(self.n_layers)

    def _check_hook(self, names: Sequence[str]) -> None:
        known = self.hook_points()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(
                f"mmt adapter: unknown hook point(s) {', '.join(map(str, unknown))}; "
                f"available: {', '.join(known)}"
            )

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch

        codes = torch.as_tensor(batch.codes, device=self._device)
        n_tokens = self.model.cfg.n_tokens
        if codes.ndim != 3 or codes.shape[-1] != len(n_tokens) or codes.is_floating_point():
            raise UserError(
                f"mmt adapter: batch codes must be integer (B, T, 6), got "
                f"{codes.dtype} {tuple(codes.shape)}"
            )
        if codes.shape[1] > self.max_seq_len:
            raise UserError(
                f"mmt adapter: sequence length {codes.shape[1]} exceeds "
                f"max_seq_len={self.max_seq_len}"
            )
        codes = codes.long()
        limit = torch.tensor(n_tokens, device=codes.device)
        bad = (codes < 0) | (codes >= limit)
        if bool(bad.any()):
            b, t, f = (int(i) for i in bad.nonzero()[0])
            from .model import FIELDS

            raise UserError(
                f"mmt adapter: code {int(codes[b, t, f])} of field {FIELDS[f]} "
                f"(row {b}, position {t}) is outside 0..{n_tokens[f] - 1}"
            )
        mask = batch.mask
        if mask is not None:
            mask = torch.as_tensor(mask, device=self._device).bool()
            if tuple(mask.shape) != tuple(codes.shape[:2]):
                raise UserError(
                    f"mmt adapter: mask shape {tuple(mask.shape)} does not match "
                    f"codes {tuple(codes.shape[:2])}"
                )
        return codes, mask

    def run_with_hooks(self, batch: Batch, hook_points: Sequence[str]) -> dict[str, torch.Tensor]:
        """One no-grad forward; returns {hook point: activation (B, T, d_model)}.

        The pass stops after the last requested hook point.
        """
        import torch

        self._check_hook(hook_points)
        codes, mask = self._inputs(batch)
        with torch.no_grad():
            _, acts = self.model.net.run(codes, mask, capture=hook_points, logits=False)
        return acts

    def _checked(self, hook_point: str,
                 fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fn`` refusing outputs of the wrong shape, cast back to the activation's dtype."""
        import torch

        def checked(x: torch.Tensor) -> torch.Tensor:
            out = fn(x)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(
                    f"mmt adapter: patch at {hook_point} returned {shape}, "
                    f"expected a tensor of shape {tuple(x.shape)}"
                )
            return out.to(x.dtype)

        return checked

    def patched_logits(
        self,
        batch: Batch,
        hook_point: str,
        fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """No-grad forward with ``fn(activation)`` replacing the activation at ``hook_point``
        (``None``: the clean model); the six fields' logits ``{field: (B, T, n_field)}`` (keys
        ``type``, ``beat``, ``position``, ``pitch``, ``duration``, ``instrument``), on the
        model's device in its dtype. Position t predicts code t+1."""
        import torch

        from .model import FIELDS

        self._check_hook([hook_point])
        codes, mask = self._inputs(batch)
        patch = None if fn is None else (hook_point, self._checked(hook_point, fn))
        with torch.no_grad():
            logits, _ = self.model.net.run(codes, mask, patch=patch)
        assert logits is not None
        return dict(zip(FIELDS, logits, strict=True))

    def run_with_patch(
        self,
        batch: Batch,
        hook_point: str,
        fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """No-grad forward with ``fn(activation)`` replacing the activation at ``hook_point``.

        Returns the next-token cross-entropy of each field (keys ``type``, ``beat``,
        ``position``, ``pitch``, ``duration``, ``instrument``) and their sum ``total``,
        as float32 scalars. The mean runs over real targets only (``mask[:, 1:]``).
        This differs from MMT's training loss, which runs on ``codes[:, :-1]`` and
        averages over every target position, padding included (class 0).
        """
        from .model import field_losses

        self._check_hook([hook_point])
        codes, mask = self._inputs(batch)
        if codes.shape[1] < 2:
            raise UserError("mmt adapter: run_with_patch needs sequences of at least 2 codes")
        logits = self.patched_logits(batch, hook_point, fn)
        return field_losses(list(logits.values()), codes, mask)

    def generate(
        self,
        prompt: np.ndarray,
        steps: int,
        *,
        seed: int,
        temperature: float = 1.0,
        filter_thres: float = 0.9,
        patch: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ) -> np.ndarray:
        """Up to ``steps`` new codes (n, 6) after ``prompt`` (T0, 6) by MMT's decoding rules
        (:mod:`.generate`: monotonic type and beat, stop after end-of-song), drawn from a
        ``torch.Generator`` on the model's device seeded with ``seed``; ``patch = (hook
        point, fn)`` is applied to every step's forward pass at every position."""
        import numpy as np
        import torch

        from .generate import generate

        if patch is not None:
            self._check_hook([patch[0]])
            patch = (patch[0], self._checked(patch[0], patch[1]))
        codes, _ = self._inputs(Batch(torch.as_tensor(np.asarray(prompt))[None], None))
        generator = torch.Generator(device=codes.device).manual_seed(int(seed))
        out = generate(self.model, codes, steps, temperature=temperature,
                       filter_thres=filter_thres, patch=patch, generator=generator)
        return out[0].cpu().numpy()

    def label_target(self, attribute: str, value: str) -> tuple[str, list[int] | None]:
        """See :func:`.labels.label_target`: the field of a label and, for ``next.X`` labels
        MMT predicts directly, the codes of that field that make up the value."""
        from .labels import label_target

        return label_target(attribute, value)
