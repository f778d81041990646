"""The I/O layer: everything that touches files.

Checkpoints (safetensors headers, shards, masks sidecars, metadata), data shards,
architecture resolution and the ``--arch`` / ``--loss`` factories, atomic output writes,
exports, pruned checkpoints, LoRA adapter files, the GradMetaNet head file and the bundled
samples. The engine (capture, estimators) never imports this package: the CLI reads with
it and hands the engine modules, tensors and `DataSample`s. See tests/test_architecture.py
for the layer map.
"""
