"""Post-training weight/activation quantization of a (split) LLaVA: the fake-quantized layers, and their files.

Every quantized ``nn.Linear`` becomes a :class:`QuantLinear`: the same ``weight`` and ``bias`` parameters under
the same names (so ``state_dict`` and ``model.safetensors`` are unchanged) plus its quantizers in
non-persistent buffers:

* weight: symmetric, per output channel, ``weight_bits`` signed levels:
  ``w_hat = clamp(round(w / s_c), -2^(b-1), 2^(b-1) - 1) * s_c`` with ``s_c = weight_scale[c]``;
* input activation (absent for weight-only, ``act_bits=None``): asymmetric, per tensor, static (calibrated):
  ``x_hat = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s`` with ``s = input_scale``, ``z = input_zero_point``.

Both are ONNX ``QuantizeLinear``/``DequantizeLinear`` pairs (``torch.round`` rounds half to even, as ONNX does),
so an int8 exporter can take the scales and zero points as they are. What is computed is fake quantization
(float math on quantized values): it measures accuracy, not speed.

On disk a quantized checkpoint is a normal checkpoint plus two files, applied after the weights are loaded:

* ``ptq_config.json``: the method and bit-widths, every quantized layer (its name, part, bit-widths and shape),
  and the SHA-256 of each weights file the scales were computed for;
* ``ptq.safetensors``: ``<layer>.weight_scale`` (F32, ``(out_features,)``), and for weight+activation layers
  ``<layer>.input_scale`` (F32, ``()``) and ``<layer>.input_zero_point`` (I32, ``()``).

Loading is strict: a layer that is not an ``nn.Linear`` of the recorded shape, a missing, unexpected, mis-typed
or mis-shaped tensor, an invalid value, or weights files other than the ones the scales were computed for raise
:class:`~transformers_alignedvq.errors.CheckpointMismatchError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointMismatchError

PTQ_CONFIG_NAME = "ptq_config.json"
PTQ_WEIGHTS_NAME = "ptq.safetensors"
PTQ_FORMAT = "alignedvq-ptq"
PTQ_FORMAT_VERSION = 1
PARTS = ("edge", "vision", "projector", "language_model")
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


# --------------------------------------------------------------------------------------------------------
# quantizer math
# --------------------------------------------------------------------------------------------------------
def check_bits(weight_bits: int, act_bits: int | None) -> None:
    """Raise ``ValueError`` unless both bit-widths are supported (``act_bits=None``: weight-only)."""
    if weight_bits not in SUPPORTED_BITS or (act_bits is not None and act_bits not in SUPPORTED_BITS):
        raise ValueError(f"weight_bits={weight_bits}, act_bits={act_bits}: each must be one of {SUPPORTED_BITS} "
                         "(act_bits may be None for weight-only quantization).")


def fake_quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``."""
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def weight_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_scales(weight: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-output-channel symmetric scales ``clip * max|w_c| / (2^(b-1) - 1)`` (fp32, ``(out_features,)``)."""
    absmax = weight.detach().float().abs().amax(dim=1)
    return (absmax * clip).clamp_min(1e-12) / weight_range(bits)[1]


def activation_qparams(low: float, high: float, bits: int) -> tuple[float, int]:
    """Scale and integer zero point of an asymmetric ``bits`` quantizer covering ``[low, high]`` (widened to
    include 0, so that zero is exact: padding and ReLU zeros stay zero)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = max((high - low) / (2**bits - 1), 1e-12)
    zero_point = int(min(max(round(-low / scale), 0), 2**bits - 1))
    return scale, zero_point


class QuantLinear(nn.Linear):
    """An ``nn.Linear`` with fake-quantized weight and (unless weight-only) input; see the module docstring.

    Built from an existing layer, sharing its ``weight`` and ``bias`` parameters, so parameter names do not
    change. ``enabled=False`` makes it compute exactly the original layer.
    """

    def __init__(self, linear: nn.Linear, weight_bits: int, act_bits: int | None, part: str):
        nn.Module.__init__(self)
        check_bits(weight_bits, act_bits)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.weight_bits, self.act_bits, self.part = weight_bits, act_bits, part
        self.enabled = True
        device = linear.weight.device
        self.register_buffer("weight_scale", weight_scales(linear.weight, weight_bits).to(device), persistent=False)
        self.register_buffer("input_scale", torch.ones((), device=device), persistent=False)
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32, device=device), persistent=False)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight, recomputed only when the weight or its scales change."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype,
               self.weight_scale.data_ptr(), self.weight_scale._version)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                qmin, qmax = weight_range(self.weight_bits)
                scale = self.weight_scale.unsqueeze(1)
                quantized = fake_quantize(self.weight.float(), scale, 0, qmin, qmax).to(self.weight.dtype)
            self._cache = (key, quantized)
        return self._cache[1]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            return x
        zero_point = self.input_zero_point.to(self.input_scale.dtype)
        return fake_quantize(x, self.input_scale.to(x.dtype), zero_point.to(x.dtype), 0, 2**self.act_bits - 1)

    def set_input_range(self, low: float, high: float) -> None:
        scale, zero_point = activation_qparams(low, high, self.act_bits)
        self.input_scale.fill_(scale)
        self.input_zero_point.fill_(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        act = "A16 (weight-only)" if self.act_bits is None else f"A{self.act_bits}"
        return f"{super().extra_repr()}, W{self.weight_bits}{act}, part={self.part}"


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """``{module name: QuantLinear}`` of a quantized model (empty for an unquantized one)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def is_quantized(model: nn.Module) -> bool:
    return bool(quant_layers(model))


def replace_linear(model: nn.Module, name: str, weight_bits: int, act_bits: int | None, part: str) -> QuantLinear:
    """Swap the ``nn.Linear`` at ``name`` for a `QuantLinear` sharing its parameters; returns it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, child)
    if isinstance(linear, QuantLinear) or not isinstance(linear, nn.Linear):
        raise ValueError(f"{name} is a {type(linear).__name__}, not an unquantized nn.Linear.")
    layer = QuantLinear(linear, weight_bits, act_bits, part)
    setattr(parent, child, layer)
    return layer


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module):
    """Run ``model`` in full precision for the duration (the quantizers stay in place)."""
    layers = list(quant_layers(model).values())
    states = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer, state in zip(layers, states):
            layer.enabled = state


_VISION_PREFIX = "model.vision_tower."


def edge_quantizers(model: nn.Module) -> dict[str, dict]:
    """The calibrated quantizers of the edge part, under the edge encoder's module names
    (`AlignedVQEdgeEncoder`: ``encoder.layers.0.self_attn.q_proj``, ...), for an int8 exporter:
    ``{"weight_bits", "weight_scale" (out_features,), "act_bits", "input_scale", "input_zero_point"}`` with the
    conventions of the module docstring (``act_bits`` ``None`` and no input entries for weight-only layers)."""
    out = {}
    for name, layer in quant_layers(model).items():
        if layer.part != "edge":
            continue
        entry = {"weight_bits": layer.weight_bits, "weight_scale": layer.weight_scale.detach().cpu().clone(),
                 "act_bits": layer.act_bits}
        if layer.act_bits is not None:
            entry.update(input_scale=float(layer.input_scale), input_zero_point=int(layer.input_zero_point))
        out[name.removeprefix(_VISION_PREFIX)] = entry
    return out


def model_bits(model: nn.Module) -> dict:
    """Storage of the model's parameters with the quantized weights at their bit-width and their scales in fp32
    (everything else at its own dtype): ``{"bytes": ..., "fp_bytes": ..., "quantized_params": ...}``."""
    layers = quant_layers(model)
    quantized = {id(layer.weight): layer for layer in layers.values()}
    total = fp_total = count = 0
    for param in {id(p): p for p in model.parameters()}.values():
        fp_total += param.numel() * param.element_size()
        layer = quantized.get(id(param))
        if layer is None:
            total += param.numel() * param.element_size()
        else:
            count += param.numel()
            total += param.numel() * layer.weight_bits / 8 + layer.out_features * 4 + (8 if layer.act_bits else 0)
    return {"bytes": int(round(total)), "fp_bytes": fp_total, "quantized_params": count}


# --------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------
def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_digests(weight_paths) -> dict[str, str]:
    return {Path(path).name: _sha256(path) for path in weight_paths}


def ptq_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantizer tensors of every `QuantLinear`, under ``<layer name>.<tensor>``."""
    state = {}
    for name, layer in quant_layers(model).items():
        state[f"{name}.weight_scale"] = layer.weight_scale.detach().float().cpu().contiguous()
        if layer.act_bits is not None:
            state[f"{name}.input_scale"] = layer.input_scale.detach().float().cpu().contiguous()
            state[f"{name}.input_zero_point"] = layer.input_zero_point.detach().to(torch.int32).cpu().contiguous()
    return state


def save_ptq(model: nn.Module, directory: str | os.PathLike, weight_paths, *, info: dict | None = None) -> None:
    """Write ``ptq_config.json`` and ``ptq.safetensors`` for ``model``'s quantizers into ``directory``, bound to
    the weights files ``weight_paths`` already written there. ``info``: method settings to record."""
    directory = Path(directory)
    layers = {
        name: {"part": layer.part, "weight_bits": layer.weight_bits, "act_bits": layer.act_bits,
               "in_features": layer.in_features, "out_features": layer.out_features}
        for name, layer in quant_layers(model).items()
    }
    config = {
        "format": PTQ_FORMAT,
        "format_version": PTQ_FORMAT_VERSION,
        "quantization": dict(info or getattr(model, "ptq_info", None) or {}),
        "layers": layers,
        "weights_sha256": _weights_digests(weight_paths),
    }
    save_file(ptq_state(model), str(directory / PTQ_WEIGHTS_NAME), metadata={"format": PTQ_FORMAT})
    (directory / PTQ_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def _fail(message: str):
    raise CheckpointMismatchError(f"{PTQ_WEIGHTS_NAME}/{PTQ_CONFIG_NAME}: {message}")


def _check_config(config: dict) -> dict:
    if not isinstance(config, dict) or config.get("format") != PTQ_FORMAT:
        _fail(f"not a {PTQ_FORMAT} file")
    if config.get("format_version") != PTQ_FORMAT_VERSION:
        _fail(f"format_version {config.get('format_version')!r}; this version reads {PTQ_FORMAT_VERSION}")
    layers = config.get("layers")
    if not isinstance(layers, dict) or not layers:
        _fail("no quantized layers listed")
    for name, entry in layers.items():
        try:
            check_bits(entry["weight_bits"], entry["act_bits"])
            if entry["part"] not in PARTS:
                raise ValueError(f"part {entry['part']!r} is not one of {PARTS}")
        except (KeyError, TypeError, ValueError) as exc:
            _fail(f"layer {name}: {exc}")
    return layers


def _expected_tensors(layers: dict) -> dict[str, tuple[tuple, torch.dtype]]:
    expected = {}
    for name, entry in layers.items():
        expected[f"{name}.weight_scale"] = ((entry["out_features"],), torch.float32)
        if entry["act_bits"] is not None:
            expected[f"{name}.input_scale"] = ((), torch.float32)
            expected[f"{name}.input_zero_point"] = ((), torch.int32)
    return expected


def _check_state(state: dict[str, torch.Tensor], layers: dict) -> None:
    expected = _expected_tensors(layers)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        _fail(f"tensors do not match the listed layers: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{key} {tuple(state[key].shape)} {state[key].dtype} (expected {shape} {dtype})"
             for key, (shape, dtype) in expected.items()
             if tuple(state[key].shape) != shape or state[key].dtype != dtype]
    if wrong:
        _fail(f"mis-shaped or mis-typed tensors: {wrong[:5]}")
    for key, value in state.items():
        if key.endswith("_scale") and not (torch.isfinite(value).all() and (value > 0).all()):
            _fail(f"{key} holds a scale that is not finite and positive")
        if key.endswith("_zero_point"):
            top = 2 ** layers[key[: -len(".input_zero_point")]]["act_bits"] - 1
            if not 0 <= int(value) <= top:
                _fail(f"{key} = {int(value)} is outside [0, {top}]")


def apply_ptq(model: nn.Module, config: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """Re-apply saved quantizers to a loaded (unquantized) model, strictly."""
    layers = _check_config(config)
    if is_quantized(model):
        _fail("the model is already quantized")
    modules = dict(model.named_modules())
    wrong = [
        f"{name} ({type(modules.get(name)).__name__})" for name, entry in layers.items()
        if not isinstance(modules.get(name), nn.Linear)
        or (modules[name].in_features, modules[name].out_features) != (entry["in_features"], entry["out_features"])
    ]
    if wrong:
        _fail(f"layers that are not nn.Linear of the recorded shape in this model: {wrong[:5]}")
    _check_state(state, layers)
    with torch.no_grad():
        for name, entry in layers.items():
            layer = replace_linear(model, name, entry["weight_bits"], entry["act_bits"], entry["part"])
            layer.weight_scale.copy_(state[f"{name}.weight_scale"])
            if entry["act_bits"] is not None:
                layer.input_scale.copy_(state[f"{name}.input_scale"])
                layer.input_zero_point.copy_(state[f"{name}.input_zero_point"])
    model.ptq_info = dict(config.get("quantization") or {})
    return model


def load_ptq(model: nn.Module, config_path, weights_path, weight_paths) -> nn.Module:
    """Read a saved ``ptq_config.json`` / ``ptq.safetensors`` pair and apply it to ``model``, after checking
    that ``weight_paths`` (the weights files just loaded) are the ones the scales were computed for."""
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as exc:
        _fail(f"cannot read {PTQ_CONFIG_NAME}: {exc}")
    if weights_path is None:
        _fail(f"{PTQ_CONFIG_NAME} is present but {PTQ_WEIGHTS_NAME} is missing")
    recorded = config.get("weights_sha256") if isinstance(config, dict) else None
    if recorded != _weights_digests(weight_paths):
        _fail("the quantizers were computed for other weights (weights_sha256 differs from the weights files); "
              "quantize this checkpoint again")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        _fail(f"cannot be read (truncated or corrupt?): {exc}")
    return apply_ptq(model, config, state)


__all__ = [
    "PARTS",
    "PTQ_CONFIG_NAME",
    "PTQ_FORMAT",
    "PTQ_FORMAT_VERSION",
    "PTQ_WEIGHTS_NAME",
    "SUPPORTED_BITS",
    "QuantLinear",
    "activation_qparams",
    "apply_ptq",
    "check_bits",
    "edge_quantizers",
    "fake_quantize",
    "is_quantized",
    "load_ptq",
    "model_bits",
    "ptq_state",
    "quant_layers",
    "quantizers_disabled",
    "replace_linear",
    "save_ptq",
    "weight_range",
    "weight_scales",
]
