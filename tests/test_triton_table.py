"""The table-driven optimizer tests (tests/test_optim_table.py, and tests/test_zero_grad.py's
``zero_grad``) on ``backend="triton"``.

Like tests/test_triton.py, this module sets TRITON_INTERPRET=1 before anything imports
triton or fusedclr and runs in a pytest process of its own (scripts/test.sh), so the
kernels execute on CPU tensors through Triton's interpreter. The tests are imported
from test_optim_table; this module's BACKENDS is what they run on [note: table backends].
The interpreter is slow: the runs use the small shapes (still 10 steps), torch's option
sets (and the table's own for Lion and Lookahead) without fusedclr's extra SGD/Adam
combinations, and one option set per optimizer for the bf16 and checkpoint checks.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from optim_harness import SMALL_SHAPES  # noqa: E402
from test_optim_table import *  # noqa: E402,F403 - the tests and the hook that parametrizes them
from test_optim_table import Backend  # noqa: E402
from test_zero_grad import *  # noqa: E402,F403 - zero_grad(set_to_none=False) through the table


def _why_not_here() -> str:
    import fusedclr.triton as ft

    if not ft.available():
        return f"Triton backend unavailable: {ft.why_unavailable()}"
    if not ft._load().INTERPRETED:
        return ("Triton's interpreter is not active (its kernels were built before TRITON_INTERPRET=1 was set): "
                "run `TRITON_INTERPRET=1 pytest tests/test_triton_table.py` in a process of its own")
    return ""


# Each launch costs the interpreter tens of milliseconds whatever its size: fp32 parity runs every
# option set, the bf16 and checkpoint checks one per optimizer.
BACKENDS = [Backend("triton", shapes=SMALL_SHAPES, small_shapes=SMALL_SHAPES, sources=("torch", "own"),
                    sampled=("test_bf16_error_within_factor_of_reference", "test_state_dict_round_trip_mid_run"),
                    skip=_why_not_here())]
