"""Image and speech encoders and their pretraining objectives (later stages)."""
