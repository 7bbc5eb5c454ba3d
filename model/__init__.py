"""The network and its checkpoint format. Imports torch (and file-format libraries) only."""
