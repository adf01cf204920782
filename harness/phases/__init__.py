"""The phases of a run, each written on ``harness.measure.pipeline``: the static sweep (``static``),
the dynamic engine (``dynamic``), DS-Net++ Table 2 (``table2``) and gate retraining (``retraining``);
``context`` holds what they share (target, store, protocol, backends)."""
