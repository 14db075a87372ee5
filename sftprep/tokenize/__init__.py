"""Tokenize and label: texts -> token ids -> labels (-100 where not trained), truncation."""
