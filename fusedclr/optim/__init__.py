"""fusedclr's drop-in optimizers (one class per optimizer; docs/adding-an-optimizer.md)."""

from fusedclr.optim.adagrad import Adagrad
from fusedclr.optim.adam import Adam, AdamW
from fusedclr.optim.lion import Lion
from fusedclr.optim.lookahead import Lookahead
from fusedclr.optim.radam import NAdam, RAdam
from fusedclr.optim.rmsprop import RMSprop
from fusedclr.optim.sgd import SGD

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "Lion", "Lookahead", "NAdam", "RAdam", "RMSprop"]
