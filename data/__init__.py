"""Data: the shipped corpus, its tfds builder, tokenizer, packing and input pipeline."""
