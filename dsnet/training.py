"""Two-stage training of a dynamic supernet (DS-Net++ section 4, DS-Net supplementary A).

Contract
--------
Stage I, :func:`train_supernet`: the gate is off (every step runs fixed routes). Sandwich rule:
per step the largest route, the smallest and ``n_random`` random routes; the largest learns from
the labels, the others by in-place distillation from the largest route's soft output, or (option
``ema_decay``) by in-place bootstrapping from an EMA copy of the supernet
(``torch.optim.swa_utils.AveragedModel``). Then every route's split BN is re-calibrated.

Stage II, :func:`train_gate`: the supernet is frozen (its BN in eval mode); only the routing heads
(``Gate.route``, see :func:`gate_parameters`) learn, with
``L = 1.0 L_cls + 0.5 L_cp + 1.0 L_sgs``:

- ``L_cls``: cross-entropy of the gate-driven output (straight-through Gumbel routes);
- ``L_cp``: a :class:`ComplexityPenalty`, ``((mean_n sum_k p_nk c_k - target) / T)^2``, ``p`` the
  route one-hot (the product of the gates' straight-through one-hots, routing-space order) and
  ``c`` per-route MAdds (:meth:`ComplexityPenalty.madds`, the paper) or LUT latency
  (:meth:`ComplexityPenalty.latency`); ``T`` the cost of the largest route; target 0 by default;
- ``L_sgs``: cross-entropy of each gate's scores against :func:`sgs_targets` ("try best": the first
  choice if the smallest route classifies the sample correctly, else the last allowed one).

SGD (momentum 0.9), lr 0.05 decayed x0.9 per epoch, no weight decay. :func:`restrict_routes`
limits the gates to their first choices (the paper's -S gate). :func:`evaluate_gate` reports
accuracy, the route histogram and expected costs. The project's checkpoints (a model with its
gate restriction and metadata) are :mod:`dsnet.checkpoint`'s.

Both stages train where the model's parameters lie (a CUDA model: every batch is moved there as it
comes, from pinned memory without blocking) and, with ``amp``, in mixed precision
(:class:`MixedPrecision`: float16 autocast with loss scaling on CUDA, bfloat16 on CPU); the
complexity penalty is computed in float32 whatever the autocast (MAdds overflow float16).

After stage II, :func:`calibrate_to_budget` (not the paper's) shifts each gate's scores by
``-lambda * cost`` of each choice (``Gate.score_bias``), ``lambda`` found by bisection on given
images so that the mean cost of the routes the gates choose meets a budget: how a gate trained
with either penalty is made to meet a deployment budget on the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dsnet.calibration import calibration_routes, recalibrate_bn
from dsnet.distributed import World, average_buffers, gather, mean_across
from dsnet.gate import Gate, model_gates
from dsnet.layers import SplitBatchNorm2d
from dsnet.routes import Route

Progress = Callable[[str, dict], None]  # (label, figures) after each step


def device_of(model) -> torch.device:
    """Where the model's parameters lie (where its training batches must go)."""
    return next(model.parameters()).device


class MixedPrecision:
    """Autocast and loss scaling for a training loop on ``device``: float16 with a dynamic loss
    scale (``torch.amp.GradScaler``) on CUDA; bfloat16 on CPU, unscaled (bfloat16 has float32's
    range); disabled, plain float32 and every method a pass-through."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device_type, self.enabled = device.type, bool(enabled)
        self.dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.enabled and device.type == "cuda")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, opt) -> None:
        """``opt.step()``, skipped by the scaler when a scaled gradient overflowed."""
        self.scaler.step(opt)
        self.scaler.update()


def _to(device: torch.device, *tensors):
    return tuple(t.to(device, non_blocking=True) for t in tensors)


# -- stage I ---------------------------------------------------------------------------------------

def sandwich_routes(model, n_random: int, generator: torch.Generator) -> list[Route]:
    """Largest first (the teacher), then the smallest, then ``n_random`` uniformly drawn routes."""
    routes = model.routes()
    picks = torch.randint(len(routes), (n_random,), generator=generator).tolist()
    return [routes[-1], routes[0]] + [routes[i] for i in picks]


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return -(target_probs * F.log_softmax(logits, -1)).sum(-1).mean()


def train_supernet(model, loader, epochs: int, lr: float = 0.05, n_random: int = 2, distill: bool = True,
                   ema_decay: float | None = None, weight_decay: float = 1e-4, seed: int = 0,
                   calibration_batches: int | None = None, progress: Progress | None = None,
                   world: World | None = None, resume: dict | None = None,
                   on_epoch: Callable[[dict], None] | None = None, amp: bool = False) -> dict:
    """Stage I in place; returns the last epoch's mean loss. BN is re-calibrated at the end, over
    every route or, in a large routing space, a seeded draw of them (``calibration_routes``).

    Over several processes (``world``, ``loader`` from :func:`dsnet.distributed.shard_loader`) the
    model runs under ``DistributedDataParallel``; the sandwich's random routes come from one seeded
    generator, the same on every rank; the re-calibrated statistics are averaged over the ranks.
    ``on_epoch(state)`` gets, after every epoch, what ``resume=state`` continues from (model,
    optimizer, schedule, generators, the epoch): a run resumed from it goes on as if never stopped.
    ``amp``: mixed precision (:class:`MixedPrecision`) on the model's device."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    g = torch.Generator().manual_seed(seed)
    params = [p for n, p in model.named_parameters() if not n.endswith("route.weight")]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * max(1, len(loader)))
    device = device_of(model)
    mp = MixedPrecision(device, amp)
    teacher = None
    if ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        teacher = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    first = 0
    if resume is not None:
        first = _resume(resume, model, opt, sched, world, generator=g, teacher=teacher, mp=mp)
    net = _parallel(_Forward(model), world, unused=True)
    model.train()
    total, n = 0.0, 0
    for epoch in range(first, epochs):
        _set_epoch(loader, epoch)
        total, n = 0.0, 0
        for step, (x, y) in enumerate(loader):
            x, y = _to(device, x, y)
            opt.zero_grad(set_to_none=True)
            routes = sandwich_routes(model, n_random, g)
            model.set_route(routes[0])
            with mp.autocast():
                out = net(x)
                loss = F.cross_entropy(out, y)
            mp.backward(loss)
            soft = None
            if distill:
                if teacher is not None:
                    with torch.no_grad(), mp.autocast():
                        teacher.module.set_route(routes[0])
                        teacher.eval()
                        soft = teacher(x).float().softmax(-1)
                else:
                    soft = out.detach().float().softmax(-1)
            for route in routes[1:]:
                model.set_route(route)
                with mp.autocast():
                    out_r = net(x)
                    loss_r = soft_cross_entropy(out_r, soft) if soft is not None else F.cross_entropy(out_r, y)
                mp.backward(loss_r)
            mp.step(opt)
            sched.step()
            if teacher is not None:
                teacher.update_parameters(model)
            total, n = total + loss.item(), n + 1
            if progress:
                progress(f"stage I epoch {epoch + 1}/{epochs} step {step + 1}/{len(loader)}",
                         {"loss": loss.item()})
        if on_epoch:
            on_epoch(_state(epoch, model, opt, sched, world, generator=g, teacher=teacher, mp=mp,
                            loss=total / max(1, n)))
    if n == 0 and resume is not None:  # every epoch was done before: the loss is the one stored
        total, n = resume.get("loss", 0.0), 1
    recalibrate_bn(model, loader, calibration_routes(model, seed=seed), max_batches=calibration_batches)
    average_buffers([b for m in model.modules() if isinstance(m, SplitBatchNorm2d) for b in m.buffers()], world)
    model.eval()
    return {"loss": total / max(1, n)}


class _Forward(nn.Module):
    """``model(x)`` (stage I: the route set on the model) or ``model.forward_dynamic(x)`` (stage II)
    as a module's forward: what ``DistributedDataParallel`` wraps and syncs the gradients of."""

    def __init__(self, model, dynamic: bool = False):
        super().__init__()
        self.model, self.dynamic = model, dynamic

    def forward(self, x):
        return self.model.forward_dynamic(x) if self.dynamic else self.model(x)


def _parallel(module: nn.Module, world: World | None, unused: bool = False):
    """``module`` under ``DistributedDataParallel`` over ``world`` (itself for one process);
    ``unused``: some parameters sit out a step (stage I: the routing heads)."""
    if world is None or not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    on_cuda = next(module.parameters()).is_cuda
    return DistributedDataParallel(module, device_ids=[world.local_rank] if on_cuda else None,
                                   find_unused_parameters=unused, broadcast_buffers=False)


def _set_epoch(loader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):  # DistributedSampler: each epoch its own shuffle, the same on every rank
        sampler.set_epoch(epoch)


def _state(epoch: int, model, opt, sched, world, generator=None, teacher=None, mp: MixedPrecision | None = None,
           **extra) -> dict:
    """What a resumed run continues from after ``epoch``; every rank's RNG states, the CPU's and
    (training on CUDA) its device's (a collective: all ranks call it); the loss scale."""
    on_cuda = device_of(model).type == "cuda"
    return {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "generator": None if generator is None else generator.get_state(),
            "teacher": None if teacher is None else teacher.state_dict(),
            "torch_rng": gather(torch.get_rng_state(), world),
            "cuda_rng": gather(torch.cuda.get_rng_state(), world) if on_cuda else None,
            "scaler": None if mp is None else mp.scaler.state_dict(), **extra}


def _resume(state: dict, model, opt, sched, world, generator=None, teacher=None,
            mp: MixedPrecision | None = None) -> int:
    """Load ``state`` (:func:`_state`); returns the first epoch still to run."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    if teacher is not None and state.get("teacher") is not None:
        teacher.load_state_dict(state["teacher"])
    if mp is not None and state.get("scaler"):
        mp.scaler.load_state_dict(state["scaler"])
    rank = 0 if world is None else world.rank
    rngs = state.get("torch_rng") or []
    if len(rngs) > rank:  # saved by as many ranks as now run
        torch.set_rng_state(rngs[rank])
    cuda_rngs = state.get("cuda_rng") or []
    if device_of(model).type == "cuda" and len(cuda_rngs) > rank:
        torch.cuda.set_rng_state(cuda_rngs[rank])
    return int(state["epoch"])


# -- stage II --------------------------------------------------------------------------------------

def gates(model) -> list[Gate]:
    """The model's routing gates, in network order."""
    return model_gates(model)


def gate_parameters(model) -> list[nn.Parameter]:
    """What stage II trains: the routing heads."""
    return [g.route.weight for g in gates(model)]


def restrict_routes(model, num_allowed: int | None) -> None:
    """Let every gate choose only among its first ``num_allowed`` choices (``None``: all)."""
    for g in gates(model):
        g.restrict(num_allowed)


def allowed_routes(model) -> list[Route]:
    """The routes the (possibly restricted) gates can choose, in routing-space order."""
    limits = [g.num_allowed for g in gates(model)]
    return [r for r in model.routing_space.all_routes() if all(c < k for c, k in zip(r, limits))]


@torch.no_grad()
def sgs_targets(model, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Sandwich gate sparsification, "try best": per gate, choice 0 where the smallest allowed
    route classifies the sample correctly, else the gate's last allowed choice."""
    smallest = Route(tuple(0 for _ in gates(model)))
    correct = model._with_route(smallest, lambda: model(images)).argmax(-1) == labels
    return [torch.where(correct, 0, g.num_allowed - 1) for g in gates(model)]


def route_probabilities(onehots: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample route weights ``(N, routes)`` in routing-space order: the product over gates of
    each gate's one-hot (lexicographic, first gate most significant). Differentiable."""
    p = onehots[0]
    for oh in onehots[1:]:
        p = (p[:, :, None] * oh[:, None, :]).flatten(1)
    return p


@dataclass
class ComplexityPenalty:
    """``((mean_n sum_k p_nk costs_k - target) / normalizer)^2`` over a batch (DS-Net eq. 37)."""

    costs: torch.Tensor  # per route, routing-space order
    normalizer: float
    unit: str
    kind: str
    target: float = 0.0

    def expected(self, onehots: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample cost of the chosen routes ``(N,)``."""
        probs = route_probabilities([o.float() for o in onehots])  # float32 under autocast: MAdds overflow float16
        return probs @ self.costs.to(probs.device, torch.float32)

    def __call__(self, onehots: list[torch.Tensor], world: World | None = None) -> torch.Tensor:
        """The penalty of the batch; over several processes, of the global batch. The penalty is not
        linear in the batch's mean cost, so each rank reads the global mean (one all-reduce, in the
        forward pass) and passes back the penalty's slope there times its own share's mean: averaged
        over the ranks (``DistributedDataParallel``), that is the one-process gradient. No collective
        runs inside the backward pass, where it would race the gradient buckets' own."""
        local = self.expected(onehots).mean()
        mean = mean_across(local.detach(), world)
        value = ((mean - self.target) / self.normalizer) ** 2
        slope = 2 * (mean - self.target) / self.normalizer ** 2
        return value + slope * (local - local.detach())

    @classmethod
    def madds(cls, model, input_size: int, target: float | None = None) -> ComplexityPenalty:
        import dsnet

        costs = torch.tensor([float(dsnet.profile(model, r, input_size).madds)
                              for r in model.routing_space.all_routes()])
        return cls(costs, float(costs.max()), "MAdds", "madds", target or 0.0)

    @classmethod
    def latency(cls, lut_ms: torch.Tensor, model, target_ms: float | None = None,
                target_fraction: float | None = None) -> ComplexityPenalty:
        """The LUT's per-route latency; the target in ms, or as a fraction of the largest route's
        latency (``target_fraction``). The penalty depends only on the ratios of the LUT's figures
        (divided by the largest route's), so a fraction needs no absolute time: the machine's
        drift between measuring the LUT and choosing the target cannot move it."""
        n = len(model.routing_space)
        if lut_ms.dim() != 1 or len(lut_ms) != n:
            raise ValueError(f"the LUT prices {lut_ms.numel()} routes, the model has {n}")
        if target_ms is not None and target_fraction is not None:
            raise ValueError("give the latency target in ms or as a fraction of the largest route, not both")
        largest = float(lut_ms.max())
        target = target_fraction * largest if target_fraction is not None else target_ms or 0.0
        return cls(lut_ms.float(), largest, "ms", "latency", target)


@dataclass
class LossWeights:
    cls: float = 1.0
    cp: float = 0.5
    sgs: float = 1.0


def freeze_supernet(model) -> list[nn.Parameter]:
    """Stage II set-up: only routing heads require grad; BN (and everything else) in eval mode,
    Gumbel routing on (``model.training`` is what the gates read)."""
    trainable = gate_parameters(model)
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no routing gate to train")
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    model.train()
    for m in model.modules():
        if isinstance(m, (SplitBatchNorm2d, nn.BatchNorm2d, nn.Dropout)):
            m.eval()
    return trainable


def train_gate(model, loader, penalty: ComplexityPenalty, epochs: int, lr: float = 0.05, lr_decay: float = 0.9,
               weights: LossWeights | None = None, seed: int = 0, progress: Progress | None = None,
               world: World | None = None, resume: dict | None = None,
               on_epoch: Callable[[dict], None] | None = None, amp: bool = False) -> list[dict]:
    """Stage II in place; returns per-epoch means of the losses. Over several processes (see
    :func:`train_supernet`) the gate trains under ``DistributedDataParallel``, the penalty reads the
    global batch's mean cost and each rank draws its own Gumbel noise (seed + rank); ``on_epoch``
    and ``resume`` as in :func:`train_supernet`; ``amp``: mixed precision (:class:`MixedPrecision`),
    the penalty in float32."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if len(penalty.costs) != len(model.routing_space):
        raise ValueError(f"the penalty prices {len(penalty.costs)} routes, the model has {len(model.routing_space)}")
    weights = weights or LossWeights()
    torch.manual_seed(seed + (0 if world is None else world.rank))  # Gumbel noise, each rank its own
    params = freeze_supernet(model)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, lr_decay)
    device = device_of(model)
    mp = MixedPrecision(device, amp)
    model.set_route(None)
    history, first = [], 0
    if resume is not None:
        first = _resume(resume, model, opt, sched, world, mp=mp)
        history = list(resume.get("history", []))
        freeze_supernet(model)
    net = _parallel(_Forward(model, dynamic=True), world)
    try:
        for epoch in range(first, epochs):
            _set_epoch(loader, epoch)
            sums = {"loss": 0.0, "cls": 0.0, "cp": 0.0, "sgs": 0.0, "cost": 0.0}
            n = 0
            for step, (x, y) in enumerate(loader):
                x, y = _to(device, x, y)
                with mp.autocast():
                    targets = sgs_targets(model, x, y)
                    out = net(x)
                    l_cls = F.cross_entropy(out.logits, y)
                    l_sgs = sum(F.cross_entropy(s, t) for s, t in zip(out.scores, targets)) / len(targets)
                l_cp = penalty(out.onehots, world)
                loss = weights.cls * l_cls + weights.cp * l_cp + weights.sgs * l_sgs
                opt.zero_grad(set_to_none=True)
                mp.backward(loss)
                mp.step(opt)
                cost = penalty.expected([o.detach() for o in out.onehots]).mean().item()
                for k, v in (("loss", loss), ("cls", l_cls), ("cp", l_cp), ("sgs", l_sgs)):
                    sums[k] += v.item()
                sums["cost"] += cost
                n += 1
                if progress:
                    progress(f"stage II epoch {epoch + 1}/{epochs} step {step + 1}/{len(loader)}",
                             {"loss": loss.item(), f"cost_{penalty.unit}": cost})
            sched.step()
            history.append({k: v / max(1, n) for k, v in sums.items()} | {"epoch": epoch + 1})
            if on_epoch:
                on_epoch(_state(epoch, model, opt, sched, world, mp=mp, history=list(history)))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    return history


@dataclass
class GateEvaluation:
    accuracy: float
    n: int
    route_counts: dict[str, int]  # every route of the routing space, routing-space order
    expected: dict[str, float] = field(default_factory=dict)  # cost name -> mean per sample

    def histogram(self) -> dict[str, float]:
        return {r: c / self.n for r, c in self.route_counts.items()}


@torch.no_grad()
def evaluate_gate(model, loader, costs: dict[str, torch.Tensor] | None = None) -> GateEvaluation:
    """Eval-mode gate-driven accuracy, route counts and the mean per-sample cost under ``costs``
    (name -> per-route tensor in routing-space order)."""
    model.eval()
    model.set_route(None)
    routes = model.routing_space.all_routes()
    counts = torch.zeros(len(routes), dtype=torch.long)
    correct = n = 0
    device = device_of(model)
    for x, y in loader:
        x, y = _to(device, x, y)
        out = model.forward_dynamic(x)
        correct += int((out.logits.argmax(-1) == y).sum())
        n += len(y)
        counts += route_probabilities(out.onehots).round().long().sum(0).cpu()
    if n == 0:
        raise ValueError("the evaluation data is empty")
    expected = {name: float((counts.double() * c.double()).sum() / n) for name, c in (costs or {}).items()}
    return GateEvaluation(correct / n, n, {str(r): int(c) for r, c in zip(routes, counts)}, expected)


# -- budget calibration -----------------------------------------------------------------------------

@torch.no_grad()
def calibrate_to_budget(model, images: torch.Tensor, costs: torch.Tensor, budget: float,
                        iters: int = 40) -> dict:
    """Set each gate's ``score_bias`` to ``-lambda * c_k``, ``c_k[j]`` the mean cost of the routes
    that take choice ``j`` at gate ``k`` over the largest route's cost, with the smallest ``lambda``
    (bisection, ``iters`` steps) for which the mean per-image cost of the chosen routes on
    ``images`` is at most ``budget``; a negative ``lambda`` spends a budget the trained gate leaves
    unused. ``costs``: per route, routing-space order, the unit of ``budget``. Returns
    ``{"lambda", "mean_cost", "budget", "images"}``; raises ``ValueError`` when no ``lambda`` meets
    the budget (below the cheapest allowed route). Eval-mode decisions, as deployed."""
    from dsnet.deploy import split

    gs = gates(model)
    for g in gs:
        g.score_bias.zero_()
    model.eval()
    plan = split(model)  # uncalibrated: its gates emit raw scores
    routes = [tuple(r) for r in model.routing_space.all_routes()]
    index = {r: i for i, r in enumerate(routes)}
    costs = costs.double()
    if len(costs) != len(routes):
        raise ValueError(f"{len(costs)} costs for {len(routes)} routes")
    choice_cost = [torch.tensor([float(costs[[i for i, r in enumerate(routes) if r[k] == j]].mean() / costs.max())
                                 for j in range(g.num_choices)]) for k, g in enumerate(gs)]
    images = images.to(device_of(model))
    cache = {(): plan.head(images)}

    def scores_after(prefix: tuple):
        """(features, next gate's raw scores) of every image after the choices ``prefix``."""
        if prefix not in cache:
            feats, _ = scores_after(prefix[:-1])
            k = len(prefix) - 1
            cache[prefix] = plan.stages[k][(prefix[-2] if k else None, prefix[-1])](feats)
        return cache[prefix]

    def mean_cost(lam: float) -> float:
        groups = {(): torch.arange(len(images), device=images.device)}
        for k in range(len(gs)):
            nxt = {}
            for prefix, idx in groups.items():
                # in the scores' own dtype, as the gate adds its bias when deployed: a decision taken
                # in double here could differ from the float32 one on a near tie
                s = scores_after(prefix)[1][idx]
                c = (s + (-lam * choice_cost[k]).to(s.device, s.dtype)).argmax(-1)
                for j in c.unique().tolist():
                    nxt[prefix + (j,)] = idx[c == j]
            groups = nxt
        return float(sum(costs[index[r]] * len(idx) for r, idx in groups.items()) / len(images))

    hi = 1.0
    while mean_cost(hi) > budget:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"no calibration meets the budget {budget:.4g}: the cheapest allowed route "
                             f"costs {float(costs.min()):.4g}")
    lo = -1.0
    while mean_cost(lo) <= budget and lo > -1e6:
        lo *= 2
    if mean_cost(lo) <= budget:  # every image on the most expensive choices is within budget
        hi = lo
    else:
        for _ in range(iters):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if mean_cost(mid) <= budget else (mid, hi)
    for g, cc in zip(gs, choice_cost):
        g.score_bias.copy_((-hi * cc).to(g.score_bias))
    return {"lambda": hi, "mean_cost": mean_cost(hi), "budget": budget, "images": len(images)}
