"""distal: Learning Loss for Active Learning at cluster scale, on Ray Train and Ray Data."""

__version__ = "0.1.0"
