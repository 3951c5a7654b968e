"""Finetuning glue for the Hugging Face `Trainer`: what to train, and logging of the VQ terms.

The paper's recipe (Section 3.2.3): one joint finetune of the codebook (EMA updates in the forward pass, no
gradient), the Dual Linear Projections, and LoRA adapters in the language model, with the commitment loss
(Eq. 3) added to the task loss. Everything else stays frozen.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from transformers import Trainer

from ..lora import add_lora
from ..models.llava_alignedvq.split import first_cloud_block

# LoRA goes into the language model only; CLIP's attention also has q_proj/k_proj/v_proj, which must not match.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def cloud_vision_lora_targets(config) -> str:
    """PEFT ``target_modules`` regex for the linear layers of the vision blocks the cloud runs entirely
    (`split.first_cloud_block` on): adapting them changes nothing on the edge, so the edge, its codebook and the
    frames stay as they are."""
    first = first_cloud_block(config.split_layer, config.split_site)
    last = max(config.feature_layer_indices())  # hidden state i is the output of block i - 1
    blocks = "|".join(str(i) for i in range(first, last))
    if not blocks:
        raise ValueError("no vision block runs entirely in the cloud before the features LLaVA reads")
    return rf".*vision_tower.*encoder\.layers\.({blocks})\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"


def prepare_for_finetuning(
    model,
    *,
    lora_r: int | None = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.05,
    target_modules: str | list[str] = DEFAULT_LORA_TARGETS,
    lora_cloud_vision: bool = False,
    train_dlp: bool = True,
):
    """Freeze the model except the AlignedVQ projections and (if ``lora_r``) fresh LoRA adapters.

    Args:
        model: a `LlavaAlignedVQForConditionalGeneration`.
        lora_r: LoRA rank for the language model; ``None`` or 0 trains no LoRA (the paper's "VQ-LN1-DLP").
        lora_alpha: LoRA scaling numerator; defaults to ``2 * lora_r``.
        target_modules: PEFT ``target_modules`` (a regex over module names, or a list).
        lora_cloud_vision: also put LoRA into the vision blocks the cloud runs (`cloud_vision_lora_targets`),
            so the cloud side of the tower adapts to quantized inputs; not in the paper's recipe.
        train_dlp: train the DLP (and the codebook projections when ``codebook_dim`` is smaller).

    Returns the model, with ``requires_grad`` set; the codebook itself follows the EMA during training.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if lora_cloud_vision:
        if not isinstance(target_modules, str):
            raise ValueError("lora_cloud_vision combines with a regex target_modules only")
        target_modules = f"({target_modules})|({cloud_vision_lora_targets(model.config)})"
    if lora_r:
        from peft import LoraConfig

        add_lora(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha or 2 * lora_r, lora_dropout=lora_dropout,
                                   target_modules=target_modules))
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
    if train_dlp:
        for param in model.model.alignedvq.parameters():
            param.requires_grad_(True)
    return model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def cache_argument(module) -> str:
    """The name under which ``module.forward`` takes and returns its key/value cache: ``cache`` in
    Transformers >= 5.24 (where ``past_key_values`` is deprecated), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def checkpointing_argument(enabled: bool) -> dict:
    """`TrainingArguments` keyword for activation checkpointing: ``activation_checkpointing`` where the
    installed Transformers has it (``gradient_checkpointing`` is its deprecated alias there), otherwise the
    old name."""
    import dataclasses

    from transformers import TrainingArguments

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


@dataclass
class SharedPrefixLoss:
    """What :func:`shared_image_prefix_loss` computed: the language-model loss and the VQ terms."""

    lm_loss: torch.Tensor
    commitment_loss: torch.Tensor | None = None
    codebook_perplexity: torch.Tensor | None = None
    codebook_usage: torch.Tensor | None = None


def shared_image_prefix_loss(model, batch, *, num_items_in_batch=None) -> SharedPrefixLoss | None:
    """The LLaVA training loss with the image prefix computed once per distinct image of the batch.

    A LLaVA prompt starts with the image (``<bos> ... <image>*N``), so the questions of one image share that
    whole prefix: here ~80% of every sequence. Rows whose ``pixel_values`` are identical (see
    `data.ImageGroupedBatchSampler` and `data.VQACollator`) are grouped; the vision tower (with the quantizer),
    the projector and the language model run over the prefix once per group, the prefix's key/value cache is
    gathered per row (a differentiable ``index_select``), and only the question/answer suffix runs per row.
    Attention, positions and the token loss are those of the stock forward (right-padded rows, causal mask,
    cross-entropy over the supervised tokens), so the loss and every gradient match ``model(**batch)`` to
    rounding (tested). The quantizer's EMA sees each distinct image once per step instead of once per question.

    Args:
        model: a LLaVA, LLaVA-NeXT or LLaVA-OneVision model, plain or AlignedVQ (LoRA layers injected in
            place are fine; a `peft.PeftModel` is unwrapped).
        batch: ``input_ids``, ``attention_mask``, ``labels`` and ``pixel_values`` (right padding), and the
            any-resolution families' ``image_sizes``.
        num_items_in_batch: when given (the `Trainer`'s count of supervised tokens over the accumulated
            micro-batches), the token losses are summed and divided by it, as the stock forward does.

    Returns `None` when the batch does not have this structure (no repeated image, left padding, an image
    that is not a common prefix, labels inside the prefix, gradient checkpointing on); the caller then runs
    the stock forward.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    labels, pixel_values = batch.get("labels"), batch.get("pixel_values")
    if ids is None or mask is None or labels is None or pixel_values is None or ids.shape[0] < 2:
        return None
    if batch.get("image_grid_thw") is not None:
        return None  # Qwen2.5-VL's pixel_values are the batch's patches, not one row per question
    checkpointing = getattr(type(model), "is_activation_checkpointing", None)  # Transformers >= 5.x name
    if (model.is_activation_checkpointing if checkpointing is not None else model.is_gradient_checkpointing):
        return None  # checkpointed layers do not return a key/value cache
    unique, inverse = torch.unique(pixel_values.flatten(1), dim=0, return_inverse=True)
    if unique.shape[0] == ids.shape[0]:
        return None  # nothing is shared
    is_image = ids == model.config.image_token_id
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    last_image = torch.where(is_image, positions, -1).max(dim=1).values
    prefix = int(last_image[0]) + 1
    first = torch.full((unique.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device).scatter_reduce(
        0, inverse, torch.arange(ids.shape[0], device=ids.device), reduce="amin"
    )
    if (
        prefix < 1
        or prefix >= ids.shape[1]
        or not bool((last_image == prefix - 1).all())
        or not bool(mask[:, :prefix].all())
        or not bool((labels[:, : prefix + 1] == -100).all())
        or not torch.equal(ids[:, :prefix], ids[first][inverse][:, :prefix])
    ):
        return None

    # The any-resolution families tile each image by its size: the distinct images' sizes go with them.
    sizes = {"image_sizes": batch["image_sizes"][first]} if batch.get("image_sizes") is not None else {}
    image_output = model.model.get_image_features(pixel_values=unique.view(-1, *pixel_values.shape[1:]), **sizes)
    features = image_output.pooler_output
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features.flatten(0, -2)
    lm = model.model.language_model
    prefix_ids = ids[first, :prefix]
    embeds = lm.get_input_embeddings()(prefix_ids)
    embeds = embeds.masked_scatter(is_image[first, :prefix].unsqueeze(-1), features.to(embeds.dtype))
    cache_name = cache_argument(lm)
    cache = lm(inputs_embeds=embeds, use_cache=True)[cache_name]
    cache.reorder_cache(inverse)  # per-layer index_select: every row gets its image's prefix, gradients flow back
    suffix = ids.shape[1] - prefix
    out = lm(
        input_ids=ids[:, prefix:],
        attention_mask=mask,
        position_ids=torch.arange(prefix, ids.shape[1], device=ids.device).expand(ids.shape[0], suffix),
        use_cache=True,
        **{cache_name: cache},
    )
    logits = model.lm_head(out.last_hidden_state[:, :-1]).float()
    targets = labels[:, prefix + 1 :].reshape(-1)
    token_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets, ignore_index=-100, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    if torch.is_tensor(count):
        count = count.to(token_loss.device)
    return SharedPrefixLoss(
        lm_loss=token_loss / count,
        commitment_loss=getattr(image_output, "commitment_loss", None),
        codebook_perplexity=getattr(image_output, "codebook_perplexity", None),
        codebook_usage=getattr(image_output, "codebook_usage", None),
    )


class AlignedVQTrainer(Trainer):
    """`Trainer` for the AlignedVQ finetune (and for LoRA finetunes of a plain LLaVA).

    * Logs the commitment loss, codebook perplexity and usage of the steps since the last log (means over
      micro-batches, and over processes under `torch.distributed`).
    * Weighs the commitment loss correctly under gradient accumulation and several processes: the token loss
      follows the Trainer's normalisation by the number of supervised tokens, the commitment loss (a mean
      over the micro-batch's features) is divided by the accumulation steps and averaged by DDP.
    * ``images_per_batch=N`` draws batches made of all the questions of N images
      (`data.ImageGroupedBatchSampler`, needs an ``image_id`` column) and, in a single process, computes the
      loss with `shared_image_prefix_loss`: the same loss and gradients, with the vision tower and the image
      prefix run once per image. On easy-VQA (about ten questions per image) that is several times faster per
      question. Under `torchrun`/`accelerate` the grouped batches are kept and the stock forward runs (the
      shared-prefix path calls submodules directly, which DDP's gradient hooks must not be bypassed for).
    """

    def __init__(self, *args, images_per_batch: int | None = None, vqa_eval_dataset=None, vqa_processor=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if vqa_eval_dataset is not None and vqa_processor is None:
            raise ValueError("vqa_eval_dataset needs vqa_processor (the model's LlavaProcessor)")
        self.images_per_batch = images_per_batch
        self.vqa_eval_dataset, self.vqa_processor = vqa_eval_dataset, vqa_processor
        self._vq_sums: dict[str, float] = {}
        self._vq_count = 0

    def get_train_dataloader(self):
        if not self.images_per_batch:
            return super().get_train_dataloader()
        from .data import ImageGroupedBatchSampler

        dataset = self.train_dataset
        if "image_id" not in getattr(dataset, "column_names", ()):
            raise ValueError("images_per_batch needs a train_dataset with an 'image_id' column")
        sampler = ImageGroupedBatchSampler(list(dataset["image_id"]), self.images_per_batch, seed=self.args.seed)
        # Batches hold all the questions of N images, so their sizes differ: accelerate must not try to even
        # them out across processes (older releases refuse a batch sampler without a fixed batch size).
        self.accelerator.even_batches = False
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The stock evaluation (``eval_loss``), plus ``eval_vqa_accuracy``: greedy answers from `generate`
        over the wire format (`evaluation.evaluate_vqa`) on ``vqa_eval_dataset`` (rows with ``image``,
        ``question``, ``answer``), so ``metric_for_best_model="eval_vqa_accuracy"`` and early stopping work."""
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.vqa_eval_dataset is None or eval_dataset is not None:  # every process: they pick the best alike
            return metrics
        from ..evaluation import evaluate_vqa

        model = self.accelerator.unwrap_model(self.model)
        training = model.training
        result = evaluate_vqa(model, self.vqa_processor, self.vqa_eval_dataset,
                              batch_size=self.args.per_device_eval_batch_size)
        model.train(training)
        extra = {f"{metric_key_prefix}_vqa_accuracy": result["accuracy"]}
        self.log(extra)
        metrics.update(extra)
        return metrics

    def _token_loss_multiplier(self) -> int:
        # What `Trainer.compute_loss` multiplies a `num_items_in_batch`-normalised loss by (DDP then averages).
        if not self.args.average_tokens_across_devices:
            return 1
        tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        return self.accelerator.num_processes // tp_size if self.args.n_gpu <= 1 else self.args.n_gpu

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        config = getattr(unwrapped, "config", None)
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        outputs = None
        if model.training and self.images_per_batch and unwrapped is model and not return_outputs:
            outputs = shared_image_prefix_loss(model, inputs, num_items_in_batch=num_items_in_batch if scaled else None)
        if outputs is None:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        lm_loss = getattr(outputs, "lm_loss", None)
        if lm_loss is not None:  # recombine: the model adds the commitment term unaware of accumulation/processes
            loss = lm_loss * (self._token_loss_multiplier() if scaled else 1)
            commitment = getattr(outputs, "commitment_loss", None)
            if commitment is not None:
                steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
                weight = getattr(config, "commitment_weight", 0.0)
                loss = loss + weight * commitment.to(loss.dtype) / (steps if scaled else 1)
        if model.training:
            for name in ("commitment_loss", "codebook_perplexity", "codebook_usage", "lm_loss"):
                value = getattr(outputs, name, None)
                if value is not None:
                    self._vq_sums[name] = self._vq_sums.get(name, 0.0) + float(value.detach())
            self._vq_count += 1
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if any(param.requires_grad for param in model.parameters()):
            return super().training_step(model, inputs, num_items_in_batch)
        # Nothing takes a gradient (the vanilla-VQ baseline: no DLP, no LoRA): the codebook still learns, by
        # its EMA updates in the training-mode forward, so the step is that forward alone.
        model.train()
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if not (self.model_accepts_loss_kwargs and num_items_in_batch is not None):
            loss = loss / self.current_gradient_accumulation_steps
        return loss.detach()

    def log(self, logs: dict, *args, **kwargs):
        if self._vq_count and "loss" in logs:
            names = sorted(self._vq_sums)
            values = torch.tensor([self._vq_sums[n] for n in names] + [float(self._vq_count)], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(values)
            count = values[-1].item()
            for name, total in zip(names, values[:-1].tolist()):
                logs[name] = round(total / count, 6) if not math.isnan(total) else total
            self._vq_sums, self._vq_count = {}, 0
        super().log(logs, *args, **kwargs)


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "AlignedVQTrainer",
    "SharedPrefixLoss",
    "cache_argument",
    "checkpointing_argument",
    "cloud_vision_lora_targets",
    "prepare_for_finetuning",
    "shared_image_prefix_loss",
    "trainable_parameters",
]
