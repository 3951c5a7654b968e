"""AlignedVQ finetuning of a LLaVA with the Hugging Face `Trainer` (the paper's Section 3.2.3 recipe).

The recipe lives in the package (`transformers_alignedvq.training.finetune`); this script runs it, e.g.

    python examples/finetune_alignedvq.py --base artifacts/base-easyvqa --output runs/alignedvq-easyvqa \\
        --eval-images 200 --save-steps 200
    python examples/finetune_alignedvq.py ... --resume-from-checkpoint last     # after a preemption

`--help` lists every option.
"""

import os

from transformers_alignedvq.training.finetune import main, parse_args  # noqa: F401 (other examples call both)

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
