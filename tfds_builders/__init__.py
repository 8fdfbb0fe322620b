"""TFDS dataset builders: one package per dataset, each usable from code and from ``tfds build``."""
