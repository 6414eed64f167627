"""Data: RecordIO, datasets, samplers, transforms, synthetic data (being written)."""
