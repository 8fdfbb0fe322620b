"""Data: record I/O, TFDS packaging, image preprocessing, tokenizers, templates, grain pipeline."""
