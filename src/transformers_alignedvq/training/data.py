"""easy-VQA data pipeline for training and evaluating small LLaVA models.

This is a training-side module: it needs ``datasets``, ``easy_vqa`` and Pillow
(the ``train`` extra) and is deliberately not imported by the package
``__init__`` so that inference-only installs do not pay for those imports.

The easy-VQA dataset (PyPI ``easy-vqa``) ships inside the package itself
(PNG images + JSON question files), so everything here works offline.

Conversation format (one image, one question, one answer)::

    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]

Padding convention of :class:`VQACollator`:

* ``train=True``: **right** padding. Labels are aligned with ``input_ids`` and
  padded positions are ``-100``, so right padding keeps every real token at the
  same absolute position as in an unpadded sequence and costs nothing.
* ``train=False``: **left** padding, because batched ``generate`` appends new
  tokens at the right end of every row; with right padding the first generated
  token of shorter prompts would follow pad tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import torch
from PIL import Image

__all__ = [
    "EASY_VQA_SIZES",
    "VALIDATION_IMAGES",
    "VALIDATION_SEED",
    "EasyVQAAugment",
    "ImageGroupedBatchSampler",
    "VQACollator",
    "build_messages",
    "easy_vqa_answers",
    "format_prompt",
    "format_conversation",
    "image_attributes",
    "load_easy_vqa",
    "validation_image_ids",
    "one_question_per_image",
    "question_template",
    "EASY_VQA_COLORS",
    "EASY_VQA_SHAPES",
]

# Number of questions per split (train and validation together are the
# published training split, 38,575 questions on 4,000 images); used by tests and
# as a sanity check that the installed package is the expected release.
EASY_VQA_SIZES = {"train": 35_736, "validation": 2_839, "test": 9_673}

# easy-VQA publishes train (4,000 images) and test (1,000 images) only. Choices
# (recipe, split site, epochs, PTQ options) need held-out data that is not the
# test split, so "validation" is carved from the training images: this many
# images, drawn once with this seed, with all their questions. Carving by image
# (not by question) keeps every validation image unseen by a model trained on
# "train". Changing either number changes every split, so both are fixed.
VALIDATION_IMAGES = 300
VALIDATION_SEED = 22

IGNORE_INDEX = -100

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "easy-VQA data needs the `easy-vqa` package: pip install 'transformers-alignedvq[train]'"
        ) from exc
    return easy_vqa


def easy_vqa_answers() -> list[str]:
    """The 13 possible answers of easy-VQA, in the package's canonical order."""
    return list(_easy_vqa().get_answers())


def validation_image_ids(train_image_ids: Sequence[int]) -> frozenset[int]:
    """The training-image ids that form the validation split (``VALIDATION_IMAGES`` of them, fixed seed)."""
    distinct = sorted({int(i) for i in train_image_ids})
    if len(distinct) <= VALIDATION_IMAGES:
        raise ValueError(f"easy-VQA train has {len(distinct)} images; cannot hold out {VALIDATION_IMAGES}")
    return frozenset(random.Random(VALIDATION_SEED).sample(distinct, VALIDATION_IMAGES))


def _split_questions(ev, split: str):
    """(questions, answers, image_ids, paths) of one split, in the package's order."""
    if split == "test":
        questions, answers, image_ids = ev.get_test_questions()
        return list(questions), list(answers), list(image_ids), ev.get_test_image_paths()
    if split not in ("train", "validation"):
        raise ValueError(f"unknown easy-VQA split {split!r}; expected 'train', 'validation' or 'test'")
    questions, answers, image_ids = ev.get_train_questions()
    held_out = validation_image_ids(image_ids)
    keep = [(i in held_out) == (split == "validation") for i in image_ids]
    rows = [row for row, kept in zip(zip(questions, answers, image_ids), keep) if kept]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], ev.get_train_image_paths()


def load_easy_vqa(split: str, *, limit: int | None = None) -> datasets.Dataset:
    """Load an easy-VQA split as a ``datasets.Dataset``.

    ``split`` is ``"train"``, ``"validation"`` or ``"test"``. The published
    dataset has no validation split: ``"validation"`` is ``VALIDATION_IMAGES``
    training images drawn with a fixed seed (all their questions), and
    ``"train"`` is the rest of the training images. Make every choice on
    ``"validation"`` and keep ``"test"`` for the numbers that are reported.

    Columns: ``image`` (``datasets.Image`` feature, decoded to PIL on access),
    ``question`` (str), ``answer`` (str) and ``image_id`` (int, unique within a
    split; train and validation share the training image ids, test has its own).

    ``limit`` keeps the first ``limit`` questions in the package's order, which
    groups questions by image; that makes small limits deterministic and cheap
    (few distinct images), which is what smoke tests want.
    """
    questions, answers, image_ids, paths = _split_questions(_easy_vqa(), split)
    if limit is not None:
        if limit < 0:
            raise ValueError("limit must be non-negative")
        questions, answers, image_ids = questions[:limit], answers[:limit], image_ids[:limit]
    missing = {i for i in image_ids if i not in paths}
    if missing:
        raise FileNotFoundError(f"easy-VQA {split}: no image file for ids {sorted(missing)[:5]}")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image_id": datasets.Value("int32"),
        }
    )
    named = {"train": datasets.Split.TRAIN, "validation": datasets.Split.VALIDATION, "test": datasets.Split.TEST}
    # Storing paths (not bytes) keeps construction instant; the Image feature
    # decodes lazily from the files installed with the package.
    return datasets.Dataset.from_dict(
        {
            "image": [paths[i] for i in image_ids],
            "question": list(questions),
            "answer": list(answers),
            "image_id": [int(i) for i in image_ids],
        },
        features=features,
        split=named[split],
    )


def one_question_per_image(data: datasets.Dataset, count: int, *, seed: int = 0) -> datasets.Dataset:
    """``count`` rows of ``data`` with distinct images (the first ``count`` image ids in sorted order), one
    question drawn at random per image: calibration data that covers many images with few sequences."""
    rng = random.Random(seed)
    rows_by_image: dict[int, list[int]] = {}
    for row, image_id in enumerate(data["image_id"]):
        rows_by_image.setdefault(int(image_id), []).append(row)
    if count > len(rows_by_image):
        raise ValueError(f"count={count} but the data holds only {len(rows_by_image)} images.")
    return data.select([rng.choice(rows_by_image[key]) for key in sorted(rows_by_image)[:count]])


def image_attributes(questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]) -> dict[int, dict[str, str]]:
    """Colour and shape of each image, read off its question/answer pairs.

    easy-VQA draws one shape per image and asks templated questions about it
    ("what color is the shape?" -> colour, "what shape is present?" -> shape,
    "what is the red shape?" -> shape *and* colour, "is there not a blue
    shape?" -> "no" means blue, ...). Attributes that no question of an image
    pins down are absent from its dict (a few percent of images per
    attribute). Used for the vision-tower pretraining stage of the example
    trainer, which stands in for LLaVA's pretrained CLIP encoder.
    """
    import re

    colors, shapes = set(EASY_VQA_COLORS), set(EASY_VQA_SHAPES)
    out: dict[int, dict[str, str]] = {}
    for question, answer, image_id in zip(questions, answers, image_ids):
        attrs = out.setdefault(int(image_id), {})
        words = set(re.findall(r"[a-z]+", question.lower()))
        if question.lower().startswith("what"):
            for key, vocab in (("color", colors), ("shape", shapes)):
                if answer in vocab:
                    attrs[key] = answer
            # "what is the red shape?" / "what is the color of the circle?"
            # name the other attribute in the question itself.
            for key, vocab in (("color", colors), ("shape", shapes)):
                named = words & vocab
                if named and answer not in vocab:
                    attrs[key] = named.pop()
        else:
            positive = (answer == "yes") != bool(words & {"not", "no"})
            if positive:
                for key, vocab in (("color", colors), ("shape", shapes)):
                    named = words & vocab
                    if named:
                        attrs[key] = named.pop()
    return out


def question_template(question: str) -> str:
    """The easy-VQA template of ``question``: colour words become ``<colour>``, shape words ``<shape>``."""
    text = question.lower()
    for words, slot in ((EASY_VQA_COLORS, "<colour>"), (EASY_VQA_SHAPES, "<shape>")):
        text = re.sub(r"\b(" + "|".join(words) + r")\b", slot, text)
    return text


def build_messages(question: str, answer: str | None = None) -> list[dict[str, Any]]:
    """LLaVA-style conversation for one image and one question (and its answer)."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def format_prompt(processor, question: str) -> str:
    """Prompt string (ending with the assistant header) for generation."""
    return processor.apply_chat_template(build_messages(question), add_generation_prompt=True, tokenize=False)


def format_conversation(processor, question: str, answer: str) -> str:
    """Full training string: prompt, answer and the template's end-of-turn."""
    return processor.apply_chat_template(build_messages(question, answer), tokenize=False)


def _background_bbox(arr: "Any", tol: int = 24) -> tuple[int, int, int, int] | None:
    """Bounding box (top, bottom, left, right; inclusive) of non-background pixels.

    easy-VQA images are one shape on a flat, slightly tinted background, so the
    corner pixel is the background colour.
    """
    import numpy as np

    bg = arr[0, 0].astype(np.int16)
    diff = np.abs(arr.astype(np.int16) - bg).max(axis=-1) > tol
    rows, cols = np.flatnonzero(diff.any(axis=1)), np.flatnonzero(diff.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


class EasyVQAAugment:
    """Label-preserving augmentation for easy-VQA images.

    * horizontal flip: every easy-VQA shape (upright triangle, axis-aligned
      rectangle, circle) is mirror-symmetric in class, and colours are kept;
    * translation that keeps the whole shape inside the frame: the shape's
      bounding box is found against the flat background and the shift is drawn
      from the free margin, so no shape is ever cut (which could change the
      answer to "what shape is it?"); the uncovered border is filled with the
      background colour, matching the data distribution.

    No colour jitter and no vertical flips/rotations: colour is an answer, and
    the generator only draws upright triangles.
    """

    def __init__(self, *, flip: bool = True, translate: bool = True, seed: int | None = None):
        self.flip = flip
        self.translate = translate
        self.rng = random.Random(seed)

    def __call__(self, image: Image.Image) -> Image.Image:
        import numpy as np

        arr = np.asarray(image.convert("RGB"))
        if self.flip and self.rng.random() < 0.5:
            arr = arr[:, ::-1]
        if self.translate:
            box = _background_bbox(arr)
            if box is not None:
                top, bottom, left, right = box
                h, w = arr.shape[:2]
                dy = self.rng.randint(-top, h - 1 - bottom)
                dx = self.rng.randint(-left, w - 1 - right)
                if dy or dx:
                    out = np.empty_like(arr)
                    out[...] = arr[0, 0]
                    src = arr[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
                    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
                    arr = out
        return Image.fromarray(np.ascontiguousarray(arr))


class ImageGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches made of *all* questions of ``images_per_batch`` random images.

    easy-VQA has ~10 questions per image. Grouping them lets a training loop
    run the vision tower once per distinct image instead of once per question
    (identical ``pixel_values`` rows, see :class:`VQACollator`), which is most
    of the compute for a LLaVA with a patch-8 ViT. Batch sizes vary with the
    number of questions of the drawn images. The image order is reshuffled on
    every ``iter()`` from ``seed`` and an internal epoch counter, so runs are
    reproducible.
    """

    def __init__(self, image_ids: Sequence[int], images_per_batch: int, *, seed: int = 0, drop_last: bool = False):
        if images_per_batch < 1:
            raise ValueError("images_per_batch must be >= 1")
        groups: dict[int, list[int]] = {}
        for idx, image_id in enumerate(image_ids):
            groups.setdefault(int(image_id), []).append(idx)
        self.groups = list(groups.values())
        self.images_per_batch = images_per_batch
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.groups)
        return n // self.images_per_batch if self.drop_last else -(-n // self.images_per_batch)

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = list(range(len(self.groups)))
        rng.shuffle(order)
        for start in range(len(self)):
            chunk = order[start * self.images_per_batch : (start + 1) * self.images_per_batch]
            batch = [i for g in chunk for i in self.groups[g]]
            rng.shuffle(batch)
            yield batch


class VQACollator:
    """Batch easy-VQA examples for a LLaVA processor.

    ``train=True`` returns ``input_ids``, ``attention_mask``, ``pixel_values``
    and ``labels``; labels are ``-100`` everywhere except the answer tokens and
    the end-of-turn token(s) the chat template puts after them (the EOS token
    for the easy-VQA template), so the loss is the answer likelihood only.
    Sequences are right-padded.

    ``train=False`` returns the generation prompt (``add_generation_prompt``)
    tokenised with left padding, plus ``answers`` and ``questions`` (lists of
    str, not tensors: pop them before calling the model).

    ``image_transform`` is an optional callable ``PIL.Image -> PIL.Image``
    applied to every image before the image processor (e.g.
    :class:`EasyVQAAugment`); it is only used when ``train=True``. Examples
    of one batch that share an ``image_id`` get the *same* transformed image,
    so their ``pixel_values`` rows are identical (see
    :class:`ImageGroupedBatchSampler`, which lets a training loop encode each
    distinct image once).
    """

    def __init__(
        self,
        processor,
        *,
        train: bool,
        image_transform: Callable[[Image.Image], Image.Image] | None = None,
    ):
        self.processor = processor
        self.train = train
        self.image_transform = image_transform
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        # easy-VQA has only a few hundred distinct question strings; rendering
        # the Jinja template and tokenising the prompt for every row otherwise
        # costs as much as a training step of a small model.
        self._prompts: dict[str, str] = {}
        self._conversations: dict[tuple[str, str], str] = {}
        self._prompt_ids: dict[str, list[int]] = {}

    def _prompt(self, question: str) -> str:
        if question not in self._prompts:
            self._prompts[question] = format_prompt(self.processor, question)
        return self._prompts[question]

    def _conversation(self, question: str, answer: str) -> str:
        key = (question, answer)
        if key not in self._conversations:
            self._conversations[key] = format_conversation(self.processor, question, answer)
        return self._conversations[key]

    @staticmethod
    def _image(example) -> Image.Image:
        image = example["image"]
        if isinstance(image, dict):  # undecoded datasets.Image value
            image = datasets.Image().decode_example(image)
        return image.convert("RGB")

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        images = [self._image(ex) for ex in examples]
        questions = [ex["question"] for ex in examples]
        if not self.train:
            prompts = [self._prompt(q) for q in questions]
            batch = self.processor(
                images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt"
            )
            out = dict(batch)
            out["answers"] = [ex["answer"] for ex in examples]
            out["questions"] = questions
            return out

        if self.image_transform is not None:
            done: dict[Any, Image.Image] = {}
            transformed = []
            for ex, im in zip(examples, images):
                key = ex.get("image_id", object())  # no id: never shared
                if key not in done:
                    done[key] = self.image_transform(im)
                transformed.append(done[key])
            images = transformed
        texts = [self._conversation(q, ex["answer"]) for q, ex in zip(questions, examples)]
        batch = self.processor(images=images, text=texts, padding=True, padding_side="right", return_tensors="pt")
        input_ids = batch["input_ids"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        tokenizer = self.processor.tokenizer
        for row, question in enumerate(questions):
            # Tokenise the prompt with the image token expanded exactly as the
            # processor expanded it in the full text, so its token ids are a
            # prefix of the full row and its length is where the answer starts.
            n_image = int((input_ids[row] == self.image_token_id).sum())
            prompt = self._prompt(question).replace(self.image_token, self.image_token * n_image, 1)
            if prompt not in self._prompt_ids:
                self._prompt_ids[prompt] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            prompt_ids = self._prompt_ids[prompt]
            n_prompt = len(prompt_ids)
            if not torch.equal(input_ids[row, :n_prompt], torch.tensor(prompt_ids, dtype=input_ids.dtype)):
                raise ValueError(
                    "chat template is not prefix-consistent: the generation prompt does not "
                    "tokenise to a prefix of the full conversation"
                )
            n_real = int(batch["attention_mask"][row].sum())
            labels[row, n_prompt:n_real] = input_ids[row, n_prompt:n_real]
        out = dict(batch)
        out["labels"] = labels
        return out
