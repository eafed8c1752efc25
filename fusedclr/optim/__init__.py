"""fusedclr's drop-in optimizers."""

from fusedclr.optim.adam import Adam, AdamW
from fusedclr.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
