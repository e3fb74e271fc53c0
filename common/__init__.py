"""Pieces every layer may use: Ray start-up and a named registry of functions. Imports nothing of vocalign."""
