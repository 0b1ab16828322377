"""Textual inversion: spec.py (its [method] settings, what it needs), method.py (its code)."""
