"""Relax rewrites the TVM backend applies between the torch import and the build.

Contract
--------
Each function takes an ``IRModule`` and returns a new one; none changes what the module computes
beyond the rounding the docstring states.

- :func:`fold_constants`: every computation on constants folded into one constant, as TVM's
  ``FoldConstant`` does (the same values, bit for bit; a rewritten layout's padding zeroed where
  ``FoldConstant`` leaves it uninitialized), without its one LLVM build per distinct
  operator and shape (hundreds per route, most of a route's import time): the elementwise,
  reshape and transpose operators that batch norm folding and layout conversion leave on the
  weights (``add``, ``subtract``, ``multiply``, ``divide``, ``sqrt``, ``reshape``,
  ``permute_dims``, ``expand_dims``) are computed with NumPy (IEEE float32, as TVM's kernels
  compute them); ``call_tir`` of a PrimFunc on constants (a prepacked weight's layout rewrite)
  runs from one library built for all of them. Anything else goes to ``FoldConstant``.
- :func:`fast_math`: ``exp``, ``tanh``, ``erf``, ``softmax`` and ``sigmoid`` by TOPI's
  vectorizable approximations.
- :func:`inline_branch_weights`: a module with control flow (``torch.cond``'s branches, which the
  importer writes as functions taking every weight they read as a parameter) with each branch's
  weights bound into its body as constants and its body in dataflow form, so that batch norm
  folding, the layout rewrite, weight prepacking, fusion and the tuning database reach the branches
  as they reach a static network. A module without function calls is returned as it is.
"""

from __future__ import annotations

import numpy as np

# operator -> NumPy of (its constant arguments..., the call's attributes); float tensors only
_NUMPY = {
    "relax.add": lambda a, b, attrs: np.add(a, b),
    "relax.subtract": lambda a, b, attrs: np.subtract(a, b),
    "relax.multiply": lambda a, b, attrs: np.multiply(a, b),
    "relax.divide": lambda a, b, attrs: np.divide(a, b),
    "relax.sqrt": lambda a, attrs: np.sqrt(a),
    "relax.reshape": lambda a, shape, attrs: np.reshape(a, shape),
    "relax.permute_dims": lambda a, attrs: np.transpose(a, _axes(attrs.axes)),
    "relax.expand_dims": lambda a, attrs: np.expand_dims(a, tuple(int(i) for i in attrs.axis)),
}


def _axes(axes):
    return None if axes is None else [int(i) for i in axes]


def _static_float_tensor(ty):
    """``(shape, dtype)`` of a float tensor type with a static shape, else None."""
    dtype, shape = str(getattr(ty, "dtype", "")), getattr(ty, "shape", None)
    if not dtype.startswith("float") or shape is None:
        return None
    try:
        return tuple(int(d) for d in shape), dtype
    except TypeError:  # a symbolic dimension
        return None


def fold_constants(mod):
    """``mod`` with every computation on constants folded (see the module's contract)."""
    from tvm import relax

    return relax.transform.FoldConstant()(_fold_call_tir(_fold_with_numpy(mod)))


def _mutate_functions(mod, mutator):
    """``mod`` with each Relax function visited by ``mutator`` (built on ``mod``)."""
    from tvm import relax

    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def _fold_with_numpy(mod):
    """``mod`` with each call of a :data:`_NUMPY` operator on constants (float tensors of a static
    shape) replaced by its value; any other call left as it is."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class NumpyFold(PyExprMutator):
        def _constant(self, arg):
            """``arg``'s value as NumPy (a tensor or a scalar), a shape as a tuple, else None."""
            if isinstance(arg, relax.Var):
                arg = self.lookup_binding(arg)
            if isinstance(arg, relax.ShapeExpr):
                try:
                    return tuple(int(v) for v in arg.values)
                except TypeError:
                    return None
            if isinstance(arg, tvm.ir.Constant):
                value = arg.value
                return value.numpy() if hasattr(value, "numpy") else np.array(value, dtype=str(arg.ty))
            return None

        def visit_call_(self, call):
            new = super().visit_call_(call)
            rule = _NUMPY.get(new.op.name) if isinstance(new.op, tvm.ir.Op) else None
            out_type = _static_float_tensor(call.ty) if rule else None
            if out_type is None:
                return new
            args = [self._constant(a) for a in new.args]
            if any(a is None for a in args):
                return new
            out = np.asarray(rule(*args, new.attrs), dtype=out_type[1])
            if out.shape != out_type[0]:  # NumPy's broadcasting disagreed with Relax's: leave it to TVM
                return new
            return relax.const(np.ascontiguousarray(out), out_type[1])

    return _mutate_functions(mod, NumpyFold(mod))


def _fold_call_tir(mod):
    """``call_tir`` of a PrimFunc on tensor constants (a prepacked weight's layout rewrite) folded:
    every such PrimFunc built into one library and run once per call."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, PyExprVisitor, expr_functor

    def outputs_of(call):
        """The output types of a foldable ``call_tir``, else None."""
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
            return None
        func, args = call.args[0], call.args[1]
        if not (isinstance(func, tvm.ir.GlobalVar) and isinstance(mod[func], tvm.tirx.PrimFunc)
                and isinstance(args, relax.Tuple)
                and all(isinstance(a, tvm.ir.Constant) and hasattr(a.value, "numpy") for a in args.fields)):
            return None
        types = list(call.ty.fields) if hasattr(call.ty, "fields") else [call.ty]
        shapes = [_static_float_tensor(t) for t in types]
        return None if any(s is None for s in shapes) else shapes

    functions = {}

    @expr_functor.visitor
    class Collect(PyExprVisitor):
        def visit_call_(self, call):
            if outputs_of(call) is not None:
                functions[call.args[0].name_hint] = call.args[0]
            super().visit_call_(call)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            Collect().visit_expr(func)
    if not functions:
        return mod
    lib = tvm.tirx.build(tvm.IRModule({gv: mod[gv].with_attr("global_symbol", name) for name, gv in functions.items()}),
                         target=tvm.target.Target("llvm"))

    @expr_functor.mutator
    class CallTIRFold(PyExprMutator):
        def visit_call_(self, call):
            shapes = outputs_of(call)
            if shapes is None:
                return super().visit_call_(call)
            # zeros, not empty: a rewritten layout may pad (1000 classes into 16 x 64), and the
            # padding should be the same bytes in every build (FoldConstant leaves it uninitialized)
            outs = [tvm.runtime.tensor(np.zeros(shape, dtype)) for shape, dtype in shapes]
            lib[call.args[0].name_hint](*[a.value for a in call.args[1].fields], *outs)
            consts = [relax.const(o) for o in outs]
            return relax.Tuple(consts) if hasattr(call.ty, "fields") else consts[0]

        def visit_tuple_getitem_(self, node):
            new = super().visit_tuple_getitem_(node)
            tup = self.lookup_binding(new.tuple_value) if isinstance(new.tuple_value, relax.Var) else new.tuple_value
            return tup.fields[new.index] if isinstance(tup, relax.Tuple) else new

    return _mutate_functions(mod, CallTIRFold(mod))


def inline_branch_weights(mod):
    """``mod`` with constant arguments bound into the functions they are passed to (see the
    module's contract). Outermost first: binding a branch's weights makes them constants at the
    call of the branch nested in it, bound on the next pass; a function called from more than one
    place keeps its parameters."""
    from tvm import relax

    changed = False
    while True:
        sites = _call_sites(mod)
        bind = {gv: [i for i, a in enumerate(calls[0].args) if _is_constant(a)]
                for gv, calls in sites.items() if len(calls) == 1}
        bind = {gv: (sites[gv][0], idx) for gv, idx in bind.items() if idx}
        if not bind:
            return relax.transform.ConvertToDataflow()(mod) if changed else mod
        mod, changed = _bind_arguments(mod, bind), True


def _is_constant(expr) -> bool:
    import tvm

    return isinstance(expr, tvm.ir.Constant)


def _call_sites(mod) -> dict:
    """GlobalVar of each Relax function -> the calls of it in ``mod``."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprVisitor, expr_functor

    sites: dict = {}

    @expr_functor.visitor
    class Calls(PyExprVisitor):
        def visit_call_(self, call):
            if isinstance(call.op, tvm.ir.GlobalVar) and isinstance(mod[call.op], relax.Function):
                sites.setdefault(call.op, []).append(call)
            super().visit_call_(call)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            Calls().visit_expr(func)
    return sites


def _bind_arguments(mod, bind: dict):
    """``mod`` with each function of ``bind`` ({GlobalVar: (its one call, argument indices)}) taking
    those arguments of its call as constants in its body, and the call no longer passing them. The
    bound functions get new GlobalVars (their signatures change)."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    builder = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in bind},
                                              attrs=mod.attrs))
    renamed = {}
    for gv, (call, idx) in bind.items():
        func = mod[gv]
        renamed[gv] = builder.add_func(func.bind_params({func.params[i]: call.args[i] for i in idx}), gv.name_hint)

    @expr_functor.mutator
    class DropBound(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.GlobalVar) and call.op in bind:
                idx = bind[call.op][1]
                args = [a for i, a in enumerate(call.args) if i not in idx]
                return relax.Call(renamed[call.op], args, call.attrs, call.ty_args)
            return call

    return _mutate_functions(builder.get(), DropBound(builder.get()))


def fast_math(mod):
    """``mod`` with ``exp``, ``tanh``, ``erf``, ``softmax`` and ``sigmoid`` computed by TOPI's
    vectorizable approximations (``sigmoid(x)`` as ``1 / (1 + fast_exp(-x))``, for SiLU). What TVM's
    ``FastMathTransform`` does, plus ``sigmoid``, and safe on calls of other functions (TVM 0.27's
    pass reads ``call.op.name``, which a ``GlobalVar``, e.g. a ``torch.cond`` branch, lacks)."""
    import tvm
    from tvm import topi
    from tvm.relax import PyExprMutator, expr_functor

    fast = {  # operator -> its approximation, a TE function of (input, the call's attributes)
        "relax.exp": lambda x, attrs: topi.fast_exp(x),
        "relax.tanh": lambda x, attrs: topi.fast_tanh(x),
        "relax.erf": lambda x, attrs: topi.fast_erf(x),
        "relax.nn.softmax": lambda x, attrs: topi.nn.fast_softmax(x, attrs.axis),
        "relax.sigmoid": lambda x, attrs: topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(x)))),
    }

    @expr_functor.mutator
    class FastMath(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            rule = fast.get(call.op.name) if isinstance(call.op, tvm.ir.Op) else None
            if rule is None:
                return call
            return self.builder_.call_te(lambda x: rule(x, call.attrs), call.args[0])

    return _mutate_functions(mod, FastMath(mod))
