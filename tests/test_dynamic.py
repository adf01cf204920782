"""The dynamic engine on a backend equals the supernet; the compositional LUT adds up and refuses gaps."""

import pandas as pd
import pytest
import torch

import dsnet
from conftest import randomize, routes_apart
from harness.backends import get_backend
from harness.deploy.engine import DynamicEngine, stream_routes
from harness.deploy.lut import DISPATCH_NAME, LatencyLUT, LUTError, matched_distribution, route_segment_names
from harness.measure.pipeline import check_output
from harness.results.layout import DYNAMIC_COLUMNS
from harness.targets import load_target

X86 = load_target("x86").resolve()


TINY = ["ds_mbnet_tiny", "ds_resnet50_tiny", "ds_resnet50_pp_tiny", "ds_mbnet_pp_tiny", "ds_vit_pp_tiny"]


def _deployed_equals_eager(name, backend, batch, tmp_path):
    model = dsnet.reference_statistics(randomize(dsnet.create_model(name)))
    x = routes_apart(model, batch)
    plan = dsnet.split(model)
    engine = DynamicEngine(plan, get_backend(backend, X86.options(backend)), X86, "fp32", tmp_path, 32,
                           batch_size=batch)
    with torch.no_grad():
        model.set_route(None)
        ref, onehots, _ = model.forward_dynamic(x)
        out, choices = engine(x)
    assert check_output(out, ref, "fp32") is None  # the pipeline's fp32 tolerance (logits reach ~45)
    expected = torch.stack(onehots, 1).argmax(-1)
    assert torch.equal(choices, expected)
    if batch > 1:
        assert len({tuple(c) for c in choices.tolist()}) > 1
    return model, engine


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnxruntime"])
@pytest.mark.parametrize("batch", [1, 8])
def test_the_deployed_network_equals_the_supernet(name, backend, batch, tmp_path):
    """Batch 1 through the deployed path (native hand-off between parts), batch 8 grouped by route:
    logits and chosen routes as the eager dynamic forward, on every tiny supernet."""
    _deployed_equals_eager(name, backend, batch, tmp_path)


@pytest.mark.parametrize("backend, batch", [("tvm", 1), ("tvm", 8), ("inductor", 1)])
def test_the_deployed_network_equals_the_supernet_on_compilers(backend, batch, tmp_path):
    """The same on TVM and AOTInductor, on the tiny DS-MBNet (their builds take seconds a part; the
    grouped batch path is the backend-agnostic one tested above, so AOTInductor runs batch 1 only)."""
    if get_backend(backend, X86.options(backend)).unavailable(X86):
        pytest.skip(f"{backend} unavailable here")
    model, engine = _deployed_equals_eager("ds_mbnet_tiny", backend, batch, tmp_path)
    if backend == "inductor":  # the head hands its features on in the order the next part computes in
        x = routes_apart(model, 1)
        feats = engine.head.outputs(engine.head.run(engine.head.prepare(x)))[0]
        assert feats.dim() == 4 and feats.is_contiguous(memory_format=torch.channels_last)


def test_deployed_outputs_are_not_overwritten_by_the_next_call(tmp_path):
    """ONNX Runtime's parts write into arrays bound once: what a call returned must stay as it was
    after the next call, and every call must see its own input."""
    model, engine = _deployed_equals_eager("ds_mbnet_tiny", "onnxruntime", 1, tmp_path)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, 3, 32, 32, generator=g) + torch.randn(1, 3, 1, 1, generator=g) * 3 for _ in range(6)]
    first = [engine(x) for x in xs]
    assert len({tuple(c.flatten().tolist()) for _, c in first}) > 1  # more than one route taken
    with torch.no_grad():
        for x, (logits, choices) in zip(xs, first):
            ref = model.forward_dynamic(x)
            assert check_output(logits, ref.logits, "fp32") is None
            assert torch.equal(choices, torch.stack([o.argmax(-1) for o in ref.onehots], 1))


def test_a_segment_first_seen_on_all_zero_features_compiles_and_checks(tmp_path):
    """A narrow slice of one image's features can be all zero after ReLU; the segment's check must
    not then compare eager with itself on a constant (it failed as 'activations vanish')."""
    model = dsnet.reference_statistics(randomize(dsnet.create_model("ds_resnet50_tiny")))
    plan = dsnet.split(model)
    engine = DynamicEngine(plan, get_backend("torchscript"), X86, "fp32", tmp_path, 32)
    key = next(iter(plan.stages[1]))
    cin = plan.stages[1][key].body[0].conv1.in_channels
    zeros = torch.zeros(1, cin, 8, 8)
    segment = engine.segment(1, key, zeros)
    with torch.no_grad():
        ref = plan.stages[1][key](zeros)
    out = segment(zeros)
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(out, ref))


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_a_forced_route_runs_that_route_through_the_deployed_code(backend, tmp_path):
    model = dsnet.reference_statistics(randomize(dsnet.create_model("ds_resnet50_tiny")))
    engine = DynamicEngine(dsnet.split(model), get_backend(backend), X86, "fp32", tmp_path, 32)
    x = torch.randn(1, 3, 32, 32)
    route = dsnet.Route((2, 0, 3, 1))
    with torch.no_grad():
        model.set_route(route)
        ref = model(x)
        out, choices = engine.single(x, route)
    assert (out - ref).abs().max() <= 1e-4 and choices.tolist() == [list(route)]
    raw, chosen = engine.deployed(engine.head.prepare(x), route)
    assert chosen == list(route) and torch.allclose(engine.path(route, x)[-1].to_torch(raw), out)


def _lut_frame(segments: dict, model="ds_resnet50_tiny", failed=(), dispatch=None):
    """Segment rows, and a dispatch row ``(status, p50, ci_low, ci_high)`` when given."""
    base = {"model": model, "backend": "torchscript", "precision": "fp32", "batch_size": 1, "input_size": 32}
    rows = [base | {"kind": "segment", "name": n, "latency_ms_p50": v, "status": "failed" if n in failed else "ok",
                    "error": "boom" if n in failed else ""} for n, v in segments.items()]
    if dispatch is not None:
        status, p50, lo, hi = dispatch
        rows.append(base | {"kind": "dispatch", "name": DISPATCH_NAME, "status": status, "error": "impossible",
                            "latency_ms_p50": p50, "latency_ms_p50_ci_low": lo, "latency_ms_p50_ci_high": hi})
    return pd.DataFrame(rows, columns=DYNAMIC_COLUMNS)


def _all_segments(model):
    plan = dsnet.split(model)
    names = ["head"] + [plan.segment_name(k, key) for k, seg in enumerate(plan.stages) for key in seg]
    return {n: float(i + 1) for i, n in enumerate(names)}


def test_compositional_prediction_is_the_sum_of_its_parts():
    model = dsnet.create_model("ds_resnet50_tiny")
    segments = _all_segments(model)
    assert len(segments) == 1 + 4 + 3 * 16
    lut = LatencyLUT.from_frame(_lut_frame(segments), "ds_resnet50_tiny", "torchscript")
    route = dsnet.Route((1, 3, 0, 2))
    names = route_segment_names(route)
    assert names == ["head", "s0_inx_c1", "s1_in1_c3", "s2_in3_c0", "s3_in0_c2"]
    assert lut.latency(route) == sum(segments[n] for n in names)
    tensor = lut.tensor(model)
    assert tensor.shape == (256,)
    all_routes = model.routing_space.all_routes()
    assert tensor[all_routes.index(route)].item() == pytest.approx(lut.latency(route))


@pytest.mark.parametrize("dispatch, per_decision, said", [
    (None, 0.0, "no dispatch cost stored"),
    (("ok", 0.02, 0.01, 0.03), 0.02, "added per gate"),
    (("ok", 0.02, -0.01, 0.05), 0.0, "holds zero: counted as zero"),
    (("ok", -0.02, -0.03, -0.01), -0.02, "faster chained in the deployed path than timed apart"),
    (("measure_failed", -0.2, -0.3, -0.1), 0.0, "refused"),
])
def test_the_lut_prices_the_deployed_route_with_one_dispatch_cost_per_gate(dispatch, per_decision, said):
    """Segments plus gates x the dispatch cost, signed; an interval holding zero is zero; a refused
    one is not used."""
    model = dsnet.create_model("ds_resnet50_tiny")
    segments = _all_segments(model)
    lut = LatencyLUT.from_frame(_lut_frame(segments, dispatch=dispatch), "ds_resnet50_tiny", "torchscript")
    route = dsnet.Route((1, 3, 0, 2))
    parts = sum(segments[n] for n in route_segment_names(route))
    assert lut.latency(route) == pytest.approx(parts + 4 * per_decision)
    assert said in lut.dispatch_note


def test_lut_with_a_missing_or_failed_segment_raises_naming_it(tmp_path):
    model = dsnet.create_model("ds_mbnet_tiny")
    segments = _all_segments(model)
    del segments["s0_inx_c2"]
    lut = LatencyLUT.from_frame(_lut_frame(segments, "ds_mbnet_tiny", failed=("s0_inx_c3",)),
                                "ds_mbnet_tiny", "torchscript")
    assert lut.latency((1,)) == segments["head"] + segments["s0_inx_c1"]
    with pytest.raises(LUTError, match=r"cannot price route 2: missing or failed segment\(s\) s0_inx_c2"):
        lut.latency((2,))
    with pytest.raises(LUTError, match=r"s0_inx_c3 \(failed: boom\)"):
        lut.latency((3,))
    with pytest.raises(LUTError, match=r"lacks 2 of 4 routes of the model: 2, 3"):
        lut.tensor(model)
    # from a results folder
    _lut_frame(_all_segments(model), "ds_mbnet_tiny").to_csv(tmp_path / "dynamic.csv", index=False)
    assert LatencyLUT.load(tmp_path, "torchscript", "ds_mbnet_tiny").tensor(model).shape == (4,)
    with pytest.raises(LUTError, match="no segments for model ds_mbnet, backend torchscript"):
        LatencyLUT.load(tmp_path, "torchscript", "ds_mbnet")
    with pytest.raises(LUTError, match="no LUT at"):
        LatencyLUT.load(tmp_path / "nowhere", "torchscript", "ds_mbnet")


def test_matched_distribution_and_streams():
    madds = {"a": 100.0, "b": 200.0, "c": 400.0}
    mix = matched_distribution(madds, 150.0)
    assert mix == pytest.approx({"a": 0.5, "b": 0.5})
    assert sum(p * madds[r] for r, p in matched_distribution(madds, 300.0).items()) == pytest.approx(300.0)
    assert matched_distribution(madds, 200.0) == {"b": 1.0}
    with pytest.raises(ValueError, match="outside the routes"):
        matched_distribution(madds, 50.0)
    stream = stream_routes({"a": 0.25, "b": 0.75}, 4000)
    assert stream.count("b") / len(stream) == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError, match="sum to 1"):
        stream_routes({"a": 0.5}, 10)


def test_a_segment_is_checked_on_inputs_with_the_channel_statistics_it_really_takes(tmp_path):
    """Standard normal features can drive a deep segment's activations a thousandfold above what its
    real input gives (a DS-ResNet++ segment at 224 px: scale 5302 against 6.4), where fp32 rounding
    alone fails a right engine; the check input carries the per-channel mean and spread of the
    segment's eager input on the seeded image, and stays seeded (the same in every run)."""
    from harness.measure.pipeline import check_input, check_input_like, image_batch

    model = dsnet.reference_statistics(randomize(dsnet.create_model("ds_resnet50_tiny")))
    plan = dsnet.split(model)
    key = next(iter(plan.stages[2]))
    like = plan.features_into(2, key, image_batch(1, 32))
    with torch.no_grad():  # the features really reach that segment: it runs on them
        plan.stages[2][key](like)
    x = check_input_like((3, *like.shape[1:]), like)
    assert torch.equal(x, check_input_like((3, *like.shape[1:]), like))
    dims = (0, 2, 3)
    assert torch.allclose(x.mean(dims), like.mean(dims), atol=0.35 * like.std(dims).max().item() + 1e-6)
    assert torch.allclose(x.std(dims), like.std(dims), rtol=0.35, atol=1e-6)
    assert not torch.allclose(x, check_input(x.shape))
    engine = DynamicEngine(plan, get_backend("onnxruntime"), X86, "fp32", tmp_path, 32)
    engine.segment(2, key, torch.zeros_like(like))  # compiled and checked on the seeded like-input
    (result,) = [r for name, r in engine.parts.items() if name.startswith(plan.segment_name(2, key))]
    assert result.ok
