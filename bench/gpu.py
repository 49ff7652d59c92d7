"""The full preset's models on an accelerator: random-initialised real architectures, batch sweep.

Each model the full preset runs is built from its configuration at its real size — no
download, random weights (a throughput bench does not need trained ones):

    separate  demucs HTDemucs, 4 sources (the htdemucs architecture), stereo 44.1 kHz input
    asr       Whisper-small encoder (d_model 768, 12 layers, 80 mel bins, 30-s window)
    audio     WavLM base-plus (768, 12 layers, conv feature encoder), 16 kHz
    text      RoBERTa-base (768, 12 layers), `--texts` strings of `--tokens` tokens per clip
    visual    CLIP ViT-B/32 vision tower (224 px, patch 32) on `--faces` face crops per clip

over synthetic clips of `--seconds` s (random inputs of the shapes the stages feed them), at
each batch size (clips per forward; default 1/8/32/64). Per stage and batch size it prints
clips/s, media-seconds per wall-second, peak GPU memory (torch.cuda.max_memory_allocated)
and GPU utilisation (NVML, sampled every 50 ms while the stage runs; "n/a" on CPU). The whole
preset's figure runs the stages one after another at each stage's best batch size: 1 / sum of
the stages' seconds per media-second, against the goal (>= 100x real time on one GPU).

What it does not time: media decoding, OCR (rapidocr, CPU), face detection (MTCNN) and the
cache writes — bench/extract.py times those through the real runner.

    bench/gpu.sh                           # --device cuda, all batch sizes (< 8 min on one GPU)
    .venv/bin/python bench/gpu.py --quick  # CPU smoke run: batch sizes 1 and 2, short clips
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GOAL_RT = 100.0  # issue 16: the whole full preset >= 100x real time on one data-centre GPU


@dataclass
class Model:
    name: str
    arch: str
    module: Any
    make_input: Callable[[int], tuple]  # batch size -> forward args


def build_models(device: str, seconds: float, texts: int, tokens: int, faces: int, only: set[str] | None) -> list[Model]:
    import torch

    torch.manual_seed(0)
    out: list[Model] = []

    def want(n: str) -> bool:
        return only is None or n in only

    if want("separate"):
        from demucs.htdemucs import HTDemucs

        m = HTDemucs(sources=["drums", "bass", "other", "vocals"], samplerate=44100, segment=max(seconds, 1.0))
        n = int(seconds * 44100)
        out.append(Model("separate", "demucs htdemucs", m, lambda b, n=n: (torch.randn(b, 2, n, device=device),)))
    if want("asr"):
        from transformers import WhisperConfig, WhisperModel

        cfg = WhisperConfig(d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072,
                            decoder_layers=12, decoder_attention_heads=12, decoder_ffn_dim=3072,
                            num_mel_bins=80, max_source_positions=1500)  # whisper-small
        m = WhisperModel(cfg).get_encoder()
        out.append(Model("asr", "whisper-small encoder", m,
                         lambda b: (torch.randn(b, 80, 3000, device=device),)))  # the 30-s log-mel window
    if want("audio"):
        from transformers import WavLMConfig, WavLMModel

        cfg = WavLMConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072)  # wavlm-base-plus
        n = int(seconds * 16000)
        out.append(Model("audio", "wavlm-base-plus", WavLMModel(cfg),
                         lambda b, n=n: (torch.randn(b, n, device=device),)))
    if want("text"):
        from transformers import RobertaConfig, RobertaModel

        cfg = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1)
        out.append(Model("text", "roberta-base", RobertaModel(cfg),
                         lambda b: (torch.randint(5, 50000, (b * texts, tokens), device=device),)))
    if want("visual"):
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, image_size=224, patch_size=32)  # ViT-B/32
        out.append(Model("visual", "clip-vit-base-patch32 (face crops)", CLIPVisionModel(cfg),
                         lambda b: (torch.randn(b * faces, 3, 224, 224, device=device),)))
    for m in out:
        m.module.eval().to(device)
    return out


class UtilSampler:
    """GPU utilisation (%) sampled by NVML on a thread; None where NVML is not available."""

    def __init__(self, device: str):
        self.handle = None
        self.samples: list[int] = []
        self._smi: list[str] | None = None
        if device.startswith("cuda"):
            try:
                import pynvml

                pynvml.nvmlInit()
                idx = int(device.split(":")[1]) if ":" in device else 0
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
                self._nvml = pynvml
            except Exception:  # noqa: BLE001 - no NVML: nvidia-smi, else n/a
                self.handle = None
                self._smi = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                             "-i", device.split(":")[1] if ":" in device else "0"]
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def __enter__(self) -> UtilSampler:
        if self.handle is not None or self._smi is not None:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self) -> None:
        import subprocess

        while not self._stop.wait(0.05):
            if self.handle is not None:
                self.samples.append(int(self._nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))
                continue
            try:
                out = subprocess.run(self._smi, capture_output=True, text=True, timeout=2).stdout.strip()
                self.samples.append(int(out.splitlines()[0]))
            except Exception:  # noqa: BLE001 - no nvidia-smi either: n/a
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join()

    def value(self) -> str:
        return f"{statistics.mean(self.samples):.0f} %" if self.samples else "n/a"


def time_model(m: Model, bs: int, device: str, repeats: int, amp: bool) -> dict[str, Any]:
    import torch

    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    args = m.make_input(bs)
    ctx = torch.autocast("cuda", dtype=torch.float16) if (amp and cuda) else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), ctx:
        m.module(*args)  # warm-up: kernels, allocator, cudnn autotune
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        with UtilSampler(device) as util:
            for _ in range(repeats):
                t0 = time.perf_counter()
                m.module(*args)
                sync()
                times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"stage": m.name, "arch": m.arch, "batch": bs, "seconds": sec, "clips_s": bs / sec,
            "gpu_mem_gib": mem, "util": util.value()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--seconds", type=float, default=4.0, help="media seconds per synthetic clip")
    ap.add_argument("--texts", type=int, default=2, help="strings per clip (utterance + context)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per string")
    ap.add_argument("--faces", type=int, default=8, help="face crops per clip (2 fps x 4 s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma list of stages (separate,asr,audio,text,visual)")
    ap.add_argument("--amp", action="store_true", help="float16 autocast on cuda")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: --device cpu, batch sizes 1,2, 1-s clips, 1 repeat, 2 faces")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    if args.quick:
        args.device, args.batch_sizes, args.seconds, args.repeats, args.faces, args.texts = "cpu", "1,2", 1.0, 1, 2, 1

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device (use --quick for a CPU run)")
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("MMEMO_THREADS", os.cpu_count() or 1)))
    only = set(args.only.split(",")) if args.only else None
    t0 = time.perf_counter()
    models = build_models(args.device, args.seconds, args.texts, args.tokens, args.faces, only)
    build_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# gpu bench: device {args.device} ({name}), torch {torch.__version__}, clips of {args.seconds:g} s, "
          f"batch sizes {args.batch_sizes}, repeats {args.repeats} (medians), amp={args.amp}, "
          f"models built in {build_s:.1f} s (random weights, real sizes)")
    print("| stage | architecture | batch | clips/s | media-s per wall-s | GPU memory GiB | GPU util |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for m in models:
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            try:
                r = time_model(m, bs, args.device, args.repeats, args.amp)
            except torch.OutOfMemoryError:
                print(f"| {m.name} | {m.arch} | {bs} | out of memory | | | |", flush=True)
                torch.cuda.empty_cache()
                break
            rows.append(r)
            mem = "n/a" if r["gpu_mem_gib"] != r["gpu_mem_gib"] else f"{r['gpu_mem_gib']:.2f}"  # nan on CPU
            print(f"| {m.name} | {m.arch} | {bs} | {r['clips_s']:.2f} | {r['clips_s'] * args.seconds:.1f} | "
                  f"{mem} | {r['util']} |", flush=True)
        m.module.to("cpu")
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["stage"] not in best or r["clips_s"] > best[r["stage"]]["clips_s"]:
            best[r["stage"]] = r
    per_media_s = sum(1.0 / (r["clips_s"] * args.seconds) for r in best.values())
    whole = 1.0 / per_media_s if per_media_s else 0.0
    picks = ", ".join(f"{s} bs {r['batch']}" for s, r in best.items())
    print(f"whole preset (stages in sequence, best batch each: {picks}): {whole:.2f}x real time")
    held = whole >= GOAL_RT and args.device.startswith("cuda")
    print(f"goal full preset >= {GOAL_RT:g}x real time on one GPU: "
          f"{'HOLDS' if held else 'does NOT hold' if args.device.startswith('cuda') else 'not measured (CPU run)'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "whole_rt": whole, "device": name}, fh, indent=1)


if __name__ == "__main__":
    main()
