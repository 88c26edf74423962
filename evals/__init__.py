"""Evaluation entry points over the aclip library (zero-shot, demo report)."""
