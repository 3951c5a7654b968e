"""One image, many questions: bytes on the wire per question with follow-ups (`wire_followup`) against a frame
per question, on easy-VQA test images with the bundled model (or ``--model``), and the server's memory per
kept image (`image_cache`).

    python benchmarks/followups.py                  # 50 images x up to 10 questions, about a minute on a CPU
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from transformers_alignedvq import DEFAULT_MODEL
from transformers_alignedvq.client import EdgeClient
from transformers_alignedvq.demo import demo_samples
from transformers_alignedvq.serving.image_cache import ENTRY_OVERHEAD, ImageCache
from transformers_alignedvq.wire_followup import encode_followup, image_digest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--questions-per-image", type=int, default=10)
    args = parser.parse_args()
    samples = demo_samples(args.images, args.questions_per_image)
    by_image: dict[int, list] = {}
    for row in samples:
        by_image.setdefault(row["image_id"], []).append(row)
    client = EdgeClient(args.model, "http://unused.invalid")  # only its edge and frames are used
    frames, followups, first, sizes = [], [], [], []
    for rows in by_image.values():
        indices = client.edge.encode_image(rows[0]["image"])
        digest = image_digest(indices, client.fingerprint)
        per_question = [len(client._frame(indices, row["question"])) for row in rows]
        frames += per_question
        first.append(per_question[0])
        followups += [len(encode_followup(digest, row["question"], entropy_model=client.entropy_model))
                      for row in rows[1:]]
        sizes.append(np.asarray(indices).size)
    cache = ImageCache()
    entry = max(sizes) * (2 if client.codebook_size <= 2**15 else 4) + ENTRY_OVERHEAD
    questions = len(frames)
    print(f"model {Path(args.model).name}: {len(by_image)} images, {questions} questions "
          f"(K={client.codebook_size}, {max(sizes)} indices per image)")
    print(f"{'':32} {'mean B':>8} {'min':>5} {'max':>5}")
    print(f"{'frame per question':32} {np.mean(frames):8.1f} {min(frames):5d} {max(frames):5d}")
    print(f"{'follow-up question':32} {np.mean(followups):8.1f} {min(followups):5d} {max(followups):5d}")
    total_frames = sum(frames)
    total_reuse = sum(first) + sum(followups)
    print(f"all questions: {total_frames} B as frames, {total_reuse} B with follow-ups "
          f"({total_reuse / total_frames:.1%})")
    print(f"server memory per kept image: {entry} B; default bound {cache.max_entries} images or "
          f"{cache.max_bytes / 2**20:.0f} MiB -> at most {min(cache.max_entries * entry, cache.max_bytes) / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
