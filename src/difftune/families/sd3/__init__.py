"""Stable Diffusion 3 / 3.5: facts.py (what the catalog lists), family.py (its code), tiny.py (a random-weight base for tests)."""
