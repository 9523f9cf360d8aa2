"""Compression of trained networks: plan (which layer, which method, which rank), apply, save/load.

Public entry points are re-exported at the top level: ``tensorfold.plan``, ``tensorfold.apply``,
``tensorfold.compress``, ``tensorfold.Plan``, ``tensorfold.save_compressed``, ``tensorfold.load_compressed``.

``tensorfold.compress`` is both this package and the function :func:`tensorfold.compress.api.compress`:
once the package is imported, Python binds the name ``compress`` on ``tensorfold`` to the package,
so the package itself is made callable and forwards to the function. Both spellings work:

>>> import torch, tensorfold as tf
>>> import tensorfold.compress.plan  # binds tf.compress to this package
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> small, p = tf.compress(model, 0.5, methods=("svd",))
>>> p.fraction <= 0.5
True
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from tensorfold.compress.api import compress

        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
