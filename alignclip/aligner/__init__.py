"""Maps from image embeddings into the text space: closed-form baselines and the trained MLP aligner (seeds/000)."""
