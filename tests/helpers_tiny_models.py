"""Tiny random-initialised models of the full preset's real architectures, saved locally.

The full preset's encoders (WavLM, RoBERTa, CLIP vision; wav2vec2, BERT and the Whisper
encoder as alternatives) are loaded exactly as real
checkpoints are (``from_pretrained`` on a ``save_pretrained`` folder), but with a few
thousand random weights so that the whole path runs on a CPU in seconds and needs no
network. Hidden sizes differ per modality, so a test can tell which model made which array.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

AUDIO_DIM = 32  # wav2vec2 / WavLM hidden size
TEXT_DIM = 24  # BERT / RoBERTa hidden size
VISION_DIM = 40  # CLIP vision tower hidden size
WHISPER_DIM = 16  # Whisper d_model
# hidden states kept per clip in `layers` (embeddings + blocks) by each tiny model
AUDIO_STATES, TEXT_STATES, VISION_STATES, WHISPER_STATES = 3, 3, 3, 2

# a small WordPiece vocabulary: specials, a few English words, pieces, and the CJK
# characters of the real clips' subtitles that a BERT tokenizer splits one by one
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
         "i", "am", "so", "happy", "sad", "we", "won", "lost", "it", "is", "ok", "not",
         "good", "hello", "world", "the", "game", "today", "what", "a", "day", "you",
         "want", "some", "milk", "going", "shopping", ".", "!", "?", ",", "'",
         "##s", "##ed", "##ing", "##ly",
         "我", "你", "的", "是", "不", "了", "在", "有", "这", "一", "个", "人"]  # fmt: skip


@dataclass(frozen=True)
class TinyModels:
    audio: Path
    text: Path
    vision: Path
    asr: Path | None = None

    def overrides(self) -> list[str]:
        """`--set` strings that point the full preset at these folders."""
        out = [f'audio.model="{self.audio}"', f'text.model="{self.text}"',
               f'visual.model="{self.vision}"']  # fmt: skip
        if self.asr is None:
            return [*out, "asr.backend=none"]
        # a random model rarely emits end-of-text: bound its output
        return [*out, f'asr.model="{self.asr}"', "asr.max_new_tokens=16", "asr.vad=false"]


def save_wav2vec2(path: Path, sample_rate: int = 16000) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(
        hidden_size=AUDIO_DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True,
    )  # fmt: skip
    torch.manual_seed(0)
    Wav2Vec2Model(cfg).eval().save_pretrained(path)
    return _save_audio_extractor(path, sample_rate)


def _save_audio_extractor(path: Path, sample_rate: int) -> Path:
    """The wav2vec2-family feature extractor beside a tiny audio model (normalised, masked)."""
    from transformers import Wav2Vec2FeatureExtractor

    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=sample_rate, padding_value=0.0, do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(path)  # fmt: skip
    return path


def save_wavlm(path: Path, sample_rate: int = 16000) -> Path:
    """A WavLM (the full preset's default audio architecture), 2 layers of width AUDIO_DIM."""
    import torch
    from transformers import WavLMConfig, WavLMModel

    cfg = WavLMConfig(
        hidden_size=AUDIO_DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True, num_buckets=32, max_bucket_distance=80,
    )  # fmt: skip
    torch.manual_seed(0)
    WavLMModel(cfg).eval().save_pretrained(path)
    return _save_audio_extractor(path, sample_rate)


def save_roberta(path: Path) -> Path:
    """A RoBERTa encoder (the full preset's default text architecture) with the small
    WordPiece vocabulary (a tokenizer is not the architecture under test)."""
    import torch
    from transformers import BertTokenizer, RobertaConfig, RobertaModel

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizer(vocab_file=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    cfg = RobertaConfig(vocab_size=len(VOCAB), hidden_size=TEXT_DIM, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=48, max_position_embeddings=160,
                        pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    RobertaModel(cfg, add_pooling_layer=False).eval().save_pretrained(path)
    return path


def save_bert(path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizer(vocab_file=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=TEXT_DIM, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=160)  # fmt: skip
    torch.manual_seed(0)
    BertModel(cfg).eval().save_pretrained(path)
    return path


def save_clip_vision(path: Path) -> Path:
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=VISION_DIM, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    torch.manual_seed(0)
    CLIPVisionModel(cfg).eval().save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32},
                          crop_size={"height": 32, "width": 32}).save_pretrained(path)  # fmt: skip
    return path


WHISPER_LANGS = ("en", "zh", "de")


def save_whisper(path: Path) -> Path:
    """A Whisper model (1 encoder + 1 decoder layer, d_model 16) with a byte-level BPE
    tokenizer of the 256 byte symbols plus Whisper's special and timestamp tokens, and the
    generation config real checkpoints carry (languages, tasks, timestamp ids)."""

    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    path.mkdir(parents=True, exist_ok=True)
    # byte-level BPE symbols: printable bytes stand for themselves, the others are shifted
    # past 255 (the GPT-2 / Whisper byte alphabet)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab = {ch: i for i, ch in enumerate(symbols)}
    specials = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{lang}|>" for lang in WHISPER_LANGS),
                "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                "<|nocaptions|>", "<|notimestamps|>"]  # fmt: skip
    specials += [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    for t in specials:
        vocab[t] = len(vocab)
    tok = WhisperTokenizer(vocab=dict(vocab), merges=[], bos_token="<|endoftext|>",
                           eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                           pad_token="<|endoftext|>")  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    ids = {t: vocab[t] for t in specials}
    cfg = WhisperConfig(
        vocab_size=len(vocab), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=448,
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"], decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=None, suppress_tokens=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
        lang_to_id={f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in WHISPER_LANGS},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=True, max_initial_timestamp_index=50, max_length=448,
        begin_suppress_tokens=[], suppress_tokens=[],
    )  # fmt: skip
    model.save_pretrained(path)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                     tokenizer=tok).save_pretrained(path)  # fmt: skip
    return path


def save_tiny_models(root: Path, asr: bool = False) -> TinyModels:
    """WavLM + RoBERTa + CLIP vision tower (the full preset's default architectures; + Whisper
    when `asr`) under `root` (one save_pretrained folder each). Without `asr`, `overrides()`
    turns the asr stage off."""
    root = Path(root)
    return TinyModels(
        audio=save_wavlm(root / "wavlm"),
        text=save_roberta(root / "roberta"),
        vision=save_clip_vision(root / "clip_vision"),
        asr=save_whisper(root / "whisper") if asr else None,
    )
