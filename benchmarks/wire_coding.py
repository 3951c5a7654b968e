"""Bytes per wire frame and coding time: raw frames, version 1's order-0 coder, and the context-model coder.

    OMP_NUM_THREADS=1 python benchmarks/wire_coding.py [--model DIR] [--skip-llava]

1. easy-VQA, the bundled model (or ``--model``, which needs an ``entropy_model.safetensors``: see
   ``examples/fit_entropy_model.py``): every one of the 1,000 test images, without a question and with
   "what color is the shape?". Rows: the version-1 raw frame (36-byte header) and version-1 order-0 coded frame
   (its static per-index table, fitted here on the training images, coded exactly as version 1 did:
   ``constriction`` ANS, 48-byte header), then version 2: raw, coded (context model), and what the client
   sends (the smaller of the two).
2. Time per frame on one thread: ``wire.encode_frame`` (the edge's part) and ``wire.decode_frame`` (the
   cloud's), for version-2 raw and coded frames with the question, over the same images.
3. LLaVA-1.5 scale, indicative only (random weights): the CLIP ViT-L/14-336 tower of
   ``tests/data/llava-1.5-7b-hf.config.json`` split after the first LayerNorm of block 0, a K = 4096 k-means
   codebook and an entropy model fitted on random crops of five ``skimage.data`` photos, frames (577 tokens)
   measured on crops of three other photos. With trained weights the indices, and so the sizes, differ.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from transformers_alignedvq import wire
from transformers_alignedvq.entropy import EntropyModel, load_entropy_model

QUESTION = "what color is the shape?"
LLAVA_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "llava-1.5-7b-hf.config.json"
TRAIN_PHOTOS = ("cat", "hubble_deep_field", "immunohistochemistry", "retina", "chelsea")
TEST_PHOTOS = ("astronaut", "coffee", "rocket")


def v1_frame_bytes(question: str | None, payload: int, *, coded: bool) -> int:
    """Version 1: 36-byte header, 12-byte entropy extension, payload, u32 prompt length + UTF-8, CRC."""
    prompt = 0 if question is None else 4 + len(question.encode())
    return 36 + (12 if coded else 0) + payload + prompt + 4


def order0_payload_bytes(indices: np.ndarray, categorical) -> int:
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(indices, dtype=np.int32), categorical)
    return 4 * len(coder.get_compressed())


def order0_model(training: np.ndarray, k: int):
    import constriction

    counts = np.bincount(training.ravel(), minlength=k) + 1.0  # version 1's default smoothing
    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def frame_sizes(images: np.ndarray, training: np.ndarray, model: EntropyModel, fingerprint: bytes,
                question: str | None) -> dict[str, list[int]]:
    k, (height, width) = model.codebook_size, model.grid
    options = dict(codebook_size=k, codebook_fingerprint=fingerprint, grid=(height, width),
                   has_cls_token=model.has_cls_token, prompt=question)
    images = images.reshape(len(images), images.shape[1], -1)  # (images, tokens, codes)
    one_code = images.shape[2] == 1  # version 1 carried one code per token: no version-1 rows for more
    order0 = order0_model(training, k) if one_code else None
    raw_payload = wire.raw_payload_bytes(images.shape[1], codebook_size=k)
    rows: dict[str, list[int]] = {"v1 raw": [], "v1 order-0 coded": []} if one_code else {}
    rows.update({"v2 raw": [], "v2 coded (context model)": [], "v2 sent (smaller of the two)": []})
    for image in images:
        image = image[:, 0] if one_code else image
        raw = len(wire.encode_frame(image, **options))
        coded = len(wire.encode_frame(image, entropy_model=model, **options))
        if one_code:
            rows["v1 raw"].append(v1_frame_bytes(question, raw_payload, coded=False))
            rows["v1 order-0 coded"].append(v1_frame_bytes(question, order0_payload_bytes(image, order0), coded=True))
        rows["v2 raw"].append(raw)
        rows["v2 coded (context model)"].append(coded)
        rows["v2 sent (smaller of the two)"].append(min(raw, coded))
    return rows


def print_sizes(title: str, rows: dict[str, list[int]]) -> None:
    print(f"\n{title}")
    print("| frame | mean B | min B | max B |\n|---|---:|---:|---:|")
    for name, sizes in rows.items():
        print(f"| {name} | {np.mean(sizes):.1f} | {min(sizes)} | {max(sizes)} |")


def per_frame_us(function, items) -> float:
    started = time.perf_counter()
    for item in items:
        function(item)
    return 1e6 * (time.perf_counter() - started) / len(items)


def print_times(images: np.ndarray, model: EntropyModel, fingerprint: bytes) -> None:
    options = dict(codebook_size=model.codebook_size, codebook_fingerprint=fingerprint, grid=model.grid,
                   has_cls_token=model.has_cls_token, prompt=QUESTION)
    images = images.reshape(len(images), images.shape[1], -1)  # (images, tokens, codes)
    check = dict(codebook_size=model.codebook_size, codebook_fingerprint=fingerprint, num_tokens=images.shape[1],
                 codes_per_token=images.shape[2], entropy_model=model)
    images = images[:, :, 0] if images.shape[2] == 1 else images
    print(f"\ntime per frame, one thread, {len(images)} images, with the question (us; the machine is shared, "
          "compare within a column)")
    print("| frame | encode (edge) | decode (cloud) | both |\n|---|---:|---:|---:|")
    for name, extra in (("v2 raw", {}), ("v2 coded", {"entropy_model": model})):
        frames = [wire.encode_frame(image, **options, **extra) for image in images]  # also warms the tables
        encode = per_frame_us(lambda image, extra=extra: wire.encode_frame(image, **options, **extra), images)
        decode = per_frame_us(lambda frame: wire.decode_frame(frame, **check), frames)
        print(f"| {name} | {encode:.0f} | {decode:.0f} | {encode + decode:.0f} |")


# ------------------------------------------------------------------------------------------------------
def easy_vqa(model_dir: Path) -> None:
    from transformers_alignedvq.training.entropy_fit import easy_vqa_indices

    model = load_entropy_model(model_dir)
    if model is None:
        raise SystemExit(f"{model_dir} has no entropy model; run examples/fit_entropy_model.py --model {model_dir}")
    training, _, edge = easy_vqa_indices(model_dir, "train")
    test, _, _ = easy_vqa_indices(model_dir, "test")
    test = test.reshape(len(test), test.shape[1], -1)
    print(f"easy-VQA, {model_dir.name}: {len(test)} test images, {test.shape[1]} tokens x {test.shape[2]} codes, "
          f"K={model.codebook_size}; {model!r}")
    height, width = model.grid
    patches = test[:, 1:, 0].reshape(len(test), height, width)  # the first code of each patch
    print(f"patches equal to their left neighbour: {np.mean(patches[:, :, 1:] == patches[:, :, :-1]):.1%}, "
          f"to their upper neighbour: {np.mean(patches[:, 1:] == patches[:, :-1]):.1%}")
    for question in (None, QUESTION):
        title = "without a question" if question is None else f"with the question {question!r}"
        print_sizes(f"frame bytes, {title}", frame_sizes(test, training, model, edge.fingerprint, question))
    print_times(test, model, edge.fingerprint)


def llava_features(photos: tuple[str, ...], crops_per_photo: int, seed: int):
    """Block-0 ``ln1`` features ``(images, 577, 1024)`` of random crops of ``photos`` through the random-weight
    LLaVA-1.5 vision tower (only its embeddings and first block's LayerNorm run: the split site)."""
    import skimage.data
    import torch
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from transformers_alignedvq.preprocess import ImagePreprocessing

    vision = json.loads(LLAVA_CONFIG.read_text())["vision_config"]
    config = CLIPVisionConfig(**{**vision, "num_hidden_layers": 1})
    torch.manual_seed(0)
    model = CLIPVisionModel(config).eval()
    tower = getattr(model, "vision_model", model)  # Transformers 5.24 flattened the wrapper
    preprocessing = ImagePreprocessing.for_vision_config("clip_vision_model", config.image_size)
    rng = np.random.default_rng(seed)
    features = []
    for name in photos:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for _ in range(crops_per_photo):
            side = int(min(photo.size) * rng.uniform(0.5, 1.0))
            left, top = rng.integers(0, photo.size[0] - side + 1), rng.integers(0, photo.size[1] - side + 1)
            crop = photo.crop((left, top, left + side, top + side))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            with torch.no_grad():
                hidden = tower.pre_layrnorm(tower.embeddings(torch.from_numpy(preprocessing(crop))))
                features.append(tower.encoder.layers[0].layer_norm1(hidden)[0])
    return torch.stack(features)


def llava_scale(train_crops: int, test_crops: int) -> None:
    import torch

    from transformers_alignedvq.models.llava_alignedvq.quantizer import kmeans, nearest_codeword

    started = time.perf_counter()
    train = llava_features(TRAIN_PHOTOS, train_crops, seed=0)
    test = llava_features(TEST_PHOTOS, test_crops, seed=1)
    codebook, _ = kmeans(train.reshape(-1, train.shape[-1]), 4096, iters=10,
                         generator=torch.Generator().manual_seed(0))
    train_idx = nearest_codeword(train.reshape(-1, train.shape[-1]), codebook).reshape(len(train), -1).numpy()
    test_idx = nearest_codeword(test.reshape(-1, test.shape[-1]), codebook).reshape(len(test), -1).numpy()
    model = EntropyModel.fit(train_idx, codebook_size=4096, grid=(24, 24), has_cls_token=True)
    fingerprint = wire.codebook_fingerprint(codebook)
    print(f"\nLLaVA-1.5 scale, INDICATIVE (random weights): CLIP ViT-L/14-336 split at block 0 ln1, K=4096 k-means "
          f"on {len(train)} crops of {', '.join(TRAIN_PHOTOS)}; measured on {len(test)} crops of "
          f"{', '.join(TEST_PHOTOS)} ({time.perf_counter() - started:.0f} s to build)")
    print_sizes("frame bytes, 577 tokens, without a question", frame_sizes(test_idx, train_idx, model, fingerprint, None))
    print_times(test_idx, model, fingerprint)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled easy-VQA model)")
    parser.add_argument("--skip-llava", action="store_true", help="only the easy-VQA part")
    parser.add_argument("--llava-train-crops", type=int, default=24, help="random crops per training photo")
    parser.add_argument("--llava-test-crops", type=int, default=10, help="random crops per test photo")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from transformers_alignedvq import TINY_EASYVQA

    easy_vqa(Path(args.model or TINY_EASYVQA))
    if not args.skip_llava:
        llava_scale(args.llava_train_crops, args.llava_test_crops)


if __name__ == "__main__":
    main()
