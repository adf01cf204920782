"""Measurement: the protocol (``protocol``), the compile -> check -> time pipeline (``pipeline``) and
remote boards behind TVM's RPC tracker (``remote``). Import the submodules; this file imports nothing."""
