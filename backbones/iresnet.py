"""InsightFace iResNet family (being written)."""
