"""Pack: sample lengths -> rows, by a packing mode (pure: no files, no tokenizer)."""
