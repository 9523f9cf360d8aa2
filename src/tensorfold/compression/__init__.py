"""Compression of trained networks: plan (which layer, which method, which rank), apply, save/load.

Public entry points are re-exported at the top level: ``tensorfold.plan``, ``tensorfold.apply``,
``tensorfold.compress``, ``tensorfold.Plan``, ``tensorfold.save_compressed``, ``tensorfold.load_compressed``.
The package is named ``compression`` so that ``tensorfold.compress`` is only ever the function.

>>> import torch, tensorfold as tf
>>> import tensorfold.compression.plan
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> small, p = tf.compress(model, 0.5, methods=("svd",))
>>> p.fraction <= 0.5
True
"""
