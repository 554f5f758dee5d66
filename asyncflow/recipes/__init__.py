"""Recipes: the visible loops that drive the workers of a run (see grpo.py)."""
