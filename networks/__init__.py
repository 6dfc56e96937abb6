"""Network modules (LoRA, DyLoRA) and the tools that read and write them."""
