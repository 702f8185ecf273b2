"""Measurement: rolling-window perplexity and lm-eval capabilities."""
