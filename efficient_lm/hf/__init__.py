"""Hugging Face checkpoints in and out (issue #19): `python -m
efficient_lm.convert import|export`. families.py maps configs, weights.py
tensor names, importer.py and exporter.py move the tensors."""
