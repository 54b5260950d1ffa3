"""Pretraining with Lightning: ``MerinoLightningModule`` (module.py), ``merino-pl fit``
(cli.py, LightningCLI) and the callbacks it installs (callbacks.py)."""
