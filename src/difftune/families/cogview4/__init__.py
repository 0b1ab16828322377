"""CogView4: facts.py (what the catalog lists), family.py (its code)."""
