"""Training with quantisation: QLoRA adapters, QAT with the straight-through estimator, ternary BitNet."""
