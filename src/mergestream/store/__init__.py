"""A merge state on disk: its manifest, its part files and the writes that keep them whole.

- `manifest`: the manifest's format, its checksum, the state's health and identity, the lock
  (no torch: `mergestream status` reads states through it alone).
- `storage`: where the state's tensors live between steps (a directory, or memory): generations
  of part files written, checked on every read and committed by one atomic rename.
- `hashing`: content hashes of checkpoints (the ledger) and cheap fingerprints of the base.
- `atomic`: durable writes (fsync of files and directories) and directories switched in whole.

Below: io and methods. Above: the step, the exports and the state.
"""
