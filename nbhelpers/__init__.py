"""Helpers behind the cxr-workbook notebooks: settings, devices, data, models, training, CAMs."""

__version__ = "0.1.0"
