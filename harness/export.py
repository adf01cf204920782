"""``python -m harness.export --model NAME --backend B --out PATH``: the whole dynamic network as ONE
artifact (head, every gate's argmax, every route; control flow inside the graph; batch 1).

The network is :func:`dsnet.one_graph.one_graph` of the model (the harness's reference weights, or
``--checkpoint``), built by the backend's own compile path and checked, before anything is
written, against the eager one-graph network on the compile example and on ``--check-inputs`` more
inputs (the routes they take are listed). What can hold it (the backends whose ``one_artifact``
is set): ``torchscript`` (scripted dispatch, traced parts; ``torch.jit.load``), ``onnxruntime``
(``If`` nodes from ``torch.cond``; one ``InferenceSession``), ``inductor`` (``torch.export`` with
``torch.cond``, AOTInductor package; ``torch._inductor.aoti_load_package``) and ``tvm`` (Relax's
frontend turns ``torch.cond`` into branches; ``relax.VirtualMachine``). Any other backend is a
one-line refusal with exit 2.
The artifact returns ``(logits, route)``, ``route`` an int64 tensor ``(1, gates)``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import dsnet
from dsnet.one_graph import one_graph
from harness.backends import backend_class, get_backend, list_backends
from harness.backends.base import one_line
from harness.cli import UsageError, open_target, run_main
from harness.measure.pipeline import ArtifactKey, check_output, image_batch, trial, weights_fingerprint
from harness.phases.static import reference_model

# how each artifact is loaded with its own runtime alone (printed after an export; docs/export.md shows them)
LOADERS = {
    "torchscript": ["import torch", "net = torch.jit.load('{path}')",
                    "logits, route = net(x)  # x: float32 tensor (1, 3, {size}, {size})"],
    "onnxruntime": ["import onnxruntime as ort", "net = ort.InferenceSession('{path}')",
                    "logits, route = net.run(None, {{net.get_inputs()[0].name: x}})"
                    "  # x: float32 numpy (1, 3, {size}, {size})"],
    "inductor": ["import torch", "net = torch._inductor.aoti_load_package('{path}')",
                 "logits, route = net(x)  # x: float32 tensor (1, 3, {size}, {size})"],
    "tvm": ["import tvm", "from tvm import relax",
            "net = relax.VirtualMachine(tvm.runtime.load_module('{path}'), tvm.cpu())['main']",
            "logits, route = net(tvm.runtime.tensor(x))  # x: float32 numpy (1, 3, {size}, {size})"],
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m harness.export", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a dynamic supernet (dsnet.list_models(); e.g. ds_mbnet)")
    p.add_argument("--backend", required=True, help=f"one of {', '.join(LOADERS)}")
    p.add_argument("--out", required=True, type=Path, help="the artifact's path (a folder: the backend's file name)")
    p.add_argument("--input-size", type=int, default=224, help="square input resolution (default 224)")
    p.add_argument("--target", default="x86", help="target profile the artifact is built for (default x86)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--checkpoint", type=Path, help="official DS-Net weights (default: reference weights)")
    p.add_argument("--check-inputs", type=int, default=8, help="inputs checked besides the example (default 8)")
    return p.parse_args(argv)


def _model(name: str, checkpoint: Path | None):
    if name not in dsnet.list_models():
        raise UsageError(f"unknown model '{name}'; known: {', '.join(dsnet.list_models())}")
    model = reference_model(name)
    if not model.dynamic:
        raise UsageError(f"{name} has no gate: a static or slimmable network is one graph already "
                         "(python -m harness.run measures it)")
    if checkpoint is not None:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            dsnet.load_official_state_dict(model, state)
        except Exception as e:
            raise UsageError(f"cannot load {checkpoint}: {one_line(e)}") from None
    return model.eval()


def check_inputs(example, n: int):
    """``n`` seeded inputs like ``example`` whose per-channel offsets vary, so gates see different
    inputs (and often choose different routes)."""
    g = torch.Generator().manual_seed(3)
    return [torch.randn(example.shape, generator=g) + torch.randn(1, example.shape[1], 1, 1, generator=g) * 2
            for _ in range(n)]


def _main(args) -> int:
    if args.backend not in list_backends():
        raise UsageError(f"unknown backend '{args.backend}'; known: {', '.join(list_backends())}")
    if not backend_class(args.backend).one_artifact:
        raise UsageError(f"{args.backend} cannot hold the one-graph network as one artifact; backends that can: "
                         f"{', '.join(b for b in list_backends() if backend_class(b).one_artifact)}")
    if args.check_inputs < 0:
        raise UsageError(f"--check-inputs must be at least 0, got {args.check_inputs}")
    if not 32 <= args.input_size <= 1024:
        raise UsageError(f"--input-size must be between 32 and 1024, got {args.input_size}")
    target = open_target(args.target)
    backend = get_backend(args.backend, target.options(args.backend))
    why = backend.unavailable(target) or backend.unsupported(target, args.precision)
    if why:
        raise UsageError(f"{args.backend} is unavailable for target {target.name}: {why}")
    model = _model(args.model, args.checkpoint)
    x = image_batch(1, args.input_size)
    graph = one_graph(model, x)
    print(f"{args.model}: {len(graph.stages)} gate(s), {sum(len(s) for s in graph.stages)} branches; "
          f"building with {args.backend} ({args.precision}, {args.input_size}px)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        key = ArtifactKey.of(args.model, "one_graph", backend, target, args.precision, x, weights_fingerprint(graph))
        result = trial(backend, graph, x, target, args.precision, key, Path(tmp))
        if not result.ok:
            raise UsageError(f"{args.backend} could not build the one-graph network of {args.model}: "
                             f"{result.status}: {result.error}")
        routes = set()
        for xi in check_inputs(x, args.check_inputs):
            with torch.no_grad():
                ref = graph(xi)
            problem = check_output(result.engine(xi), ref, args.precision)
            if problem:
                raise UsageError(f"the {args.backend} artifact differs from eager on a check input "
                                 f"(route {ref[1].tolist()[0]}): {problem}; nothing written")
            routes.add(tuple(ref[1].tolist()[0]))
        out = args.out / backend.artifact if args.out.is_dir() else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        written = backend.copy_artifact(key.directory(Path(tmp)), out)
    size = sum(f.stat().st_size for f in written) / 2**20
    beside = f", its weights in {', '.join(f.name for f in written[1:])}" if len(written) > 1 else ""
    print(f"wrote {out} ({size:.1f} MiB{beside}); checked against eager on {1 + args.check_inputs} "
          f"inputs, routes taken: {', '.join(map(str, sorted(routes)))}")
    print("load it with its runtime alone:")
    for line in LOADERS[args.backend]:
        print("    " + line.format(path=out, size=args.input_size))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: _main(args), "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
