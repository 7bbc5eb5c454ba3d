"""Turns text into checkpoints. Imports model/, never server/."""
