"""Calibrating the quantizers of `layers.py` on a few hundred images: three methods, one pipeline.

* ``rtn``: round to nearest with min-max ranges (per output channel for weights, per tensor for the inputs,
  observed on the calibration data).
* ``layerwise``: each linear layer on its own, in execution order, searches its input clipping range and its
  per-channel weight clipping to minimise its own output error ``||x W^T - Q(x) Q(W)^T||^2``, on inputs that
  already went through the quantized layers before it.
* ``qvlm`` (Q-VLM, Wang et al., NeurIPS 2024): the layer-wise result, then the quantizers of whole blocks of
  consecutive transformer layers searched jointly against the block's output error. Blocks follow the activation
  entropy: layer ``l`` joins ``l + 1`` in one block when the entropy of its output is at least
  ``entropy_threshold`` (up to ``max_block_depth`` layers). Before the search, the visual encoder may be
  optimized (``veo_weight`` = the paper's eta) to lower the entropy of its output together with the task loss.

The model runs as a list of steps (`model_steps`): vision embeddings, vision blocks (for a split model, the
edge's blocks, the AlignedVQ link and the cloud's blocks), feature selection, projector, prompt assembly and
language-model layers. Steps with linear layers belong to a part (``edge``, ``vision``, ``projector``,
``language_model``); blocks never cross a step without one (so never the split, whose indices are discrete).

Activation entropy (`token_entropy`): for each channel, the entropy of its magnitudes across the tokens of a
sample, ``p_t = |h_tc| / sum_t |h_tc|``, divided by ``log T`` (so it lies in [0, 1]), averaged over channels.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..models.llava_alignedvq import split
from .layers import PARTS, QuantLinear, check_bits, quant_layers, quantizers_disabled, replace_linear, weight_scales
from .steps import _feature_layer, _rows, model_steps, r_squared, sample_errors, token_entropy

METHODS = ("rtn", "layerwise", "qvlm")
@dataclass
class PTQConfig:
    """Post-training quantization settings.

    Args:
        method: ``"rtn"``, ``"layerwise"`` or ``"qvlm"`` (see the module docstring).
        weight_bits: bits per weight (2-8).
        act_bits: bits per input activation (2-8), or ``None`` for weight-only quantization.
        parts: which linear layers to quantize, any of ``edge`` (vision blocks the device runs; split models
            only), ``vision`` (the other vision blocks), ``projector``, ``language_model``. The patch embedding,
            the AlignedVQ layer and ``lm_head`` stay in full precision.
        clip_grid: clipping ratios the layer-wise search tries (of the observed range / the channel's max).
        joint_grid: multipliers the joint block search tries on each layer's input range and weight scales.
        search_rows: input rows (tokens) each layer-wise search scores (a fixed random subset).
        joint_samples: calibration samples the joint block search scores.
        entropy_threshold: Q-VLM's partition threshold on the activation entropy.
        max_block_depth: most transformer layers in one Q-VLM block.
        veo_weight: weight of the entropy term in the visual encoder optimization (0: off).
        veo_steps, veo_lr: optimizer steps (one calibration batch each) and AdamW learning rate of that step.
        seed: seeds the row subsets.
    """

    method: str = "qvlm"
    weight_bits: int = 8
    act_bits: int | None = 8
    parts: tuple[str, ...] = PARTS
    clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4)
    joint_grid: tuple[float, ...] = (0.8, 0.9, 1.1, 1.25)
    search_rows: int = 4096
    joint_samples: int = 64
    entropy_threshold: float = 0.9
    max_block_depth: int = 3
    veo_weight: float = 0.0
    veo_steps: int = 32
    veo_lr: float = 1e-5
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} must be one of {METHODS}.")
        check_bits(self.weight_bits, self.act_bits)
        self.parts = tuple(self.parts)
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown or not self.parts:
            raise ValueError(f"parts={self.parts!r}: choose one or more of {PARTS}.")
        if not self.clip_grid or not self.joint_grid or min(self.clip_grid + self.joint_grid) <= 0:
            raise ValueError("clip_grid and joint_grid must be non-empty lists of positive ratios.")
        if self.max_block_depth < 1 or self.search_rows < 1 or self.joint_samples < 1 or self.veo_steps < 0:
            raise ValueError("max_block_depth, search_rows and joint_samples must be >= 1, veo_steps >= 0.")
        if self.veo_weight < 0:
            raise ValueError(f"veo_weight={self.veo_weight} must be >= 0.")

    @property
    def label(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits or 16}"

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------
# entropy
# --------------------------------------------------------------------------------------------------------
class Calibrator:
    """Holds the calibration data, the model's steps and the full-precision outputs of every step, and runs the
    searches. ``batches``: dicts with ``pixel_values``, ``input_ids``, ``attention_mask`` (and ``labels`` for
    the visual encoder optimization)."""

    def __init__(self, model, batches: list[dict], config: PTQConfig):
        self.model, self.config, self.batches = model, config, batches
        self.steps = model_steps(model)
        self.generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad(), quantizers_disabled(model):
            self.fp = self._run_all([b["pixel_values"] for b in batches])

    def _run_all(self, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Outputs of every step for every batch (the input of step ``i`` is output ``i - 1``)."""
        outputs = []
        for step in self.steps:
            inputs = [step.run(x, batch) for x, batch in zip(inputs, self.batches)]
            outputs.append(inputs)
        return outputs

    def run(self, first: int, last: int, inputs: list[torch.Tensor], count: int | None = None) -> list[torch.Tensor]:
        """Steps ``first..last`` (inclusive) on ``inputs`` (the first ``count`` batches)."""
        batches = self.batches[: len(inputs) if count is None else count]
        outputs = inputs[: len(batches)]
        for step in self.steps[first : last + 1]:
            outputs = [step.run(x, batch) for x, batch in zip(outputs, batches)]
        return outputs

    def entropies(self) -> dict[str, list[float]]:
        """Activation entropy of every quantizable step's full-precision output, per calibration sample."""
        result = {}
        for index, step in enumerate(self.steps):
            if step.part is not None:
                values = [token_entropy(y, b["attention_mask"] if step.text else None)
                          for y, b in zip(self.fp[index], self.batches)]
                result[step.name] = torch.cat(values).tolist()
        return result

    # ---------------------------------------------------------------------------------------------------
    def segments(self) -> list[list[int]]:
        """Runs of consecutive quantized steps (indices); a step without linears or an unselected part ends one."""
        runs, current = [], []
        for index, step in enumerate(self.steps):
            if step.part in self.config.parts and step.linears:
                current.append(index)
            elif current:
                runs.append(current)
                current = []
        return runs + ([current] if current else [])

    def blocks(self, segment: list[int], entropy: dict[str, float], threshold: float, depth: int) -> list[list[int]]:
        """Q-VLM's partition of a segment: step ``l`` joins the next when its entropy is >= ``threshold``."""
        blocks = [[segment[0]]]
        for previous, index in zip(segment, segment[1:]):
            if entropy[self.steps[previous].name] >= threshold and len(blocks[-1]) < depth:
                blocks[-1].append(index)
            else:
                blocks.append([index])
        return blocks

    # ---------------------------------------------------------------------------------------------------
    def _capture_inputs(self, index: int, names: list[str], inputs: list[torch.Tensor]) -> dict[str, list]:
        """Inputs of the named layers of step ``index`` during one run on ``inputs``: rows of all batches, padding
        left out."""
        layers = dict(self.model.named_modules())
        captured = {name: [] for name in names}
        step = self.steps[index]
        handles = [layers[name].register_forward_pre_hook(
            lambda module, args, name=name: captured[name].append(args[0].detach())) for name in names]
        try:
            with torch.no_grad():
                for x, batch in zip(inputs, self.batches):
                    step.run(x, batch)
        finally:
            for handle in handles:
                handle.remove()
        return {name: torch.cat([_rows(v, b, step.text) for v, b in zip(values, self.batches)])
                for name, values in captured.items()}

    def calibrate_step(self, index: int, inputs: list[torch.Tensor]) -> None:
        """Initialise (min-max) and, unless RTN, search the quantizers of step ``index``'s layers in execution
        order; layers not calibrated yet run in full precision meanwhile."""
        layers = quant_layers(self.model)
        pending = [name for name in self.steps[index].linears if name in layers]
        for name in pending:
            layers[name].enabled = False
        while pending:
            rows = self._capture_inputs(index, pending, inputs)
            first = rows[pending[0]]
            # Layers fed the same tensor as the first (q/k/v, gate/up) are calibrated from this one run.
            ready = [name for name in pending if torch.equal(rows[name], first)]
            for name in ready:
                self._calibrate_layer(layers[name], rows[name])
                layers[name].enabled = True
            pending = [name for name in pending if name not in ready]

    def _calibrate_layer(self, layer: QuantLinear, x: torch.Tensor) -> None:
        with torch.no_grad():
            layer.weight_scale.copy_(weight_scales(layer.weight, layer.weight_bits))
            if layer.act_bits is not None:
                layer.input_range = (float(x.min()), float(x.max()))
                layer.set_input_range(*layer.input_range)
            if self.config.method != "rtn":
                self._search_layer(layer, x)

    def _search_layer(self, layer: QuantLinear, x: torch.Tensor) -> None:
        """Layer-wise clipping search: input range (per tensor), then weight clipping (per channel, separable
        given the input), twice."""
        if x.shape[0] > self.config.search_rows:
            x = x[torch.randperm(x.shape[0], generator=self.generator)[: self.config.search_rows]]
        x = x.float()
        weight = layer.weight.detach().float()
        target = x @ weight.T
        low, high = layer.input_range if layer.act_bits is not None else (0.0, 0.0)
        for _ in range(2 if layer.act_bits is not None else 1):
            if layer.act_bits is not None:
                quantized_weight = layer.quantized_weight().float()
                errors = []
                for ratio in self.config.clip_grid:
                    layer.set_input_range(low * ratio, high * ratio)
                    errors.append(float(((layer.quantize_input(x) @ quantized_weight.T - target) ** 2).sum()))
                ratio = self.config.clip_grid[min(range(len(errors)), key=errors.__getitem__)]
                layer.input_range = (low * ratio, high * ratio)
                layer.set_input_range(*layer.input_range)
            xq = layer.quantize_input(x)
            best = None
            for ratio in self.config.clip_grid:
                layer.weight_scale.copy_(weight_scales(weight, layer.weight_bits, ratio))
                channel_errors = ((xq @ layer.quantized_weight().float().T - target) ** 2).sum(0)
                scales = layer.weight_scale.clone()
                if best is None:
                    best = (channel_errors, scales)
                else:
                    better = channel_errors < best[0]
                    best = (torch.where(better, channel_errors, best[0]), torch.where(better, scales, best[1]))
            layer.weight_scale.copy_(best[1])

    # ---------------------------------------------------------------------------------------------------
    def block_errors(self, first: int, last: int, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Relative output error of steps ``first..last`` per sample of the first ``joint_samples``."""
        count = self._joint_batches()
        with torch.no_grad():
            outputs = self.run(first, last, inputs, count)
        step = self.steps[last]
        return torch.cat([sample_errors(y, t, b, step.text)
                          for y, t, b in zip(outputs, self.fp[last][:count], self.batches[:count])])

    def _joint_batches(self) -> int:
        total, count = 0, 0
        for batch in self.batches:
            if total >= self.config.joint_samples:
                break
            total += batch["input_ids"].shape[0]
            count += 1
        return count

    def refine_block(self, block: list[int], inputs: list[torch.Tensor]) -> None:
        """Joint search: coordinate descent over every layer's input-range and weight-scale multipliers of the
        block, scored by the block's output error; a candidate is kept only when it lowers that error."""
        layers = quant_layers(self.model)
        names = [name for index in block for name in self.steps[index].linears if name in layers]
        base = {name: (layers[name].weight_scale.clone(), getattr(layers[name], "input_range", None)) for name in names}
        current = {(name, kind): 1.0 for name in names for kind in ("weight", "input")}

        def apply(name, kind, factor):
            layer = layers[name]
            if kind == "weight":
                layer.weight_scale.copy_(base[name][0] * factor)
            else:
                low, high = base[name][1]
                layer.set_input_range(low * factor, high * factor)

        error = float(self.block_errors(block[0], block[-1], inputs).mean())
        for name in names:
            for kind in ("input", "weight") if layers[name].act_bits is not None else ("weight",):
                best = current[name, kind]
                for factor in self.config.joint_grid:
                    apply(name, kind, factor)
                    candidate = float(self.block_errors(block[0], block[-1], inputs).mean())
                    if candidate < error:
                        error, best = candidate, factor
                apply(name, kind, best)
                current[name, kind] = best
        for name in names:
            if layers[name].act_bits is not None:
                low, high = base[name][1]
                layers[name].input_range = (low * current[name, "input"], high * current[name, "input"])


# --------------------------------------------------------------------------------------------------------
# visual encoder optimization
# --------------------------------------------------------------------------------------------------------
def _cloud_vision_blocks(model) -> list[nn.Module]:
    """The vision blocks the cloud runs whole (`split.first_cloud_block` on) for an AlignedVQ model, so the edge
    and the codebook stay exactly as deployed; all blocks up to the feature layer for a plain LLaVA."""
    blocks = split.vision_blocks(model.model.vision_tower)
    start = 0
    if hasattr(model.model, "alignedvq"):
        start = split.first_cloud_block(model.config.split_layer, model.config.split_site)
    return list(blocks[start : _feature_layer(model.config)])


def optimize_visual_encoder(model, batches: list[dict], config: PTQConfig) -> dict:
    """Q-VLM's visual encoder optimization: AdamW on the cloud-side vision blocks for ``veo_steps`` batches,
    minimising ``task loss + veo_weight * entropy(vision output)``. Returns the mean entropy of the vision
    output on the calibration batches before and after."""
    params = [p for block in _cloud_vision_blocks(model) for p in block.parameters()]
    if not params:
        raise ValueError("This model has no cloud-side vision block to optimize (split at the last one).")
    captured = {}
    handle = model.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: captured.__setitem__("features", args[0]))

    def mean_entropy() -> float:
        with torch.no_grad():
            values = []
            for batch in batches:
                model.model.get_image_features(pixel_values=batch["pixel_values"])
                values.append(token_entropy(captured["features"]))
        return float(torch.cat(values).mean())

    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        before = mean_entropy()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=config.veo_lr, weight_decay=0.0)
        for step in range(config.veo_steps):
            batch = batches[step % len(batches)]
            out = model(**{k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels")})
            loss = out.loss + config.veo_weight * token_entropy(captured["features"]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = mean_entropy()
    finally:
        handle.remove()
        for p, flag in grads.items():
            p.requires_grad_(flag)
    return {"vision_entropy_before": before, "vision_entropy_after": after}


# --------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------
def quantize_model(model, batches: list[dict], config: PTQConfig) -> dict:
    """Quantize ``model`` in place with ``config`` calibrated on ``batches`` (see `Calibrator`).

    Returns a report: search seconds, the Q-VLM blocks, the activation entropies and, with the visual encoder
    optimization, its seconds and entropies. The model is left in eval mode, ready to save
    (``save_pretrained`` writes the quantizers beside the weights).
    """
    from ..lora import has_lora

    if has_lora(model):
        raise ValueError("Merge the LoRA adapter first (save_pretrained(..., merge_lora=True) or lora.merge_lora_).")
    if quant_layers(model):
        raise ValueError("The model is already quantized.")
    model.eval()
    report = {"config": config.to_dict()}
    if config.method == "qvlm" and config.veo_weight > 0:
        start = time.perf_counter()
        report.update(optimize_visual_encoder(model, batches, config))
        report["veo_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    calibrator = Calibrator(model, batches, config)
    for segment in calibrator.segments():
        for index in segment:
            step = calibrator.steps[index]
            for name in step.linears:
                replace_linear(model, name, config.weight_bits, config.act_bits, step.part)
    report["entropy"] = {name: sum(v) / len(v) for name, v in calibrator.entropies().items()}
    blocks = _search(calibrator, report["entropy"])
    report["blocks"] = [[calibrator.steps[i].name for i in block] for block in blocks]
    report["search_seconds"] = time.perf_counter() - start
    model.ptq_info = {key: report["config"][key] for key in ("method", "weight_bits", "act_bits", "parts")}
    model.ptq_info["blocks"] = report["blocks"]
    return report


def _search(calibrator: Calibrator, entropy: dict[str, float]) -> list[list[int]]:
    """Calibrate every segment in order, block by block; returns the blocks."""
    config, done = calibrator.config, []
    inputs = [batch["pixel_values"] for batch in calibrator.batches]
    position = 0  # steps before `position` have run on `inputs`
    for segment in calibrator.segments():
        with torch.no_grad():
            inputs = calibrator.run(position, segment[0] - 1, inputs) if segment[0] > position else inputs
        if config.method == "qvlm":
            blocks = calibrator.blocks(segment, entropy, config.entropy_threshold, config.max_block_depth)
        else:
            blocks = [[index] for index in segment]
        for block in blocks:
            block_inputs = inputs
            for index in block:
                calibrator.calibrate_step(index, inputs)
                with torch.no_grad():
                    inputs = calibrator.run(index, index, inputs)
            if config.method == "qvlm":
                calibrator.refine_block(block, block_inputs)
                with torch.no_grad():
                    inputs = calibrator.run(block[0], block[-1], block_inputs)
            done.append(block)
        position = segment[-1] + 1
    return done


def dependency_analysis(model, batches: list[dict], config: PTQConfig) -> list[dict]:
    """The paper's correlation check. Quantizes ``model`` layer-wise, then for every pair of consecutive
    transformer layers ``(l, l+1)`` of a segment compares two searches from that state: each layer refined on
    its own output (depth-1 blocks) against the pair refined jointly, scored at the output of ``l + 1``. The
    difference per calibration sample (DED) is returned with the entropy of layer ``l``'s output for that
    sample and the R^2 between the two. The model is left quantized layer-wise."""
    layerwise = PTQConfig(**{**config.to_dict(), "method": "layerwise"})
    quantize_model(model, batches, layerwise)
    calibrator = Calibrator(model, batches, PTQConfig(**{**config.to_dict(), "method": "qvlm"}))
    entropy = calibrator.entropies()
    layers = quant_layers(model)
    results = []
    for segment in calibrator.segments():
        with torch.no_grad():
            inputs = calibrator.run(0, segment[0] - 1, [b["pixel_values"] for b in batches])
        for first, second in zip(segment, segment[1:]):
            saved = {n: (q.weight_scale.clone(), q.input_scale.clone(), q.input_zero_point.clone(),
                         getattr(q, "input_range", None)) for n, q in layers.items()}
            calibrator.refine_block([first], inputs)
            with torch.no_grad():
                middle = calibrator.run(first, first, inputs)
            calibrator.refine_block([second], middle)
            separate = calibrator.block_errors(first, second, inputs)
            _restore(layers, saved)
            calibrator.refine_block([first, second], inputs)
            joint = calibrator.block_errors(first, second, inputs)
            _restore(layers, saved)
            count = joint.shape[0]
            ded = (separate - joint).tolist()
            name = calibrator.steps[first].name
            results.append({"layer": name, "next": calibrator.steps[second].name,
                            "entropy": entropy[name][:count], "ded": ded,
                            "r2": r_squared(entropy[name][:count], ded)})
            with torch.no_grad():
                inputs = calibrator.run(first, first, inputs)
    return results


def _restore(layers: dict[str, QuantLinear], saved: dict) -> None:
    with torch.no_grad():
        for name, (weight_scale, input_scale, zero_point, input_range) in saved.items():
            layer = layers[name]
            layer.weight_scale.copy_(weight_scale)
            layer.input_scale.copy_(input_scale)
            layer.input_zero_point.copy_(zero_point)
            layer.input_range = input_range


__all__ = ["METHODS", "PTQConfig", "dependency_analysis", "model_steps", "optimize_visual_encoder",
           "quantize_model", "r_squared", "token_entropy"]
