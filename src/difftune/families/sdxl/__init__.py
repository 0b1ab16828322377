"""Stable Diffusion XL: facts.py (what the catalog lists), family.py (its code, SD's with
two text encoders and time ids), single_file.py (the SGM checkpoint layout)."""
