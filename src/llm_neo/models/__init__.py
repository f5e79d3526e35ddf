"""The models: loading and vocabulary checks, LoRA variants and merge, activation checkpointing, depth
pruning, and the tiny random models the tests and the demo build. Import from the submodules."""
