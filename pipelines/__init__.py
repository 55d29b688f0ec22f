"""Ray Data preprocessing: read conversation files, validate, render with the chat template, tokenize, split."""
