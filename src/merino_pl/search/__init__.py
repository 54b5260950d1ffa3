"""Entropy-driven architecture search (paper Eq. 7–15, Algorithms 1–2): recipes from budgets."""
