"""Audio backend ``whisper-encoder``: the encoder of a Whisper model as a speech encoder.

Whisper's encoder (transformers ``WhisperModel``; the decoder is dropped after loading) reads a
log-mel spectrogram of a fixed 30 s window and gives one hidden state per 20 ms. Frozen, its
layers are among the strongest speech-emotion features known (EmoBox: Whisper-large-v3 encoder
0.75 on RAVDESS, actor-independent). Outputs, like ``hf-audio``: sequence = the configured
hidden state over the clip's real frames (the zero padding to 30 s is cut off), pooled = its
mean, layers = every hidden state's mean over those frames ``[L+1, D]``. Longer clips run in
30 s windows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from pipeline.stages.audio import _missing_model, embed_windows, hf_model_config, window_feature
from pipeline.stages.base import ClipContext, Stage, StageConfig, register

WINDOW_SECONDS = 30.0  # Whisper's encoder only accepts 30 s of log-mel frames
MEL_HOP = 160  # samples per log-mel frame at 16 kHz (10 ms); the encoder halves the rate


class WhisperEncoderConfig(StageConfig):
    model: str = "openai/whisper-large-v3"  # hub id or a local save_pretrained directory
    revision: str | None = None
    layer: int = -1  # index into the encoder's hidden states (0 = conv front end, -1 = last)
    batch_size: int = Field(4, ge=1, description="30 s windows per encoder call")


@register
class WhisperEncoderAudio(Stage):
    """Whisper's encoder (no decoder), batched across clips in 30 s windows."""

    name: ClassVar[str] = "audio"
    backend: ClassVar[str] = "whisper-encoder"
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = WhisperEncoderConfig
    config: WhisperEncoderConfig

    _model_config: Any = None

    def _hf_config(self) -> Any:
        if self._model_config is None:
            c = self.config
            cfg = hf_model_config(c.model, c.revision)
            if cfg.model_type != "whisper":
                raise ValueError(f"audio.model '{c.model}' is a {cfg.model_type!r} model; the "
                                 "whisper-encoder backend needs a Whisper checkpoint")
            self._model_config = cfg
        return self._model_config

    def load(self) -> None:
        from transformers import WhisperFeatureExtractor, WhisperModel

        c = self.config
        hc = self._hf_config()
        n_states = int(hc.encoder_layers) + 1
        if not -n_states <= c.layer < n_states:
            raise ValueError(f"audio.layer={c.layer} out of range for '{c.model}' ({n_states} hidden states)")
        try:
            self.extractor = WhisperFeatureExtractor.from_pretrained(c.model, revision=c.revision)
            whole = WhisperModel.from_pretrained(c.model, revision=c.revision)
        except (OSError, ValueError) as e:
            raise _missing_model(c.model, c.revision, e) from None
        self.encoder = whole.get_encoder().eval().to(self.device)
        del whole  # the decoder is never used
        self.sr = int(self.extractor.sampling_rate)
        self.window = int(WINDOW_SECONDS * self.sr)
        self.max_frames = int(hc.max_source_positions)

    def models(self) -> list[dict[str, str]]:
        c = self.config
        local = Path(c.model).expanduser().is_dir()
        return [{"id": c.model, "revision": c.revision or ("local" if local else "default"),
                 "descriptor": "WhisperModel encoder hidden states (decoder unused)"}]

    def output_dims(self) -> dict[str, tuple[int, int]]:
        d = int(self._hf_config().d_model)
        return {"audio": (d, d)}

    def layer_dims(self) -> dict[str, tuple[int, int]]:
        hc = self._hf_config()
        return {"audio": (int(hc.encoder_layers) + 1, int(hc.d_model))}

    def frames(self, n_samples: int) -> int:
        """Encoder frames (20 ms) that carry the first n samples of a window (at least one)."""
        return max(1, min(self.max_frames, math.ceil(n_samples / (2 * MEL_HOP))))

    def process(self, batch: list[ClipContext]) -> list[BaseException | None]:
        return embed_windows(
            self, batch,
            lambda x: [(s, x[s : s + self.window]) for s in range(0, len(x), self.window)],
            lambda parts: window_feature(parts, 2 * MEL_HOP, MEL_HOP, self.sr),
        )  # fmt: skip

    def process_one(self, ctx: ClipContext) -> None:
        err = self.process([ctx])[0]
        if err is not None:
            raise err

    def _run_windows(self, signals: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per window: the configured hidden state over its real frames [n, D] and every hidden
        state's mean over them [L+1, D] (the 30 s zero padding never enters either)."""
        import torch

        out: list[tuple[np.ndarray, np.ndarray]] = []
        bs = self.config.batch_size
        for i in range(0, len(signals), bs):
            part = signals[i : i + bs]
            feats = self.extractor(part, sampling_rate=self.sr, return_tensors="pt",
                                   padding="max_length")["input_features"]  # fmt: skip
            with torch.inference_mode():
                states = self.encoder(feats.to(self.device), output_hidden_states=True).hidden_states
            stack = torch.stack(states, dim=1)  # [B, L+1, 1500, D]
            for row, sig in enumerate(part):
                mine = stack[row, :, : self.frames(len(sig))].float()
                out.append((mine[self.config.layer].cpu().numpy(), mine.mean(dim=1).cpu().numpy()))
        return out
