"""Fine-tuning data preparation scripts (metadata, tags, bucket latents)."""
