"""``python -m harness.retrain_gate``: retrain a supernet's gate for real latency on a target.

Flow (one direction): data -> stage-I supernet (trained here, or ``--checkpoint``) -> per-route
costs (MAdds computed; latency from the target's LUT, measured here when missing) -> stage II per
penalty (``dsnet.training.train_gate``) -> evaluation (accuracy, route histogram, expected MAdds,
LUT latency) -> the dynamic engine of each retrained gate compiled through ``--backend`` and timed
on the validation images, one image per call, every gate interleaved in one run -> report.

Everything lands in ``<out>`` (default ``results/<target>``):

- ``gate_retraining/<model>-<data>-<size>px/``: the workspace. ``supernet.pt`` (stage I),
  ``gate-<penalty>-<backend>.pt`` (stage II), ``results.sqlite`` and ``dynamic.csv`` (the LUT,
  when measured here). A re-run reuses every checkpoint whose settings match: an interrupted run
  loses at most the stage it was in.
- ``gate_retraining.md`` / ``.csv`` / ``_routes.csv`` and ``figures/gate_retraining.png``: the
  comparison, with the environment.

Exit codes: 0 done; 2 bad input (one line: unknown model or backend, missing data folder, a LUT
that does not match the model, unreadable checkpoint, a target this machine cannot run); 3 busy
under ``--strict``; 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import uuid
import warnings
from dataclasses import asdict
from pathlib import Path

from harness.run import RESULTS_DIR, UsageError, capture_machine, open_target

PENALTIES = ("madds", "latency")
DEFAULT_INPUT_SIZE = 64  # the digits demo; ImageNet folders want 224


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m harness.retrain_gate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a supernet, e.g. ds_mbnet, ds_resnet50")
    p.add_argument("--target", required=True, help="target profile (see targets/)")
    p.add_argument("--backend", required=True, help="backend whose LUT prices the routes and that runs the engine")
    p.add_argument("--penalty", default="both", choices=PENALTIES + ("both",),
                   help="complexity penalty: MAdds (the paper), LUT latency, or both side by side (default)")
    p.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn's digits, shipped, the default) or an ImageFolder with train/ and val/")
    p.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE, help="square input resolution")
    p.add_argument("--checkpoint", type=Path, help="stage-I supernet to start from (skips stage I): a "
                                                   "dsnet-harness checkpoint or an official DS-Net state dict")
    p.add_argument("--lut", type=Path, help="folder holding the dynamic.csv to price routes with "
                                            "(default: measured in the workspace for this exact model)")
    p.add_argument("--supernet-epochs", type=int, default=10)
    p.add_argument("--gate-epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="stage-II learning rate (x0.9 per epoch)")
    p.add_argument("--cp-weight", type=float, default=0.5, help="weight of the complexity penalty (paper: 0.5)")
    p.add_argument("--routes-upto", type=int, help="let each gate choose only its first K choices")
    p.add_argument("--latency-target", type=float, help="latency target (ms) of the latency penalty")
    p.add_argument("--madds-target", type=float, help="MAdds target (millions) of the MAdds penalty")
    p.add_argument("--out", type=Path, help="results folder (default: results/<target>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="refuse to measure on a busy machine")
    return p.parse_args(argv)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Job:
    """One retraining run: its settings, workspace and stages."""

    def __init__(self, args, target):
        import dsnet
        from harness.backends import get_backend, list_backends

        self.args, self.target = args, target
        if args.model not in dsnet.list_models():
            raise UsageError(f"unknown model {args.model!r}; valid: {', '.join(dsnet.list_models())}")
        if not len(dsnet.create_model(args.model).routing_space.gates):
            raise UsageError(f"model {args.model} is static: it has no gate to retrain")
        if args.backend not in list_backends():
            raise UsageError(f"unknown backend {args.backend!r}; valid: {', '.join(list_backends())}")
        why = get_backend(args.backend).unavailable(target)
        if why:
            raise UsageError(f"backend {args.backend} cannot run here: {why}")
        for name in ("supernet_epochs", "gate_epochs", "batch_size"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if args.input_size < 32:
            raise UsageError(f"--input-size must be at least 32, got {args.input_size}")
        self.penalties = PENALTIES if args.penalty == "both" else (args.penalty,)
        self.out = Path(args.out or RESULTS_DIR / target.name)
        data_tag = "digits" if args.data == "digits" else Path(args.data).name
        self.ws = self.out / "gate_retraining" / f"{args.model}-{data_tag}-{args.input_size}px"

    # -- stages ------------------------------------------------------------------------------
    def data(self):
        import torch

        from dsnet.data import load_data

        self.splits = load_data(self.args.data, self.args.input_size)
        g = torch.Generator().manual_seed(self.args.seed)
        self.train_loader = torch.utils.data.DataLoader(self.splits.train, batch_size=self.args.batch_size,
                                                        shuffle=True, generator=g, drop_last=True)
        self.val_loader = torch.utils.data.DataLoader(self.splits.val, batch_size=256)
        if len(self.train_loader) == 0:
            raise UsageError(f"{len(self.splits.train)} training images are fewer than one batch "
                             f"of {self.args.batch_size}")

    def supernet(self, progress_factory):
        """Stage I, or the given checkpoint; cached in the workspace."""
        import torch

        import dsnet
        from dsnet.training import CheckpointError, load_checkpoint, save_checkpoint, train_supernet

        kwargs = {"num_classes": len(self.splits.classes)}
        if self.args.checkpoint is not None:
            try:
                model, _ = load_checkpoint(self.args.checkpoint)
            except CheckpointError as e:
                if "not a dsnet-harness checkpoint" not in str(e):
                    raise UsageError(str(e)) from None
                model = dsnet.create_model(self.args.model, **kwargs)
                try:
                    dsnet.load_official_state_dict(model, torch.load(self.args.checkpoint, map_location="cpu"))
                except ValueError as e2:
                    raise UsageError(f"checkpoint {self.args.checkpoint}: {str(e2).splitlines()[0]}") from None
            if model.model_name != self.args.model:
                raise UsageError(f"checkpoint {self.args.checkpoint} holds {model.model_name}, not {self.args.model}")
            self.supernet_meta = {"source": str(self.args.checkpoint)}
            self.model = model.eval()
            return
        settings = {"model": self.args.model, "data": self.splits.source, "input_size": self.args.input_size,
                    "epochs": self.args.supernet_epochs, "batch_size": self.args.batch_size, "seed": self.args.seed}
        path = self.ws / "supernet.pt"
        if path.is_file():
            model, meta = load_checkpoint(path)
            if meta.get("settings") == settings:
                print(f"stage I: reusing {path}", file=sys.stderr)
                self.model, self.supernet_meta = model, meta
                return
        torch.manual_seed(self.args.seed)
        model = dsnet.create_model(self.args.model, **kwargs)
        steps = self.args.supernet_epochs * len(self.train_loader)
        t0 = time.monotonic()
        train_supernet(model, self.train_loader, self.args.supernet_epochs, lr=0.1, seed=self.args.seed,
                       progress=progress_factory(steps))
        acc = {}
        for label, route in (("smallest", model.routes()[0]), ("largest", model.routes()[-1])):
            acc[label] = route_accuracy(model, route, self.val_loader)
        self.supernet_meta = {"stage": "I", "settings": settings, "route_accuracy": acc,
                              "train_s": round(time.monotonic() - t0, 1)}
        save_checkpoint(path, model, kwargs, **self.supernet_meta)
        print(f"stage I: {time.monotonic() - t0:.0f} s; val accuracy smallest route {acc['smallest']:.3f}, "
              f"largest {acc['largest']:.3f}; saved {path}", file=sys.stderr)
        self.model = model

    def costs(self, sweep):
        """Per-route MAdds and LUT latency, routing-space order."""
        import torch

        import dsnet
        from harness.lut import LatencyLUT, LUTError
        from harness.sweep import DynamicSweep, Progress

        torch.manual_seed(self.args.seed)  # the architecture to price: latency does not depend on weights
        arch = dsnet.create_model(self.args.model, num_classes=len(self.splits.classes))
        routes = arch.routing_space.all_routes()
        self.route_madds = [dsnet.profile(arch, r, self.args.input_size).madds for r in routes]
        if self.args.lut is not None:
            lut = LatencyLUT.load(self.args.lut, self.args.backend, self.args.model, input_size=self.args.input_size)
        else:
            try:
                lut = LatencyLUT.from_frame(sweep.store.dynamic_frame(), self.args.model, self.args.backend,
                                            "fp32", 1, self.args.input_size, source=str(self.ws / "results.sqlite"))
            except LUTError:
                print(f"LUT: measuring {self.args.model} segments on {self.args.backend} at "
                      f"{self.args.input_size}px (once; stored in {self.ws})", file=sys.stderr)
                ds = DynamicSweep(sweep, self.args.model, self.args.backend, "fp32", self.args.input_size,
                                  model=arch)
                ds.run(Progress(len(ds.plan) + 1).update, lut_only=True)
                sweep.store.export_dynamic(self.ws / "dynamic.csv")
                lut = LatencyLUT.from_frame(sweep.store.dynamic_frame(), self.args.model, self.args.backend,
                                            "fp32", 1, self.args.input_size)
        self.lut = lut
        self.route_lut_ms = lut.tensor(arch).tolist()  # LUTError names what the LUT lacks

    def retrain(self, penalty: str, progress_factory):
        """Stage II with ``penalty`` on a copy of the supernet; cached in the workspace."""
        import copy

        import torch

        from dsnet.training import (
            ComplexityPenalty,
            LossWeights,
            load_checkpoint,
            restrict_routes,
            save_checkpoint,
            train_gate,
        )

        model = copy.deepcopy(self.model)
        try:
            restrict_routes(model, self.args.routes_upto)
        except ValueError as e:
            raise UsageError(f"--routes-upto: {e}") from None
        if penalty == "latency":
            cp = ComplexityPenalty.latency(torch.tensor(self.route_lut_ms), model, self.args.latency_target)
        else:
            target = None if self.args.madds_target is None else self.args.madds_target * 1e6
            cp = ComplexityPenalty.madds(model, self.args.input_size, target)
        settings = {"penalty": penalty, "backend": self.args.backend, "epochs": self.args.gate_epochs,
                    "lr": self.args.lr, "cp_weight": self.args.cp_weight, "routes_upto": self.args.routes_upto,
                    "target": cp.target, "costs": _digest(cp.costs.tolist()), "seed": self.args.seed,
                    "supernet": _digest(self.supernet_meta)}
        path = self.ws / f"gate-{penalty}-{self.args.backend}.pt"
        if path.is_file():
            cached, meta = load_checkpoint(path)
            if meta.get("settings") == settings:
                print(f"stage II ({penalty}): reusing {path}", file=sys.stderr)
                return cached, meta
        t0 = time.monotonic()
        history = train_gate(model, self.train_loader, cp, self.args.gate_epochs, lr=self.args.lr,
                             weights=LossWeights(cp=self.args.cp_weight), seed=self.args.seed,
                             progress=progress_factory(self.args.gate_epochs * len(self.train_loader)))
        meta = {"stage": "II", "settings": settings, "history": history, "train_s": round(time.monotonic() - t0, 1)}
        save_checkpoint(path, model, {"num_classes": len(self.splits.classes)}, **meta)
        print(f"stage II ({penalty}): {meta['train_s']:.0f} s; saved {path}", file=sys.stderr)
        return model, meta


def route_accuracy(model, route, loader) -> float:
    import torch

    model.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model._with_route(route, lambda x=x: model(x)).argmax(-1) == y).sum())
            n += len(y)
    return correct / max(1, n)


def measure_engines(models: dict, job: Job, sweep, check_images: int = 16) -> dict:
    """Each retrained gate's dynamic engine on ``job.args.backend``: checked against the eager
    dynamic forward on ``check_images`` validation images, then timed over the validation images at
    batch 1 (each call one image, dispatched by the compiled gate), all gates and the largest route
    interleaved in one run. Returns ``{name: {"stats": Stats | None, "error": str}}``."""
    import torch

    import dsnet
    from dsnet.training import gates
    from harness.dynamic import DynamicEngine
    from harness.measure import measure_interleaved
    from harness.sweep import check_output, weights_fingerprint

    images = [x[None] for x, _ in job.splits.val]
    fns, results = {}, {}
    for name, model in models.items():
        plan = dsnet.split(model)
        engine = DynamicEngine(plan, sweep.backend(job.args.backend), job.target, "fp32",
                               job.ws / "cache" / job.args.backend / name, job.args.input_size,
                               fingerprint=f"{weights_fingerprint(plan)}-{[g.num_allowed for g in gates(model)]}")
        with torch.no_grad():
            model.set_route(None)
            for x in images[:check_images]:
                out, choices = engine(x)
                ref = model.forward_dynamic(x)
                err = check_output(out, ref.logits, "fp32")
                if err is None and not torch.equal(choices, torch.stack([o.argmax(-1) for o in ref.onehots], 1)):
                    err = f"route {choices.tolist()} differs from eager {[int(o.argmax()) for o in ref.onehots]}"
                if err:
                    break
            for x in images:  # compile every segment the validation set reaches before timing
                engine(x)
        results[name] = {"stats": None, "error": err or ""}
        if err:
            continue
        state = {"i": 0}

        def call(engine=engine, state=state):
            x = images[state["i"] % len(images)]
            state["i"] += 1
            return engine(x)

        fns[name] = call
        if "largest route" not in fns:  # context: the same engine forced to the largest route
            largest = job.model.routes(job.args.input_size)[-1]
            engine.prepare_routes([largest], images[0])
            prepared = engine.head.prepare(images[0])
            fns["largest route"] = lambda engine=engine, p=prepared, r=largest: engine.route_call(p, r)
    if fns:
        res = measure_interleaved(fns, sweep.protocol, sweep.timer())
        for name, m in res.items():
            results[name] = {"stats": m.stats, "error": ""}
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        target = open_target(args.target)
        job = Job(args, target)
        return run(job)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are saved in the workspace; re-run the same command to resume",
              file=sys.stderr)
        return 130


def run(job: Job) -> int:
    from dsnet.data import DataError
    from dsnet.training import evaluate_gate
    from harness.gate_report import write_report
    from harness.lut import LUTError
    from harness.store import ResultStore
    from harness.sweep import Progress, Sweep

    args, target = job.args, job.target
    try:
        job.data()
    except DataError as e:
        raise UsageError(str(e)) from None
    env, device_name, mismatch = capture_machine(target, args.strict)
    if env["busy"] and args.strict:
        return 3
    job.ws.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    progress = lambda total: _train_progress(Progress(total, every_s=5.0))
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    store = ResultStore(job.ws / "results.sqlite")
    try:
        sweep = Sweep(target, job.ws, target.protocol, store, device_name, mismatch, run_id)
        try:  # before training: a LUT that cannot price the model fails in seconds, not after stage I
            job.costs(sweep)
        except LUTError as e:
            raise UsageError(str(e)) from None
        job.supernet(progress)
        gates, metas, evals = {}, {}, {}
        costs = {"madds": _tensor(job.route_madds), "lut_ms": _tensor(job.route_lut_ms)}
        for penalty in job.penalties:
            gates[penalty], metas[penalty] = job.retrain(penalty, progress)
            evals[penalty] = evaluate_gate(gates[penalty], job.val_loader, costs)
            e = evals[penalty]
            print(f"{penalty} gate: val accuracy {e.accuracy:.3f}, expected {e.expected['madds'] / 1e6:.2f}M MAdds, "
                  f"LUT {e.expected['lut_ms']:.3f} ms", file=sys.stderr)
        print(f"measuring the dynamic engine on {args.backend} over {len(job.splits.val)} validation images",
              file=sys.stderr)
        measured = measure_engines(gates, job, sweep)
    finally:
        store.close()
    largest = job.model.routes(args.input_size)[-1]
    doc = {"largest_route_accuracy": route_accuracy(job.model, largest, job.val_loader), "run_id": run_id,
           "target": target.name, "device_name": device_name, "device_mismatch": mismatch,
           "threads": target.threads, "protocol": asdict(target.protocol), "env": env,
           "wall_time_s": round(time.monotonic() - t0, 1), "args": {k: str(v) for k, v in vars(args).items()}}
    paths = write_report(job, evals, metas, measured, doc)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float64)


def _train_progress(bar):
    return lambda label, figures: bar.update(label, ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
