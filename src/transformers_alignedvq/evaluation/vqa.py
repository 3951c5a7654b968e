"""VQA accuracy with the VQA-v2 answer normalisation.

Normalisation follows the official VQA evaluation script (Antol et al. / Goyal et al.): lower-case, fix
contractions, handle punctuation (dropped, or replaced by a space when it separates words; a period is kept
inside numbers such as "1.5"), spell numbers as digits, drop articles. Scoring:

* several reference answers (VQA-v2 has 10 per question): ``min(#references equal to the prediction / 3, 1)``;
* one reference answer: exact match after normalisation.

This is the simple form of the VQA-v2 soft score; the official script additionally averages it over the ten
leave-one-out subsets of the references, which changes scores by at most a few hundredths of a point.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .significance import correctness_bits

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or (re.search(_COMMA_STRIP, text) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def _process_digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """VQA-v2 answer normalisation (see module docstring)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    return _process_digits_and_articles(_process_punctuation(answer))


def vqa_score(prediction: str, references: str | Sequence[str]) -> float:
    """Score of one prediction: exact match for one reference, ``min(matches / 3, 1)`` for several."""
    if isinstance(references, str):
        references = [references]
    if len(references) == 0:
        raise ValueError("Each prediction needs at least one reference answer.")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    return min(sum(r == pred for r in refs) / 3.0, 1.0)


def vqa_accuracy(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean VQA score in ``[0, 1]`` over paired predictions and references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("No predictions to score.")
    return sum(vqa_score(p, r) for p, r in zip(predictions, references)) / len(predictions)


# ------------------------------------------------------------------------------------------------------------
# Generation-based evaluation of a (split or stock) LLaVA on a VQA dataset
# ------------------------------------------------------------------------------------------------------------
def jpeg_roundtrip(image, quality: int):
    """``image`` (PIL) encoded as JPEG at ``quality`` and decoded again; returns (image, bytes)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    size = buffer.tell()
    buffer.seek(0)
    return Image.open(buffer).convert("RGB"), size


def png_bytes(image) -> int:
    import io

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=True)
    return buffer.tell()


def evaluate_vqa(
    model,
    processor,
    dataset,
    *,
    mode: str = "auto",
    jpeg_quality: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    entropy_model=None,
    edge=None,
    progress: bool = False,
) -> dict:
    """Greedy-generate an answer for every example and score it with :func:`vqa_score`.

    Args:
        model: an AlignedVQ model (``mode="indices"``: images cross the split as wire frames, decoded and
            checked as the cloud would; the families' frames carry their geometry) or any VLM (``mode="pixels"``).
        processor: the model's processor.
        dataset: rows with ``image`` (PIL), ``question``, ``answer`` (str or list of str).
        jpeg_quality: for ``mode="pixels"``, JPEG-compress every image at this quality first (bytes counted).
        entropy_model: an `entropy.EntropyModel` to measure coded frame sizes (without the question) too.
        edge: for ``mode="indices"``, a function pixels (numpy) -> indices (numpy) in place of the model's own
            edge, e.g. an `edge_runtime.EdgeRuntime`'s ``encode`` (an exported ONNX edge).

    Returns accuracy, mean bytes per image on the wire (frame incl. header and CRC, or the JPEG/PNG file),
    per-example predictions, and ``correct``: per-question correctness as a string of ``0``/``1`` (see
    `significance.correctness_bits`), small enough for results files, so two runs on the same questions can be
    compared with a paired test (`significance.paired_test`).
    """
    import torch

    from ..training.data import format_prompt
    from .family_wire import family_indices_over_the_wire, is_family_model

    if mode == "auto":
        mode = "indices" if hasattr(model, "encode_edge") else "pixels"
    if mode not in ("indices", "pixels"):
        raise ValueError(f"mode={mode!r} must be 'indices' or 'pixels'.")
    fingerprint = model.codebook_fingerprint() if mode == "indices" else None
    device = next(model.parameters()).device
    predictions, references, sizes, entropy_sizes = [], [], [], []
    tokenizer = processor.tokenizer
    model.eval()
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        images = [im.convert("RGB") for im in rows["image"]]
        questions = rows["question"]
        if mode == "pixels" and jpeg_quality is not None:
            pairs = [jpeg_roundtrip(im, jpeg_quality) for im in images]
            images, batch_sizes = [p[0] for p in pairs], [p[1] for p in pairs]
        elif mode == "pixels":
            batch_sizes = [png_bytes(im) for im in images]
        prompts = [format_prompt(processor, q) for q in questions]
        inputs = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            if mode == "indices" and is_family_model(model):
                cloud, batch_sizes, coded_sizes = family_indices_over_the_wire(
                    model, inputs, entropy_model=entropy_model, fingerprint=fingerprint)
                entropy_sizes += coded_sizes
                prompt = {k: inputs[k] for k in ("input_ids", "attention_mask")}
                out = model.generate(**prompt, **cloud, max_new_tokens=max_new_tokens, do_sample=False)
            elif mode == "indices":
                cloud, batch_sizes, coded_sizes = indices_over_the_wire(
                    model, inputs.pop("pixel_values"), edge=edge, entropy_model=entropy_model, fingerprint=fingerprint)
                entropy_sizes += coded_sizes
                out = model.generate(**inputs, image_indices=cloud, max_new_tokens=max_new_tokens, do_sample=False)
            else:
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        predictions += [a.strip() for a in answers]
        references += list(rows["answer"])
        sizes += batch_sizes
        if progress:
            print(f"  {len(predictions)}/{len(dataset)} accuracy so far {vqa_accuracy(predictions, references):.4f}", flush=True)
    result = {
        "accuracy": vqa_accuracy(predictions, references),
        "num_examples": len(predictions),
        "bytes_per_image": float(sum(sizes) / len(sizes)),
        "predictions": predictions,
        "correct": correctness_bits([vqa_score(p, r) for p, r in zip(predictions, references)]),
    }
    if entropy_sizes:
        result["entropy_coded_bytes_per_image"] = float(sum(entropy_sizes) / len(entropy_sizes))
    return result


def indices_over_the_wire(model, pixels, *, edge=None, entropy_model=None, fingerprint: bytes | None = None):
    """The indices the cloud receives for a batch of ``pixels``: encoded by ``edge`` (default: the model's own
    edge), framed, decoded and checked as the server would. ``fingerprint``: the model's codebook fingerprint,
    when the caller already has it (computing it hashes the codebook). Returns ``(indices on the model's device,
    frame bytes per image, coded frame bytes per image or [])``."""
    import numpy as np
    import torch

    from ..wire import decode_frame, encode_frame

    config = model.config
    fingerprint = model.codebook_fingerprint() if fingerprint is None else fingerprint
    frame_options = dict(codebook_size=config.codebook_size, codebook_fingerprint=fingerprint)
    grid = config.vision_config.image_size // config.vision_config.patch_size
    if edge is not None:
        indices = torch.from_numpy(edge(pixels.float().cpu().numpy()))
        indices = indices.squeeze(-1) if config.codes_per_token == 1 else indices
    else:
        indices = model.encode_edge(pixels.to(model.dtype))
    received, sizes, coded = [], [], []
    for row in indices.cpu().numpy():
        frame = encode_frame(row, grid=(grid, grid), has_cls_token=True, **frame_options)
        sizes.append(len(frame))
        if entropy_model is not None:
            coded.append(len(encode_frame(row, grid=(grid, grid), has_cls_token=True, entropy_model=entropy_model,
                                          **frame_options)))
        received.append(np.array(decode_frame(frame, num_tokens=config.num_image_tokens, **frame_options).indices))
    cloud = torch.from_numpy(np.stack(received)).to(next(model.parameters()).device)
    return (cloud[..., 0] if config.codes_per_token == 1 else cloud), sizes, coded


__all__ = [
    "evaluate_vqa",
    "indices_over_the_wire",
    "jpeg_roundtrip",
    "normalize_answer",
    "png_bytes",
    "vqa_accuracy",
    "vqa_score",
]
