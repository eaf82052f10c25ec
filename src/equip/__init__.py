"""equip: config-driven CNN experiments on equipment photos, tracked in MLflow."""

__version__ = "0.1.0"
