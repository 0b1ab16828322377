"""Qwen-Image: facts.py (what the catalog lists), family.py (its code), tiny.py (a toy base)."""
