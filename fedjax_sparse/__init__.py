"""fedjax_sparse: vectorised simulation of sparsified federated learning under poisoning."""

__version__ = "0.1.0"
