"""The neuron-topology monitor: statistics by hand, merging detected, sharpness against the full Hessian, no
effect on training, and the three framework adapters."""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from topo_callbacks.core import NeuronTopologyMonitorCore
from topo_callbacks.functional.neurons import (
    bilipschitz_constants,
    directional_curvature,
    hessian_max_eigenvalue,
    merging_statistics,
    neighbour_pairs,
    neuron_points,
    stability_threshold,
)


def test_neuron_points_rows_bias_and_outgoing_weights():
    layer, nxt = nn.Linear(2, 3), nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        layer.bias.copy_(torch.tensor([7.0, 8.0, 9.0]))
        nxt.weight.copy_(torch.tensor([[10.0, 11.0, 12.0], [13.0, 14.0, 15.0]]))
    assert neuron_points(layer, nxt).tolist() == [[1, 2, 7, 10, 13], [3, 4, 8, 11, 14], [5, 6, 9, 12, 15]]
    with pytest.raises(ValueError, match="next_layer"):
        neuron_points(layer, nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no weight matrix"):
        neuron_points(nn.ReLU())


def test_merging_statistics_by_hand():
    # norms 5, 5, sqrt(32), 10 -> (lower) median 5; nearest distances 1, 1, 1 and |(4,4)-(6,8)|
    w = torch.tensor([[3.0, 4.0], [4.0, 3.0], [4.0, 4.0], [6.0, 8.0]])
    norms = w.norm(dim=1)
    dist = torch.cdist(w.double(), w.double()) + torch.eye(4, dtype=torch.float64) * 1e9
    nearest = dist.min(dim=1).values
    scale = float(norms.double().median())
    s = merging_statistics(w, rel_eps=0.25, quantiles=(0.0, 0.5))
    assert s["scale"] == pytest.approx(scale)
    assert s["nn_q0"] == pytest.approx(float(nearest.min()) / scale)
    assert s["nn_q50"] == pytest.approx(float(nearest.double().quantile(0.5)) / scale)
    assert s["merged_fraction"] == pytest.approx(float((nearest / scale < 0.25).double().mean()))
    assert [round(float(v), 6) for v in nearest] == [1.0, 1.0, 1.0, round(math.dist((4, 4), (6, 8)), 6)]


def test_bilipschitz_by_hand():
    before = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    after = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 0.5], [5.0, 5.0]])
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])
    c = bilipschitz_constants(before, after, pairs, contraction=0.5)
    ratios = [3.0, 0.25, math.hypot(3, 0.5) / math.hypot(1, 2)]
    assert c["lip_min"] == pytest.approx(min(ratios))
    assert c["lip_max"] == pytest.approx(max(ratios))
    assert c["contracted"] == 1
    # nearest neighbours: 0 <-> 1, 2 -> 0 (2 < sqrt 5), 3 -> 2 (sqrt 34 < sqrt 41 < sqrt 50)
    assert neighbour_pairs(before, k=1).tolist() == [[0, 1], [0, 2], [2, 3]]
    assert bilipschitz_constants(before, before)["lip_min"] == pytest.approx(1.0)


def tiny_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    return model, torch.randn(16, 3), torch.randn(16, 1)


def full_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().flatten() for p in params]).double().requires_grad_(True)

    def loss_of(vector: torch.Tensor) -> torch.Tensor:
        chunks, i = [], 0
        for shape in shapes:
            n = math.prod(shape)
            chunks.append(vector[i : i + n].view(shape))
            i += n
        names = [name for name, _ in model.named_parameters()]
        out = torch.func.functional_call(model.double(), dict(zip(names, chunks, strict=True)), (x.double(),))
        return ((out - y.double()) ** 2).mean()

    h = torch.autograd.functional.hessian(loss_of, flat)
    model.float()
    return h


def test_power_iteration_matches_eigvalsh_of_the_full_hessian():
    model, x, y = tiny_problem()
    h = full_hessian(model, x, y)
    eig = torch.linalg.eigvalsh(h)
    top = float(eig[eig.abs().argmax()])
    model.double()
    params = list(model.parameters())

    def loss():
        return ((model(x.double()) - y.double()) ** 2).mean()

    lam, vec = hessian_max_eigenvalue(loss, params, iters=500, tol=1e-12)
    assert lam == pytest.approx(top, rel=1e-6)
    # warm start from the converged vector: a couple of iterations suffice
    lam2, _ = hessian_max_eigenvalue(loss, params, iters=2, init=vec)
    assert lam2 == pytest.approx(top, rel=1e-6)
    # preconditioned: the top eigenvalue of P^-1/2 H P^-1/2
    pre = [torch.rand_like(p) + 0.5 for p in params]
    s = torch.cat([q.flatten() for q in pre]).rsqrt()
    eig_p = torch.linalg.eigvalsh(s[:, None] * h * s[None, :])
    lam_p, _ = hessian_max_eigenvalue(loss, params, iters=500, tol=1e-12, preconditioner=pre)
    assert lam_p == pytest.approx(float(eig_p[eig_p.abs().argmax()]), rel=1e-6)
    # directional curvature along the gradient: g^T H g / g^T g
    g = torch.cat([t.flatten() for t in torch.autograd.grad(loss(), params)])
    assert directional_curvature(loss, params) == pytest.approx(float(g @ h @ g / (g @ g)), rel=1e-8)
    model.float()


def test_two_neurons_driven_together_are_detected_as_merging():
    torch.manual_seed(0)
    layer = nn.Linear(6, 12)
    model = nn.Sequential(layer)
    monitor = NeuronTopologyMonitorCore("0", every_n_train_steps=5, rel_eps=0.05)
    monitor.attach(model)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    rows = []
    for step in range(1, 41):
        # pull neuron 1 onto neuron 0 (and neuron 0 onto neuron 1): a gradient flow that merges them
        pull = ((layer.weight[1] - layer.weight[0]) ** 2).sum() + (layer.bias[1] - layer.bias[0]) ** 2
        optimizer.zero_grad()
        pull.backward()
        optimizer.step()
        if monitor.is_check_step(step):
            rows.append(monitor.run_check(step))
    b0 = [r["neurons/0/b0"] for r in rows]
    merged = [r["neurons/0/merged_fraction"] for r in rows]
    assert b0[0] == 12
    assert b0[-1] == 11  # the two neurons are one point at the fixed scale; no other pair merged
    assert merged[0] == 0
    assert merged[-1] == pytest.approx(2 / 12)
    assert max(r["neurons/0/breaking"] for r in rows[1:]) == 1
    assert min(r["neurons/0/lip_min"] for r in rows[1:]) < 0.5  # the pair contracted


def train_with(monitor_factory, steps: int = 12) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    probe = torch.randn(32, 8), torch.randn(32, 1)
    monitor = monitor_factory(probe)
    if monitor is not None:
        monitor.attach(model)
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor is not None and monitor.is_check_step(step):
            monitor.run_check(step, optimizer)
    return model, optimizer.state_dict()


def probe_loss(probe):
    x, y = probe
    return lambda model: ((model(x) - y) ** 2).mean()


def test_the_monitor_does_not_change_training():
    """Dropout (RNG), batch norm (buffers), Adam (state): bit-identical with and without the monitor."""
    plain_model, plain_opt = train_with(lambda probe: None)
    seen = []

    def factory(probe):
        mon = NeuronTopologyMonitorCore(
            "0",
            outgoing={"0": "4"},
            every_n_train_steps=3,
            sharpness=True,
            loss_fn=probe_loss(probe),
            sharpness_iters=5,
        )
        seen.append(mon)
        return mon

    model, opt = train_with(factory)
    for a, b in zip(plain_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for key, state in plain_opt["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt["state"][key][name]))
    history = seen[0].history
    assert [h["step"] for h in history] == [3, 6, 9, 12]
    assert all(h["neurons/sharpness"] > 0 for h in history)
    assert all(h["neurons/stability_ratio"] == pytest.approx(0.01 * h["neurons/sharpness"] / 38) for h in history)


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="`sharpness=True` needs `loss_fn`"):
        NeuronTopologyMonitorCore("0", sharpness=True)
    with pytest.raises(ValueError, match="`outgoing` keys"):
        NeuronTopologyMonitorCore("0", outgoing={"1": "2"})
    with pytest.raises(ValueError, match="`contraction`"):
        NeuronTopologyMonitorCore("0", contraction=1.5)
    model = nn.Module()
    model.encoder = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"Close matches: \['encoder'"):
        NeuronTopologyMonitorCore("encodr").attach(model)
    with pytest.raises(ValueError, match="no weight matrix"):
        NeuronTopologyMonitorCore("act").attach(nn.Sequential(OrderedDict(act=nn.ReLU())))
    with pytest.raises(ValueError, match="at least 2 neurons"):
        NeuronTopologyMonitorCore("out").attach(nn.Sequential(OrderedDict(out=nn.Linear(4, 1))))


def test_stability_threshold_with_momentum():
    p = [torch.zeros(1, requires_grad=True)]
    assert stability_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9)) == (pytest.approx(3.8), False)


# ------------------------------------------------------------------------------------------------ adapters
def test_lightning_adapter_logs_every_layer_and_resumes(tmp_path):
    pytest.importorskip("lightning")
    import csv

    from tests.lightning_helpers import TinyModel, loader, trainer
    from topo_callbacks.lightning import NeuronTopologyMonitor

    mon = NeuronTopologyMonitor(layers=["encoder.0", "encoder.2"], outgoing={"encoder.0": "encoder.2"},
                                every_n_train_steps=5)  # fmt: skip
    t = trainer(tmp_path, max_steps=20, callbacks=[mon])
    t.fit(TinyModel(), loader())
    assert [h["step"] for h in mon.history] == [5, 10, 15, 20]
    (path,) = tmp_path.glob("logs/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(path.read_text().splitlines()) if r.get("neurons/encoder.0/b0")]
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    assert float(rows[-1]["neurons/encoder.2/b0"]) == mon.history[-1]["neurons/encoder.2/b0"]
    assert rows[-1]["neurons/encoder.0/lip_min"]
    state = mon.state_dict()
    fresh = NeuronTopologyMonitor(layers=["encoder.0", "encoder.2"], every_n_train_steps=5)
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.history == mon.history
    assert fresh.last_checked_step == 20


def test_accelerate_adapter_logs_and_counts_steps():
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from topo_callbacks.accelerate import AccelerateNeuronTopologyMonitor

    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    probe = torch.randn(16, 4), torch.randn(16, 1)
    mon = AccelerateNeuronTopologyMonitor(accelerator, model, "0", every_n_train_steps=2, sharpness=True,
                                          loss_fn=probe_loss(probe), sharpness_iters=5)  # fmt: skip
    logged = []
    for _ in range(4):
        loss = ((model(probe[0]) - probe[1]) ** 2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        logged.append(mon.step(optimizer))
    assert logged[0] is None
    assert logged[2] is None
    assert logged[3]["neurons/stability_ratio"] == pytest.approx(0.1 * logged[3]["neurons/sharpness"] / 3.8)
    assert mon.state_dict()["global_step"] == 4


def test_hf_adapter_logs_through_the_trainer(tmp_path):
    pytest.importorskip("transformers")
    from tests.test_transformers import make_trainer
    from topo_callbacks.transformers import NeuronTopologyCallback

    trainer = make_trainer(tmp_path, max_steps=10, collapse_at=None)
    mon = NeuronTopologyCallback(trainer=trainer, layers=["encoder.0", "encoder.2"], every_n_train_steps=5)
    trainer.add_callback(mon)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    entries = [e for e in trainer.state.log_history if "neurons/encoder.0/b0" in e]
    assert [e["step"] for e in entries] == [5, 10]
    assert entries[-1]["neurons/encoder.2/b0"] == mon.history[-1]["neurons/encoder.2/b0"]
    assert set(mon.state()["args"]) == {"layers", "loss_fn", "every_n_train_steps"}


def test_hf_adapter_state_is_restored_from_a_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from tests.test_transformers import make_trainer
    from topo_callbacks.transformers import NeuronTopologyCallback

    common = {"save_strategy": "steps", "save_steps": 10, "restore_callback_states_from_checkpoint": True}
    first = make_trainer(tmp_path, max_steps=10, collapse_at=None, **common)
    first.add_callback(NeuronTopologyCallback(trainer=first, layers="encoder.0", every_n_train_steps=5))
    first.train()
    second = make_trainer(tmp_path, max_steps=15, collapse_at=None, **common)
    second.add_callback(NeuronTopologyCallback(trainer=second, layers="encoder.0", every_n_train_steps=5))
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    (restored,) = [cb for cb in second.callback_handler.callbacks if isinstance(cb, NeuronTopologyCallback)]
    assert [h["step"] for h in restored.history] == [5, 10, 15]
    assert "neurons/encoder.0/lip_min" not in restored.history[2]  # the previous cloud is not in the state
    assert [e["step"] for e in second.state.log_history if "neurons/encoder.0/b0" in e][-1] == 15
