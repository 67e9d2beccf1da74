"""Federated-learning tasks: the interface both the edge agent and the cloud load.

A task is named by an import path, ``"package.module:Class"``, and loaded with
:func:`fl_tasks.base.load_task`. edgefl ships one, ``fl_tasks.digits:DigitsTask``.
The package itself imports nothing heavy: ``fl_tasks.errors`` is torch-free, and
``fl_tasks.base`` (torch) is imported by whoever trains or evaluates.
"""
