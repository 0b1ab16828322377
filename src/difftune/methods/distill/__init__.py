"""Step distillation into adapters: spec.py (its [method] settings, what it needs),
method.py (its code; "lcm": latent consistency distillation into a LoRA)."""
