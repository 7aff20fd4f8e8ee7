"""The PatchGD engine: a pure library (torch, numpy, image readers; no web, database or queue).

Modules: ``config`` (hyperparameters), ``grid`` (patch layout and patch sources), ``models``
(backbones, head, PatchGD and baseline models), ``train`` (step functions and the training loop),
``checkpoint``, ``metrics``, ``infer`` and ``export``.
"""
