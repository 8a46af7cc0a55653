"""Maps from image embeddings into the text space: closed-form baselines and the trained MLP aligner
(Vu, Balashova & Tran 2024, "Closing the Gap of Latent Spaces for Image-Text Arithmetic")."""
