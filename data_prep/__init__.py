"""Data preparation scripts: named corpora (prepare_data.py) and text -> .bin/.idx (preprocess_data.py)."""
