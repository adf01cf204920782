"""``onnxruntime``: ``torch.onnx.export`` (dynamo exporter) and an ONNX Runtime session.

CPU execution provider with the target's thread count, intra-op threads that spin only while a call
runs (:data:`SPINNING`), every CPU session of a process drawing its intermediate tensors from one
shared arena (:func:`shared_cpu_arena`); the CUDA provider when the
target is a GPU and the installed onnxruntime has it. Both run through I/O binding: outputs written where the
engine keeps them, inputs bound where they lie, so the parts of a dynamic chain hand their arrays
(or, on a GPU, OrtValues) on without a copy.

A one-graph dynamic network (a module with ``switch_parts``) is not exported whole: each part is
exported on its own and the parts are joined by ``If`` nodes (:mod:`harness.backends.onnx_switch`;
DS-MBNet at 224: 44 s against 196 s for exporting its ``torch.cond`` tree, the two artifacts equally
fast). The exported file is tidied before it is written (:func:`_tidy`): the exporter's per-node metadata
dropped, and the weights that only an ``If`` branch reads (a ``torch.cond`` export's routes)
moved into that branch. ONNX Runtime optimizes a branch as a graph of its own and treats weights of
the outer graph as values it cannot see: left there, every convolution of a route ran unfused and
unpacked (measured on DS-MBNet at 224, one artifact over the route's static engine: 2.05 ms before,
0.13 ms after). A module with more than :data:`ONE_FILE_WEIGHTS` of weights (the one-graph
DS-ResNet-50: every stage's segments for every incoming width, 1.0 GiB) is written with its weights in
:data:`WEIGHTS` beside the model (protobuf caps one file at 2 GiB); both files make the artifact
(``artifact_files``: signed and checked together; ``copy_artifact`` renames the weights with the copy).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging

import numpy as np
import torch

from harness.backends.base import Backend, DeviceTarget, Engine, as_torch_outputs, cast


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    devices = ("cpu", "cuda")
    precisions = ("fp32",)
    artifact = "model.onnx"
    one_artifact = True

    def unavailable(self, target: DeviceTarget):
        try:
            import onnxruntime as ort
        except ImportError as e:
            return f"onnxruntime is not installed ({e})"
        if target.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        except ImportError as e:
            return f"onnxscript is not installed ({e})"
        return None

    def cache_key(self):
        # artifacts written before the weights of If branches were moved into them are rebuilt
        return {"branch_weights": "inside"}

    def _engine(self, path, target: DeviceTarget):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, target.threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Intra-op threads spin while a call runs and stop when it returns (SPINNING: why).
        for key, value in SPINNING.items():
            opts.add_session_config_entry(key, value)
        # Each intermediate tensor drawn from the arena on its own, not one block per run: a part of
        # a dynamic chain then starts in memory its upstream part has just freed rather than in its
        # own block, cold since its last run. benchmarks/cut_in_context.py, Intel Xeon VM, 2026-12-05,
        # the deployed path over the static engine after 8 other routes: DS-MBNet route 0 +248 and
        # +247 us against +279 and +286 us with the block (300 rounds each), DS-ResNet-50 0-0-0-0
        # +799 and +805 us against +832..+905 us; the static engines unchanged (docs/run.md).
        opts.enable_mem_pattern = False
        if target.device == "cuda":
            session = ort.InferenceSession(str(path), opts, providers=["CUDAExecutionProvider"])
            return self._cuda_engine(session)
        shared = shared_cpu_arena()
        if shared:
            opts.add_session_config_entry("session.use_env_allocators", "1")
        engine = self._cpu_engine(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))
        engine.details["cpu_arena"] = "shared by the process's sessions" if shared else "the session's own"
        engine.details["intra_op_spinning"] = "during a call"
        engine.details["memory_pattern"] = "off: each tensor from the arena on its own"
        return engine

    @staticmethod
    def _cpu_engine(session):
        """I/O binding (ONNX Runtime's ``io_binding``): each output is written into an array
        allocated once, and the input is bound to the array it is given (NumPy, float32), rebound
        only when another array comes. A chain of sessions then hands arrays on with no copy and no
        allocation per call (measured on DS-MBNet's head and tail at 224: 28 us over the route's
        static engine, 98 us with ``session.run`` and fresh outputs). The arrays start on
        :data:`ALIGNMENT` bytes, as ONNX Runtime's own allocations do (:func:`aligned_empty`). The
        outputs are overwritten by the next call: ``to_torch`` copies them. A model whose output
        shapes are not fixed runs through ``session.run``."""
        name = session.get_inputs()[0].name
        outs = session.get_outputs()
        shapes = [o.shape for o in outs]
        types = [_NUMPY_TYPES.get(o.type) for o in outs]
        prepare = lambda x: x.detach().cpu().float().contiguous().numpy()  # noqa: E731
        if any(t is None or not all(isinstance(d, int) for d in sh) for sh, t in zip(shapes, types)):
            return Engine(lambda array: session.run(None, {name: array}), prepare=prepare,
                          to_torch=lambda outs: as_torch_outputs(outs, torch.from_numpy))
        arrays = tuple(aligned_empty(sh, t) for sh, t in zip(shapes, types))
        binding = session.io_binding()
        for o, a in zip(outs, arrays):
            binding.bind_output(o.name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
        bound = [None]  # the array the input is bound to (kept alive while bound)

        def run(array):
            if array is not bound[0]:
                if not (array.flags.c_contiguous and array.dtype == np.float32):
                    raise ValueError(f"input must be a contiguous float32 array, got {array.dtype}")
                binding.bind_input(name, "cpu", 0, np.float32, array.shape, array.ctypes.data)
                bound[0] = array
            session.run_with_iobinding(binding)
            return arrays

        return Engine(run, prepare=prepare,
                      to_torch=lambda outs: as_torch_outputs(outs, lambda a: torch.from_numpy(a.copy())))

    @staticmethod
    def _cuda_engine(session):
        """I/O binding on the GPU: the input is bound where it lies (a CUDA tensor, or the OrtValue
        an engine of the chain before returned), the outputs stay on the GPU as OrtValues."""
        binding = session.io_binding()
        name = session.get_inputs()[0].name
        out_names = [o.name for o in session.get_outputs()]
        bound = [None]

        def prepare(x):
            return x.detach().cuda().float().contiguous()

        def run(value):
            if value is not bound[0]:
                if isinstance(value, torch.Tensor):
                    binding.bind_input(name, "cuda", 0, np.float32, tuple(value.shape), value.data_ptr())
                else:  # an OrtValue on the GPU from the previous engine of a chain: no copy
                    binding.bind_ortvalue_input(name, value)
                for out_name in out_names:
                    binding.bind_output(out_name, "cuda")
                bound[0] = value  # kept alive while bound
            session.run_with_iobinding(binding)
            return binding

        return Engine(run, prepare=prepare,
                      to_torch=lambda b: as_torch_outputs(b.copy_outputs_to_cpu(), torch.from_numpy),
                      sync=torch.cuda.synchronize, outputs=lambda b: tuple(b.get_outputs()),
                      choice=lambda scores: int(scores.numpy().argmax()))

    def compile(self, module, example, target: DeviceTarget, precision, artifact_dir):
        module, example = cast(module, example, target, precision, device="cpu")  # exported on CPU
        path = artifact_dir / self.artifact
        import torch.onnx  # noqa: F401  (creates the exporter's loggers, quieted below)

        for name in list(logging.root.manager.loggerDict):  # e.g. "torchvision is not installed"
            if name.startswith("torch.onnx"):
                logging.getLogger(name).setLevel(logging.ERROR)
        if hasattr(module, "switch_parts"):  # a one-graph dynamic network: its parts exported and joined
            from harness.backends.onnx_switch import compose_switch

            parts = module.switch_parts(example)
            model = compose_switch(_export(parts.head, parts.head_input),
                                   [[_export(b, x) for b in branches]
                                    for branches, x in zip(parts.stages, parts.stage_inputs)], parts.n_choices)
        else:
            model = _export(module, example)
        _tidy(model)
        _save(model, path, WEIGHTS if _weight_bytes(module) > ONE_FILE_WEIGHTS else None)
        del model
        engine = self._engine(path, target)
        if (artifact_dir / WEIGHTS).is_file():
            engine.details["weights_file_mib"] = round((artifact_dir / WEIGHTS).stat().st_size / 2**20, 1)
        return engine

    def load(self, artifact_dir, example, target: DeviceTarget, precision):
        return self._engine(artifact_dir / self.artifact, target)

    def artifact_files(self, artifact_dir):
        weights = artifact_dir / WEIGHTS
        return [artifact_dir / self.artifact] + ([weights] if weights.is_file() else [])

    def copy_artifact(self, artifact_dir, out):
        if not (artifact_dir / WEIGHTS).is_file():
            return super().copy_artifact(artifact_dir, out)
        import onnx

        # the model names its weights file: written again under the name of the copy
        data = out.with_name(out.name + ".data")
        _save(onnx.load(str(artifact_dir / self.artifact)), out, data.name)
        return [out, data]


@functools.cache
def shared_cpu_arena() -> bool:
    """One CPU memory arena for every session of this process (ONNX Runtime's environment allocator,
    ``create_and_register_allocator``; a session opts in with ``session.use_env_allocators``),
    registered once; False where it cannot be (the session then keeps an arena of its own). A
    session's intermediate tensors come from its arena on each run and go back after it: with one
    arena, the parts of a dynamic chain run in the same memory, which the part before has just
    used, where each session's own arena held memory that had gone cold since its last run.
    ``benchmarks/cut_in_context.py``, DS-ResNet-50 at 224, route 0-0-0-0, every segment loaded as
    the dynamic phase loads them, Intel Xeon 2-core VM, 150 rounds, two runs each way: the deployed
    path over the static engine after 8 other routes' engines +782 and +784 us shared against +1046
    and +1033 us per session, the static engine itself unchanged (6.97, 6.78 ms against 6.84, 6.87)."""
    import onnxruntime as ort

    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # the arena's defaults
    except Exception:  # e.g. one registered already by other code of this process: not ours to share
        return False
    return True


# Session options of every CPU session: intra-op threads spin between a call's operators and stop
# at its end (``force_spinning_stop``; ONNX Runtime's per-session pools only). Left spinning after a
# call (ONNX Runtime's default), an idle session's threads steal the cores from the next session of a
# dynamic chain (a head+tail chain 2.4x slower than its parts) and from the next engine of a round
# (1.6-1.8x); never spinning, every operator wakes the threads anew. benchmarks/
# cut_in_context.py on the Intel Xeon 2-core VM, 2026-12-05, against spinning off: the static
# engines 29% and 32% faster (DS-MBNet route 0 2.58 against 3.62 ms, DS-ResNet-50 0-0-0-0 4.52
# against 6.68 ms), the deployed path's cut unchanged in microseconds (DS-MBNet -29 against -49 us
# steady, +251 against +266 us after 8 other routes); no CPU taken in the 50 ms after a call (0.1
# ms, against 29 ms left spinning), an eager engine right after a call 1.04x its time after eager
# (1.06x after a session that never spins).
SPINNING = {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}

ALIGNMENT = 64  # bytes: where ONNX Runtime's CPU allocator starts a buffer (its kernels' preferred alignment)


def aligned_empty(shape, dtype, alignment: int = ALIGNMENT) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data starts on a multiple of ``alignment`` bytes (NumPy's own
    start on 16). Bound as the output of a part, the next part reads it as its input: DS-MBNet's head
    then tail at 224, 300 shuffled rounds, route 0, one process: -68 us (95% interval -89..-56) against
    NumPy's array, which lay 16 bytes off; where NumPy's happened to lie aligned, no difference."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    # sliced long, then cut: NumPy moves an empty slice's data back to its base's start
    return raw[start:start + max(nbytes, 1)][:nbytes].view(dtype).reshape(shape)


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16}

# Protobuf caps a file at 2 GiB. Over this many bytes of weights (the tidy may copy a weight into
# several branches) the weights go to a file beside the model (the flattened one-graph DS-ResNet-50).
ONE_FILE_WEIGHTS = 1 << 30
WEIGHTS = "model.onnx.data"  # that file's name (the model names it; ONNX Runtime reads it from the model's folder)


def _export(module, example):
    """``module`` as an ONNX model in memory (the dynamo exporter; quiet). Kept in memory, tidied,
    then written: the exporter's own writer failed on the one-graph DS-ResNet-50 even with its
    weights in a file beside it."""
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        return torch.onnx.export(module, (example,), dynamo=True, verbose=False).model_proto


def _weight_bytes(module) -> int:
    """Bytes of ``module``'s parameters and buffers, each tensor counted once."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _tidy(model) -> None:
    """Tidy the exported model in place: no per-node metadata, branch-only weights inside their branch."""
    _strip_metadata(model.graph)
    _move_weights_into_branches(model.graph)


def _save(model, path, weights: str | None) -> None:
    """``model`` at ``path``: one file, or with ``weights`` every tensor of 1 KiB or more (initializers
    and constants, in branches too) in that file beside it."""
    import onnx
    from google.protobuf.message import EncodeError

    if weights is None:
        try:
            onnx.save_model(model, str(path))
            return
        except EncodeError:  # over 2 GiB after all
            path.unlink(missing_ok=True)
            weights = WEIGHTS
    path.with_name(weights).unlink(missing_ok=True)  # onnx appends to an existing weights file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=weights, size_threshold=1024, convert_attribute=True)


def _strip_metadata(graph) -> None:
    """Drop the exporter's per-node metadata (source stack traces: 98% of a small network's file)."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for _, sub in _subgraphs(node):
            _strip_metadata(sub)
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        del value.metadata_props[:]


def _subgraphs(node):
    """``(attribute name, graph)`` of each graph attribute of ``node`` (an ``If``'s two branches)."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.name, attr.g
        for j, g in enumerate(attr.graphs):
            yield f"{attr.name}[{j}]", g


def _move_weights_into_branches(graph) -> int:
    """Move each initializer of ``graph`` that no node of ``graph`` itself reads into the subgraphs
    whose nodes read it (at any depth): into the outermost subgraph of each reader, so one copy per
    branch where several branches read it (the exporter shares equal tensors, e.g. the classifier's
    bias of every route). ONNX forbids a subgraph to shadow an outer name, so a moved name means the
    same value there. Returns how many initializers left the outer graph."""
    readers: dict[str, set[tuple]] = {}  # name -> the subgraph path of each node reading it

    def visit(g, path):
        for i, node in enumerate(g.node):
            for name in node.input:
                readers.setdefault(name, set()).add(path)
            for attr_name, sub in _subgraphs(node):
                visit(sub, path + ((i, attr_name),))

    visit(graph, ())
    graph_inputs = {v.name for v in graph.input}
    stay, moved = [], 0
    for init in graph.initializer:
        paths = readers.get(init.name, set())
        if not paths or () in paths or init.name in graph_inputs:
            stay.append(init)
            continue
        for home in (p for p in paths if not any(q != p and p[:len(q)] == q for q in paths)):
            _graph_at(graph, home).initializer.append(init)
        moved += 1
    del graph.initializer[:]
    graph.initializer.extend(stay)
    return moved


def _graph_at(graph, path: tuple):
    for i, attr_name in path:
        graph = dict(_subgraphs(graph.node[i]))[attr_name]
    return graph
