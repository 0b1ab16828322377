"""Qwen-Image-Edit (and Edit Plus, several references): facts.py (what the catalog lists),
family.py (its code, the Qwen-Image family's with the edit capability), tiny.py (a toy base)."""
