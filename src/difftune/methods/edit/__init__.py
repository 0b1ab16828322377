"""Edit training (kind "edit"): spec.py (what the catalog lists), method.py (its code)."""
