"""fusedclr's drop-in optimizers (one class per optimizer; docs/adding-an-optimizer.md)."""

from fusedclr.optim.adam import Adam, AdamW
from fusedclr.optim.rmsprop import RMSprop
from fusedclr.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "RMSprop"]
