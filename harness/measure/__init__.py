"""Measurement: the protocol (``protocol``), the compile -> check -> time pipeline (``pipeline``), a
second process that builds artifacts beside it (``build_worker``) and remote boards behind TVM's
RPC tracker (``remote``). Import the submodules; this file imports nothing."""
