"""Losses: distillation terms (Eq. 2, 3, 9), reconstruction, style and adversarial."""
