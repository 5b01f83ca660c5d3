"""Evaluation: perplexity per domain, lm-eval multiple-choice tasks, expert usage, speed and memory."""
