"""Margin heads applied to cosine logits inside Partial FC (being written)."""
