"""spo-pipeline: preference alignment (DPO, IPO, KTO) with the SPO preference-degree loss."""

__version__ = "0.1.0"
