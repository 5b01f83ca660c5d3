"""Checkpoint reading, validation and atomic writing."""
