"""Victims, denoisers and the LightningModules that train them."""
