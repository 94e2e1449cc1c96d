"""Analyses of attention probabilities. They see attention tensors and a
:class:`~probe.geometry.TokenGeometry`, never a model."""
