"""The run's environment document, ``env.json``: what ran, where, with which options, and which
earlier runs the folder's exports also hold. One place for its schema.

Contract
--------
``run_document(...) -> dict``: the document a run records in the store when it starts (the
store keeps one per run). ``complete_document(doc, store, layout, skipped, exported_run_ids,
wall_s)`` fills in what is known at the end and writes ``layout.env_json``:

- ``skipped``: the run's skipped backends and phases, and those of the folder's previous
  ``env.json`` for backends this run measured nothing of (the folder's story, not the run's);
- ``wall_time_s``; ``drift``: per round phase of the run, the spread of its rounds' speed factors;
- ``earlier_runs``: one :func:`earlier_run` entry per other run in the store, and those the
  previous ``env.json`` named whose results are still exported (a store rebuilt from scratch
  would otherwise forget them).

A previous ``env.json`` that is absent or unreadable contributes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.results.layout import Layout
from harness.results.store import ResultStore


def run_document(*, run_id: str, target: str, profile_path: str, expected_device: str | None, threads: int,
                 device_name: str, device_mismatch: bool, quick: bool, backend_options: dict, protocol: dict,
                 backends: list[str], skipped: dict, env: dict, farm=None) -> dict:
    """The document recorded when a run starts: ``target`` the profile's name; ``farm`` the boards
    (a :class:`harness.measure.remote.Farm`) when measured through RPC."""
    return {"run_id": run_id, "target": target, "profile_path": profile_path,
            "device_name": device_name, "expected_device": expected_device,
            "device_mismatch": device_mismatch, "quick": quick, "threads": threads,
            "backend_options": backend_options, "protocol": protocol, "backends": backends,
            "skipped": skipped, "env": env,
            "remote": None if farm is None else {"tracker": farm.tracker_addr, "key": farm.key,
                                                 "boards": farm.boards, "emulated": farm.emulated,
                                                 "board_info": farm.info}}


def earlier_run(doc: dict) -> dict:
    """The entry a run's document gets in a later run's ``earlier_runs``."""
    env = doc.get("env") if isinstance(doc.get("env"), dict) else {}
    return {"run_id": doc.get("run_id"), "time_utc": env.get("time_utc"), "busy": env.get("busy"),
            "cpu_steal_percent": env.get("cpu_steal_percent"), "device_name": doc.get("device_name")}


def previous_document(env_json: Path) -> dict:
    """The folder's previous ``env.json`` (``{}`` when absent or unreadable)."""
    try:
        doc = json.loads(env_json.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def complete_document(doc: dict, store: ResultStore, layout: Layout, skipped: dict,
                      exported_run_ids: set, wall_s: float, previous: dict) -> dict:
    """``doc`` completed at the end of the run and written to ``layout.env_json``. ``previous``: the
    :func:`previous_document`, read before the exports were rewritten."""
    measured = set(doc.get("backends", []))
    old_skipped = previous.get("skipped") if isinstance(previous.get("skipped"), dict) else {}
    doc["skipped"] = {**{str(b): str(why) for b, why in old_skipped.items()
                         if str(b).split(" ")[0].split("/")[0] not in measured}, **skipped}
    doc["wall_time_s"] = round(wall_s, 1)
    in_store = store.runs()
    in_store_ids = {d.get("run_id") for d in in_store}
    before = ([earlier_run(previous)] if previous else []) + [
        r for r in previous.get("earlier_runs", []) if isinstance(r, dict)]
    doc["earlier_runs"] = [earlier_run(d) for d in in_store if d.get("run_id") != doc["run_id"]] + [
        r for r in before if r.get("run_id") not in in_store_ids and r.get("run_id") in exported_run_ids]
    doc["drift"] = store.drift(doc["run_id"])
    layout.env_json.write_text(json.dumps(doc, indent=1))
    return doc
