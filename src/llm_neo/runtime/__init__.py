"""Plumbing every stage relies on: atomic writes, checkpoints, torch.distributed (FSDP2), memory
accounting and worker processes. Nothing here knows about distillation. Import from the submodules."""
