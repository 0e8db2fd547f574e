"""LLM sparsity: calibration, sensitivity profile, plans, strategists (built-in and LLM), loop, export, run."""
