"""``hf_remi`` model adapter: a HuggingFace ``transformers`` causal LM over MidiTok REMI
tokens of an MMT notes dataset (see :mod:`.remi` for the tokens and their coordinates,
:mod:`.model` for the hook points).

One input row is one token id, so a batch is ``codes`` (B, T) and the model has a
single output field, ``token``: position t predicts token t+1 of the window, whatever its
event type (after a ``Program`` token the pitch, after a ``Pitch`` token the duration).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from music_interpret.plugin import (
    Batch,
    EventVocabulary,
    ModelAdapter,
    ModelInfo,
    NoteTable,
    SongTokens,
    UserError,
    Window,
    window_ranges,
)

from . import remi
from .labels import label_target

if TYPE_CHECKING:
    import torch

    from .dataset import NotesFolder

FIELD = "token"
EMBED_NOTE = "the token's row of the input embedding (wte) rebuilt from its coordinates; no position embedding"


@dataclass
class HFRemiConfig:
    """Options of the ``hf_remi`` adapter: ``dtype`` the model runs in; ``max_seq_len``
    the window length (default: the model's position limit)."""

    dtype: str = "float32"
    max_seq_len: int | None = None


class HFRemiAdapter(ModelAdapter):
    """A ``transformers`` causal LM (``save_pretrained`` folder plus ``miditok.json``)."""

    name = "hf_remi"
    description = "HuggingFace causal LM over MidiTok REMI tokens of a notes dataset"
    Config = HFRemiConfig

    def __init__(self, config: HFRemiConfig | None = None) -> None:
        super().__init__(config)
        self._model: Any = None
        self._sha256 = ""
        self._config: dict[str, Any] = {}
        self._device = "cpu"
        self._tokenizer: Any = None
        self._vocab: remi.Vocabulary | None = None
        self._hooks: Any = None

    # -- identity ------------------------------------------------------------------------

    def load(self, model_dir: Path, device: str = "cpu") -> None:
        """Load ``config.json``, ``model.safetensors`` and ``miditok.json`` (local files only)."""
        from .model import WEIGHTS, Hooks, check_model_dir, load_model, sha256_file

        model_dir = check_model_dir(model_dir)
        self._load_tokenizer(model_dir)
        model = load_model(model_dir, device, self.config.dtype)
        if model.config.vocab_size < self.vocab.size:
            raise UserError(f"{model_dir}: vocab_size {model.config.vocab_size} is smaller than the "
                            f"tokenizer's {self.vocab.size}")
        self._model, self._device = model, device
        self._hooks = Hooks(model)
        self._config = {**model.config.to_dict(), "max_seq_len": self.max_seq_len,
                        "tokenizer": self._tokenizer.to_dict()}
        self._sha256 = sha256_file(model_dir / WEIGHTS)

    def _load_tokenizer(self, model_dir: Path) -> None:
        path = Path(model_dir) / remi.TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"{path}: the tokenizer's parameters are missing")
        self._tokenizer = remi.load_tokenizer(path)
        self._vocab = remi.Vocabulary(self._tokenizer)

    def describe(self, model_dir: Path, device: str = "cpu") -> ModelInfo:
        """Width, hook points and size from ``config.json`` and the weights' header."""
        from .model import count_parameters, hook_point_names, load_config

        cfg = load_config(model_dir)
        if not (Path(model_dir) / remi.TOKENIZER_FILE).is_file():
            raise UserError(f"{Path(model_dir) / remi.TOKENIZER_FILE}: the tokenizer's parameters are missing")
        return ModelInfo(int(cfg.hidden_size), hook_point_names(int(cfg.num_hidden_layers)),
                         count_parameters(model_dir))

    @property
    def model(self) -> Any:
        """The loaded causal LM (eval mode)."""
        if self._model is None:
            raise RuntimeError("HFRemiAdapter: call load() first")
        return self._model

    @property
    def vocab(self) -> remi.Vocabulary:
        """The REMI vocabulary: event type and value of every token id."""
        if self._vocab is None:
            self._tokenizer = remi.make_tokenizer()
            self._vocab = remi.Vocabulary(self._tokenizer)
        return self._vocab

    @property
    def tokenizer(self) -> Any:
        """The MidiTok REMI tokenizer (the loaded model's, else the demo's)."""
        self.vocab  # noqa: B018 - makes the demo's when none is loaded
        return self._tokenizer

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def checkpoint_sha256(self) -> str:
        """SHA-256 of ``model.safetensors``."""
        self.model  # noqa: B018 - raises if not loaded
        return self._sha256

    @property
    def model_config(self) -> dict[str, Any]:
        """``config.json``, the window length ``max_seq_len`` and the tokenizer's parameters."""
        self.model  # noqa: B018 - raises if not loaded
        return dict(self._config)

    @property
    def max_seq_len(self) -> int:
        """Window length: the config's value, else the model's position limit."""
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 1024)
        chosen = self.config.max_seq_len or limit
        if not 2 <= chosen <= limit:
            raise UserError(f"hf_remi adapter: max_seq_len={chosen} must be between 2 and {limit}")
        return chosen

    def hook_points(self) -> list[str]:
        """``resid_pre.L``, ``resid_post.L`` per block, ``final_norm``."""
        from .model import hook_point_names

        return hook_point_names(int(self.model.config.num_hidden_layers))

    # -- data ----------------------------------------------------------------------------

    def open_dataset(self, path: Path, split: str | None = None) -> NotesFolder:
        """A notes folder (``data/base/bach_notes``), see :mod:`.dataset`."""
        from .dataset import NotesFolder

        return NotesFolder(path, split)

    def event_vocabulary(self) -> EventVocabulary:
        """REMI's event types (``Pitch`` carries a note, ``EOS`` ends a song), instruments by
        General MIDI program (code ``program + 1``), the durations Duration tokens express."""
        return EventVocabulary(remi.EVENTS, remi.NOTE, remi.END, remi.instrument_names(),
                               self.vocab.durations)

    def tokenize(self, song: np.ndarray) -> SongTokens:
        """BOS, the song's REMI tokens, EOS, with coordinates (:func:`.remi.token_coordinates`);
        notes outside the pitch range count as dropped."""
        ids = remi.encode_notes(self.tokenizer, song)
        coords = remi.token_coordinates(self.vocab, ids)
        kept = int(np.sum(coords["event_type"] == remi.NOTE))
        return SongTokens(ids, coords, max(0, len(song) - kept), ids)

    def song_windows(self, tokens: SongTokens, stride: int | None = None) -> list[Window]:
        """Windows of ``max_seq_len`` tokens every ``stride`` tokens (default half a window),
        each token owned by the first window holding it (:func:`window_ranges`)."""
        out, owned_until = [], 0
        for start, end in window_ranges(len(tokens), self.max_seq_len, stride):
            if end <= owned_until:
                continue
            owned = np.arange(start, end) >= owned_until
            out.append(Window(np.asarray(tokens.inputs[start:end], np.int64), np.arange(start, end), owned))
            owned_until = end
        return out

    def pad(self, inputs: Sequence[np.ndarray]) -> Batch:
        """Token ids (L_i,) padded with PAD (id 0) into (B, T)."""
        import torch

        t = max(len(x) for x in inputs)
        codes = np.full((len(inputs), t), self.vocab.pad, np.int64)
        mask = np.zeros((len(inputs), t), bool)
        for i, x in enumerate(inputs):
            codes[i, : len(x)], mask[i, : len(x)] = x, True
        return Batch(torch.from_numpy(codes), torch.from_numpy(mask))

    def token_metadata(self, codes: np.ndarray) -> Mapping[str, np.ndarray]:
        """Coordinates of token ids (beats counted from the first Bar among them)."""
        return remi.token_coordinates(self.vocab, np.asarray(codes, np.int64).reshape(-1))

    def render_notes(self, tokens: SongTokens) -> NoteTable:
        """One note per Pitch token, with the duration of its Duration token and its program."""
        c = tokens.coords
        rows = np.flatnonzero(np.asarray(c["event_type"]) == remi.NOTE)
        names = remi.instrument_names()
        program = np.asarray(c["program"])[rows]
        return NoteTable(rows.astype(np.int64), *(np.asarray(c[k])[rows] for k in ("beat", "position", "pitch")),
                         np.maximum(np.asarray(c["duration"])[rows], 1), program,
                         np.asarray([names[p + 1] if 0 <= p < 128 else "" for p in program], dtype=object))

    def transpose(self, song: np.ndarray, semitones: int) -> np.ndarray | None:
        """The notes moved by ``semitones``; None when one leaves the tokenizer's pitch range."""
        notes = np.array(song, np.int64, copy=True)
        notes[:, 2] += int(semitones)
        low, high = self.vocab.pitch_range
        if len(notes) and (notes[:, 2].min() < low or notes[:, 2].max() > high):
            return None
        return notes

    def input_embeddings(self) -> tuple[list[str], torch.Tensor]:
        """Rows of the token embedding named ``pitch=C4``, ``position=6``, ``bar``, ..."""
        weight = self.model.get_input_embeddings().weight.detach().float()
        return [self.vocab.row_name(i) for i in range(weight.shape[0])], weight

    def embed_coordinates(self, coords: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
        """Each token's embedding row, its id rebuilt from event type and value."""
        ids = self.vocab.ids_from_coords(coords)
        weight = self.model.get_input_embeddings().weight.detach().float().cpu().numpy()
        return np.where((ids >= 0)[:, None], weight[np.maximum(ids, 0)], 0.0).astype(np.float32), EMBED_NOTE

    # -- forward passes ------------------------------------------------------------------

    def _check_hook(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.hook_points()]
        if unknown:
            raise UserError(f"hf_remi adapter: unknown hook point(s) {', '.join(unknown)}; "
                            f"available: {', '.join(self.hook_points())}")

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        ids = torch.as_tensor(batch.codes, device=self._device)
        if ids.ndim != 2 or ids.is_floating_point():
            raise UserError(f"hf_remi adapter: batch codes must be integer (B, T), got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > self.max_seq_len:
            raise UserError(f"hf_remi adapter: sequence length {ids.shape[1]} exceeds max_seq_len={self.max_seq_len}")
        mask = torch.ones_like(ids, dtype=torch.bool) if batch.mask is None \
            else torch.as_tensor(batch.mask, device=self._device).bool()
        return ids.long(), mask

    def _logits(self, batch: Batch, capture: Sequence[str] = (),
                patch: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                stop: bool = False) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        import torch

        ids, mask = self._inputs(batch)
        logits = None
        with torch.no_grad(), self._hooks.active(capture, patch, stop) as acts:
            logits = self.model(input_ids=ids, attention_mask=mask.long()).logits
        return logits, acts

    def run_with_hooks(self, batch: Batch, hook_points: Sequence[str]) -> dict[str, torch.Tensor]:
        """Activations (B, T, d_model) at ``hook_points``; the pass stops after the last."""
        self._check_hook(hook_points)
        return self._logits(batch, list(hook_points), stop=True)[1]

    def _checked(self, hook_point: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        import torch

        def checked(x: torch.Tensor) -> torch.Tensor:
            out = fn(x)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                raise UserError(f"hf_remi adapter: patch at {hook_point} must return shape {tuple(x.shape)}")
            return out.to(x.dtype)

        return checked

    def patched_logits(self, batch: Batch, hook_point: str,
                       fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``{"token": (B, T, vocab)}`` with ``fn`` replacing the activation at ``hook_point``."""
        self._check_hook([hook_point])
        patch = None if fn is None else (hook_point, self._checked(hook_point, fn))
        logits, _ = self._logits(batch, patch=patch)
        assert logits is not None
        return {FIELD: logits}

    def run_with_patch(self, batch: Batch, hook_point: str,
                       fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy over real targets: ``{"token": ce, "total": ce}``."""
        import torch

        ids, mask = self._inputs(batch)
        if ids.shape[1] < 2:
            raise UserError("hf_remi adapter: run_with_patch needs sequences of at least 2 tokens")
        logits = self.patched_logits(batch, hook_point, fn)[FIELD][:, :-1].float()
        keep = mask[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep])
        return {FIELD: ce, "total": ce}

    def generate(self, prompt: np.ndarray, steps: int, *, seed: int, temperature: float = 1.0,
                 filter_thres: float = 0.9,
                 patch: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> np.ndarray:
        """Up to ``steps`` tokens sampled after ``prompt`` (top-k keeping ``1 - filter_thres``
        of the vocabulary, at ``temperature``), stopping after EOS; the context is the last
        ``max_seq_len`` tokens; ``patch`` applies at every step."""
        from .generate import sample

        if patch is not None:
            self._check_hook([patch[0]])
            patch = (patch[0], self._checked(patch[0], patch[1]))
        return sample(self, np.asarray(prompt, np.int64).reshape(-1), steps, seed=seed,
                      temperature=temperature, filter_thres=filter_thres, patch=patch)

    def label_target(self, attribute: str, value: str) -> tuple[str, list[int] | None]:
        """See :func:`.labels.label_target`."""
        return label_target(self.vocab, attribute, value)
