"""Experiment configs: `get_config(arg)` -> ConfigDict (big_vision style)."""
