"""Downstream evaluation on embeddings: zero-shot classification, retrieval, linear probe, multimodal arithmetic."""
