"""Reading and writing checkpoints, one tensor at a time; the lowest floor above the foundation.

- `source`: the reader contract (`TensorSource`), an in-memory source, where a tensor lives.
- `safetensors_stream`, `torch_zip`, `checkpoint`: the file formats (safetensors read and
  written by tensor; PyTorch zip archives checked, then memory-mapped) and finding a
  checkpoint's files on disk.
- `mapping`: fitting a checkpoint's tensor names to the base's, and checking that it fits.
- `lora`: PEFT LoRA adapters read as task vectors.
- `open`: the one entry point, `open_checkpoint`, which knows every input format.
- `checksum`: CRC-32 of a file's bytes (no torch: `mergestream status --verify` uses it).

Nothing here imports from the floors above (methods, store, step, ...).
"""
