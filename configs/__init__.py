"""Experiment configs: ``get_config(arg)`` files loaded by ``--config=configs/X.py[:arg]``."""
