"""``alignedvq demo``: the bundled (or a given) model served on loopback, asked by the edge client about easy-VQA
test images, with bytes sent against PNG and JPEG-90 and the edge/transfer/cloud times of every answer."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path


def _normalise(text: str) -> str:
    return " ".join(text.lower().replace("?", " ").replace(".", " ").split())


def _encoded_size(image, fmt: str, **options) -> int:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt, **options)
    return buffer.tell()


def demo_samples(images: int, questions_per_image: int, split: str = "test") -> list[dict]:
    """``[{"image": PIL, "question", "answer", "image_id"}]`` from the first ``images`` easy-VQA images."""
    from PIL import Image

    try:
        from .training.data import load_easy_vqa
    except ImportError:  # the data module (or `datasets`) is absent: read the easy-vqa package directly
        load_easy_vqa = None
    rows: list[dict] = []
    per_image: dict[int, int] = {}
    if load_easy_vqa is not None:
        # The split is ordered by image, about 8 questions each; over-read so `images` distinct ones appear.
        dataset = load_easy_vqa(split, limit=images * 24)
        source = ({"image": r["image"], "question": r["question"], "answer": r["answer"], "image_id": r["image_id"]}
                  for r in dataset)
    else:
        import easy_vqa

        questions, answers, ids = getattr(easy_vqa, f"get_{split}_questions")()
        paths = getattr(easy_vqa, f"get_{split}_image_paths")()
        source = ({"image": Image.open(paths[i]).convert("RGB"), "question": q, "answer": a, "image_id": i}
                  for q, a, i in zip(questions, answers, ids))
    for row in source:
        image_id = row["image_id"]
        if image_id not in per_image and len(per_image) == images:
            break
        if per_image.get(image_id, 0) < questions_per_image:
            per_image[image_id] = per_image.get(image_id, 0) + 1
            rows.append(row)
    return rows


def run_demo(folder: Path, *, images: int, questions_per_image: int, max_new_tokens: int,
             max_batch_size: int) -> int:
    """Serve ``folder`` on loopback, run the edge client on easy-VQA test images, print one row per question."""
    import shutil

    from transformers import AutoModel, AutoProcessor

    from .client import EdgeClient
    from .entropy import ENTROPY_MODEL_NAME, load_entropy_model
    from .serving import BackgroundServer, ServerConfigError, create_app
    from .serving.connection_limits import ConnectionLimits

    samples = demo_samples(images, questions_per_image)
    if not samples:
        raise ValueError("no easy-VQA samples found")
    model, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as scratch:
        edge_dir = Path(scratch) / "edge"  # what `alignedvq export-edge` writes, from the model loaded once
        model.edge_encoder(processor).save_pretrained(edge_dir)
        if (folder / ENTROPY_MODEL_NAME).is_file():
            shutil.copyfile(folder / ENTROPY_MODEL_NAME, edge_dir / ENTROPY_MODEL_NAME)
        try:
            app = create_app(model, processor=processor, entropy_model=load_entropy_model(folder),
                             max_new_tokens=max_new_tokens, max_batch_size=max_batch_size)
        except ServerConfigError as exc:
            raise ValueError(str(exc)) from exc
        # One client on loopback: small limits, so the demo also runs where few open files are allowed.
        limits = ConnectionLimits(max_connections=64, backlog=64)
        with BackgroundServer(app, host="127.0.0.1", port=0, limits=limits) as server, \
                EdgeClient(edge_dir, server.url) as client:
            client.encode(samples[0]["image"], samples[0]["question"])  # warm-up: first calls load lazily
            print(f"cloud server on {server.url}; edge client loaded from the exported edge part "
                  f"({client.edge.num_bytes / 2**20:.2f} MiB of weights and search tables)")
            correct = 0
            header = (f"{'question':<40} {'answer':<16} {'truth':<10} {'sent':>5} {'PNG':>6} {'JPEG90':>6} "
                      f"{'edge':>6} {'xfer':>6} {'cloud':>7}")
            print(header)
            print("-" * len(header))
            for row in samples:
                answer = client.ask(row["image"], row["question"])
                ok = _normalise(answer.text) == _normalise(row["answer"])
                correct += ok
                print(f"{row['question'][:40]:<40} {answer.text[:16]:<16} {row['answer'][:10]:<10} "
                      f"{answer.bytes_sent:>5} {_encoded_size(row['image'], 'PNG'):>6} "
                      f"{_encoded_size(row['image'], 'JPEG', quality=90):>6} {answer.edge_ms:>6.1f} "
                      f"{answer.transfer_ms:>6.1f} {answer.cloud_ms:>7.1f}")
    print(f"accuracy: {correct}/{len(samples)} = {correct / len(samples):.1%}  (bytes in B, times in ms)")
    return 0


__all__ = ["demo_samples", "run_demo"]
