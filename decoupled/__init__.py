"""decoupled: parallel layer-wise (decoupled) training for PyTorch."""
__version__ = "0.1.0"
