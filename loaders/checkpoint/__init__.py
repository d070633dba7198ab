"""Checkpoint readers: tensor naming schemes, the safetensors format and the disk
loader, Hugging Face model directories, and deterministic synthetic checkpoints."""
