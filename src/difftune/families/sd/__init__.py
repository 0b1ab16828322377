"""Stable Diffusion 1.x / 2.x: facts.py (what the catalog lists), family.py (its code),
single_file.py and controlnet_file.py (its original checkpoint layouts)."""
