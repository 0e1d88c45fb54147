"""Exports: lowbit checkpoints in the formats other engines serve (`lowbit export`)."""
