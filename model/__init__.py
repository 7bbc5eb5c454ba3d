"""The network and its checkpoint format, and what every command shares (device and CPU
setup, the command line). Imports torch, numpy and file-format libraries only."""
