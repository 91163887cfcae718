"""The Sa2VA network on transformers-native parts, its builder, tokenizer and preprocessing."""
