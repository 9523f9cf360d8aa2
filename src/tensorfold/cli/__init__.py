"""The ``tensorfold`` command line (``tensorfold.cli.main:app``).

Importing this package means the process is the command-line tool, so it may choose how the OpenMP
runtime waits: unless the user set ``OMP_WAIT_POLICY``, idle OpenMP threads sleep (``PASSIVE``) instead
of spinning. On a quiet machine this costs nothing measurable; on a shared one spinning threads fight
every other process for the cores (a digits-cnn compress took 24 s instead of 5 s beside one busy
process). It must be set before torch starts its OpenMP runtime, which is why it happens here, before
any command imports torch. Library users set it themselves (see README "Performance").
``USER_OMP_WAIT_POLICY`` keeps what the user had (None: unset), for the process that times a compressed
model as it will be deployed (``tensorfold compress``'s speed line, compression/fresh_speed.py).
"""

import os

USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
