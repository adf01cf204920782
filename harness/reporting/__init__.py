"""Reporting from stored results alone: the papers' tables (``tables``), the figures (``figures``)
and the gate-retraining report (``gates``). Nothing here measures."""
