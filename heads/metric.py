"""Metric-learning losses on a batch of embeddings (being written)."""
