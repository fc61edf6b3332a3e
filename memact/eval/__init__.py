"""Evaluation: accuracy beside context length for policies, strategies and external models."""
