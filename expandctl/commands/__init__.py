"""The commands of ``expandctl``, one module each; :mod:`expandctl.cli` registers them from one list.

``train``, ``analyze``/``plot``, ``compare`` and ``quantize`` live beside their libraries
(:mod:`expandctl.train.command`, :mod:`expandctl.analysis.command`, :mod:`expandctl.experiments.command`,
:mod:`expandctl.quantize_command`) and are registered from the same list.
"""
