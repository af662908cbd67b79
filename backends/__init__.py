"""Workers that run models: HuggingFace (logits-based context switch)."""
