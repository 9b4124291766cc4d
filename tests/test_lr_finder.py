"""lr_find (course_utils.lr_finder): restores everything, trains only the stage, keeps ratios, meets theory.

The course model tests use the seeded ResNet18+CBAM of the other tests on a few dozen random 32×32 images;
the analytic test a two-parameter linear model whose loss is an exact quadratic, where plain SGD is stable
exactly for lr < 2/λ_max.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from _helpers import differing, expected_group, group_state, random_images
from torch import nn

from course_utils import lr_finder
from course_utils.data import TensorLoader
from course_utils.finetune import Schedule, Stage, make_optimizer, three_stage_schedule
from course_utils.lr_finder import LRFinderResult, lr_find
from course_utils.models import resnet18_cbam
from course_utils.train import fit

TIMING = ("seconds", "images_per_s")
FAST = dict(device="cpu", progress=False, amp=False, channels_last=False)


@pytest.fixture
def model(resnet18_state_file):
    torch.manual_seed(0)
    return resnet18_cbam(weights=resnet18_state_file, placement="stage")


@pytest.fixture
def tiny_loader(tiny_data):
    images, labels = tiny_data
    return TensorLoader(images[:64], labels[:64], 32, train=True, device="cpu", seed=0)


def comparable_rows(history) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history.rows]


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and gradient (clones), by name."""
    out = {f"t:{n}": t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    out.update({f"g:{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


def same_tensors(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        x.dtype == y.dtype and x.stride() == y.stride() and torch.equal(x, y)
        for x, y in zip(a.values(), b.values())
    )


def optimizer_state(opt) -> list:
    sd = opt.state_dict()
    flat = [
        (k, {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}) for k, s in sd["state"].items()
    ]
    return [flat, [dict(g) for g in sd["param_groups"]]]


def equal_optimizer_states(a, b) -> bool:
    (sa, ga), (sb, gb) = a, b
    if ga != gb or [k for k, _ in sa] != [k for k, _ in sb]:
        return False
    for (_, x), (_, y) in zip(sa, sb):
        if x.keys() != y.keys():
            return False
        for key in x:
            if torch.is_tensor(x[key]) != torch.is_tensor(y[key]):
                return False
            if torch.is_tensor(x[key]) and not torch.equal(x[key], y[key]):
                return False
            if not torch.is_tensor(x[key]) and x[key] != y[key]:
                return False
    return True


@pytest.fixture
def step_hook(monkeypatch):
    """Calls ``hook(model, optimizer)`` before and ``after(model, optimizer)`` after each step lr_find takes
    (the shared train_step): returns a function that installs them."""

    def install(before=None, after=None):
        original = lr_finder.train_step

        def wrapped(model, optimizer, *args, **kwargs):
            if before:
                before(model, optimizer)
            out = original(model, optimizer, *args, **kwargs)
            if after:
                after(model, optimizer)
            return out

        monkeypatch.setattr(lr_finder, "train_step", wrapped)

    return install


# ------------------------------------------------------------------------------ restoration
def test_everything_is_restored_bit_identical(model, tiny_loader, step_hook):
    # An unusual starting state, to be sure it is put back as it was and not merely "reset":
    model.train()
    model.layer1.eval()  # a per-module mode
    model.cbam.eval()
    model.stem.conv1.weight.requires_grad_(False)
    opt = make_optimizer(model)
    images, labels = next(iter(tiny_loader))
    for pg in opt.param_groups:
        pg["lr"] = 1e-4
    nn.functional.cross_entropy(model(images), labels).backward()
    opt.step()  # the optimizer now has state (exp_avg, exp_avg_sq, step) and the parameters have gradients
    tiny_loader.set_epoch(7)
    random.seed(11)
    torch.manual_seed(12)
    before_state, before_opt = full_state(model), optimizer_state(opt)
    before_grad = [p.requires_grad for p in model.parameters()]
    before_modes = [m.training for m in model.modules()]
    before_rng, before_py = torch.get_rng_state(), random.getstate()
    changed = []
    step_hook(after=lambda m, o: changed.append(not same_tensors(full_state(m), before_state)))

    result = lr_find(
        model,
        three_stage_schedule(differential=True),
        tiny_loader,
        which=2,
        num_steps=10,
        optimizer=opt,
        **FAST,
    )

    assert len(result) == 10 and all(changed)  # the sweep did train (so restoring was needed)
    assert same_tensors(full_state(model), before_state)
    assert [p.requires_grad for p in model.parameters()] == before_grad
    assert [m.training for m in model.modules()] == before_modes
    assert equal_optimizer_states(optimizer_state(opt), before_opt)
    assert torch.equal(torch.get_rng_state(), before_rng) and random.getstate() == before_py
    assert tiny_loader.epoch == 7


def test_fit_after_lr_find_gives_the_same_history(resnet18_state_file, tiny_data):
    images, labels = tiny_data
    schedule = Schedule(
        three_stage_schedule(differential=True, epochs=(1, 1, 1)).stages[:2]
    )  # frozen, then not

    def run(finder_first: bool):
        torch.manual_seed(0)
        model = resnet18_cbam(weights=resnet18_state_file, placement="stage")
        train = TensorLoader(images[:64], labels[:64], 32, train=True, device="cpu", seed=0)
        val = TensorLoader(images[64:], labels[64:], 64, train=False, device="cpu")
        if finder_first:
            lr_find(model, schedule, train, which=2, num_steps=10, device="cpu", progress=False)
        history = fit(model, schedule, train, val, device="cpu", progress=False)
        return comparable_rows(history), {k: v.clone() for k, v in model.state_dict().items()}

    alone_rows, alone_state = run(False)
    after_rows, after_state = run(True)
    assert after_rows == alone_rows
    assert differing(alone_state, after_state) == []


# ------------------------------------------------------------------------------ what the sweep trains
def test_frozen_groups_are_never_touched_during_the_sweep(model, tiny_loader, step_hook):
    frozen = {"stem", "layer1", "layer2"}  # stage 2 of the course's schedule trains new + layer3 + layer4
    start = group_state(model)
    seen = []

    def before(m, opt):
        requires = {expected_group(n) for n, p in m.named_parameters() if p.requires_grad}
        bn_training = {
            expected_group(n)
            for n, mod in m.named_modules()
            if isinstance(mod, nn.BatchNorm2d) and mod.training
        }
        lr_of = {pg["group"]: pg["lr"] for pg in opt.param_groups}
        seen.append(
            {"requires": requires, "bn_training": bn_training, "frozen_lr": {lr_of[g] for g in frozen}}
        )

    def after(m, opt):
        now = group_state(m)
        seen[-1]["frozen_changed"] = [n for g in frozen for n in differing(start[g], now[g])]
        seen[-1]["trained_changed"] = bool(differing(start["layer4"], now["layer4"]))
        seen[-1]["grads"] = {expected_group(n) for n, p in m.named_parameters() if p.grad is not None}

    step_hook(before, after)
    lr_find(model, three_stage_schedule(), tiny_loader, which=2, num_steps=12, **FAST)
    assert len(seen) == 12
    for step in seen:
        assert step["requires"] == {"layer3", "layer4", "cbam", "head"}
        assert not step["bn_training"] & frozen and {"layer3", "layer4"} <= step["bn_training"]
        assert step["frozen_lr"] == {0.0}
        assert step["frozen_changed"] == []  # parameters and BatchNorm running statistics bit-identical
        assert not step["grads"] & frozen
        assert step["trained_changed"]


def test_ratios_between_trainable_groups_are_kept_at_every_step(model, tiny_loader, step_hook):
    schedule = three_stage_schedule(differential=True)  # stage 2: new 1e-3, layer3/layer4 1e-4
    in_force = []
    step_hook(before=lambda m, opt: in_force.append({pg["group"]: pg["lr"] for pg in opt.param_groups}))
    result = lr_find(model, schedule, tiny_loader, which=2, num_steps=15, start_lr=1e-6, end_lr=1e-1, **FAST)
    assert result.shares == {
        "layer3": pytest.approx(0.1),
        "layer4": pytest.approx(0.1),
        "cbam": 1.0,
        "head": 1.0,
    }
    assert in_force == result.lrs and len(result.lrs) == 15
    for m, lrs in zip(result.multiplier, result.lrs):
        assert lrs["head"] == lrs["cbam"] == pytest.approx(m, rel=1e-12)
        assert lrs["layer3"] / lrs["head"] == lrs["layer4"] / lrs["head"] == pytest.approx(0.1, rel=1e-12)
        assert lrs["stem"] == lrs["layer1"] == lrs["layer2"] == 0.0
    assert result.multiplier[0] == pytest.approx(1e-6) and result.multiplier[-1] == pytest.approx(1e-1)
    steps = [b / a for a, b in zip(result.multiplier, result.multiplier[1:])]
    assert max(steps) == pytest.approx(min(steps), rel=1e-9)  # exponential


# ------------------------------------------------------------------------------ analytic problem
class Quadratic(nn.Module):
    """Exposes the course models' group structure (``stages``, ``cbam``, ``placement``, ``new_groups``):
    one group, ``head``, a linear map w·x. Its cross-entropy is exactly q = ½(w·x − t)² + 1 per sample
    (logits (0, log(eˣ−1)) for label 0), so the loss is a quadratic in w with Hessian mean(x xᵀ)."""

    stages = ()
    placement = None
    new_groups = ("head",)

    def __init__(self):
        super().__init__()
        self.cbam = nn.ModuleDict()
        self.head = nn.Linear(2, 1, bias=False, dtype=torch.float64)
        with torch.no_grad():  # near w* = (1, -1): the curve starts close to its noise floor
            self.head.weight.copy_(torch.tensor([[1.5, -0.5]], dtype=torch.float64))

    def forward(self, inputs):
        x, t = inputs[:, :2], inputs[:, 2]
        q = 0.5 * (self.head(x).squeeze(1) - t) ** 2 + 1.0
        return torch.stack([torch.zeros_like(q), torch.log(torch.expm1(q))], 1)


class NoisyTargets:
    """Batches of the two inputs x₁ = (a, 0), x₂ = (0, b), targets w*·x + noise (σ): Hessian
    diag(a², b²)/2."""

    def __init__(self, a=2.0, b=1.0, sigma=0.5, batches=300, seed=0):
        self.x = torch.tensor([[a, 0.0], [0.0, b]], dtype=torch.float64)
        self.w_star = torch.tensor([1.0, -1.0], dtype=torch.float64)
        self.sigma, self.batches, self.seed, self.epoch = sigma, batches, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.batches

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        for _ in range(self.batches):
            t = self.x @ self.w_star + self.sigma * torch.randn(2, generator=g, dtype=torch.float64)
            yield torch.cat([self.x, t[:, None]], 1), torch.zeros(2, dtype=torch.long)


def plain_sgd(model):
    opt = make_optimizer(model, weight_decay=0.0, optimizer="sgd")
    for pg in opt.param_groups:
        pg["momentum"], pg["nesterov"] = 0.0, False
    return opt


def check_divergence_at(result, bound):
    """The sweep is stable below ``bound`` and blows up just above it, as theory says."""
    assert result.diverged
    floor = min(result.smoothed)  # the noise floor, about 1 + σ²/4 plus the stationary excess
    blow_up = next(m for m, loss in zip(result.multiplier, result.loss) if not loss < 4 * floor)
    # The raw loss leaves its floor only past the bound (growth factor per step |1 − lr·λ|² > 1 there),
    # within a few steps of it (the sweep grows the rate by 6 % per step) …
    assert bound < blow_up < 1.4 * bound, (blow_up, bound)
    # … and the smoothed loss, which lags the raw one by a few steps, stops the sweep soon after.
    assert bound < result.multiplier[-1] < 1.6 * bound, (result.multiplier[-1], bound)
    for rule in lr_finder.RULES:
        assert result.suggestion(rule) < bound
    assert 0.01 * bound < result.suggestion() < bound  # below the bound, and not uselessly small


def test_plain_sgd_on_a_quadratic_diverges_where_theory_says_and_the_suggestion_lies_below():
    """Plain gradient descent on a quadratic with Hessian eigenvalues λ is stable exactly for lr < 2/λ_max."""
    model, loader = Quadratic(), NoisyTargets(a=2.0, b=1.0)
    lam_max = 2.0**2 / 2  # Hessian diag(a², b²)/2
    result = lr_find(
        model,
        Stage("head", 1, ["head"], 0.1),
        loader,
        start_lr=1e-3,
        end_lr=100,
        num_steps=200,
        optimizer=plain_sgd(model),
        **FAST,
    )
    check_divergence_at(result, 2 / lam_max)


def test_nesterov_sgd_on_a_quadratic_diverges_where_theory_says():
    """SGD with Nesterov momentum β (make_optimizer's "sgd": β = 0.9, PyTorch's form) is stable exactly for
    lr < 2(1+β) / ((1+2β) λ_max): the update matrix [[1−h(1+β), −β²], [h, β]] (h = lr·λ) has its
    eigenvalues inside the unit circle iff h < 2(1+β)/(1+2β)."""
    model, loader = Quadratic(), NoisyTargets(a=2.0, b=1.0)
    beta, lam_max = 0.9, 2.0
    opt = make_optimizer(model, weight_decay=0.0, optimizer="sgd")
    assert all(pg["momentum"] == beta and pg["nesterov"] for pg in opt.param_groups)
    result = lr_find(
        model,
        Stage("head", 1, ["head"], 0.1),
        loader,
        start_lr=1e-3,
        end_lr=100,
        num_steps=200,
        optimizer=opt,
        **FAST,
    )
    check_divergence_at(result, 2 * (1 + beta) / ((1 + 2 * beta) * lam_max))


# -------------------------------------------------------------------------- determinism, stopping, cycling
def test_two_runs_with_the_same_seed_give_identical_curves(model, tiny_data):
    images, labels = tiny_data
    dataset = torch.utils.data.TensorDataset(images[:64].float() / 255, labels[:64])
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)  # shuffled by the global RNG
    runs = []
    for outside_seed in (1, 2):  # whatever the RNG state before the call
        torch.manual_seed(outside_seed)
        r = lr_find(model, three_stage_schedule(), loader, which=1, num_steps=12, seed=3, **FAST)
        runs.append((r.multiplier, r.lrs, r.loss, r.smoothed, r.suggestion()))
    assert runs[0] == runs[1]
    other = lr_find(model, three_stage_schedule(), loader, which=1, num_steps=12, seed=4, **FAST)
    assert other.loss != runs[0][2]  # the seed does decide the batches' order


def test_nan_loss_stops_the_sweep_without_raising(model, tiny_loader):
    class NanAt:
        def __init__(self, loader, at):
            self.loader, self.at = loader, at

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for i, (x, y) in enumerate(self.loader):
                yield (torch.full_like(x, float("nan")) if i == self.at else x), y

    before = full_state(model)
    loader = TensorLoader(*random_images(256, seed=1), 32, train=True, device="cpu")
    result = lr_find(model, three_stage_schedule(), NanAt(loader, 5), which=1, num_steps=20, **FAST)
    assert result.diverged and len(result) == 6 and math.isnan(result.loss[-1])
    assert same_tensors(full_state(model), before)


def test_a_short_loader_is_cycled_with_a_note(model, tiny_loader, capsys):
    epochs = []
    original = tiny_loader.set_epoch
    tiny_loader.set_epoch = lambda e: (epochs.append(e), original(e))
    result = lr_find(
        model,
        three_stage_schedule(),
        tiny_loader,
        which=2,
        num_steps=10,
        device="cpu",
        amp=False,
        channels_last=False,
    )
    assert len(result) == 10
    assert epochs == [
        6,
        7,
        8,
        9,
        10,
    ]  # 2 batches per pass; stage 2 starts at epoch 6 of the (5, 15, 30) schedule
    assert any("cycled" in n for n in result.notes)
    assert "cycled" in capsys.readouterr().out


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "stage, kwargs, message",
    [
        (Stage("x", 1, ["layer9"], 1e-3), {}, "unknown layer group 'layer9'"),
        (Stage("x", 1, ["cbam"], 1e-3), {"placement": None}, "unknown layer group 'cbam'"),
        (Stage("x", 1, ["new"], 1e-3), {"start_lr": 1.0, "end_lr": 1.0}, "must be below end_lr"),
        (Stage("x", 1, ["new"], 1e-3), {"num_steps": 9}, "at least 10"),
        (Stage("x", 1, ["new"], 1e-3), {"start_lr": 0.0}, "start_lr must be a positive"),
        (Stage("x", 1, ["new"], 1e-3), {"end_lr": math.inf}, "end_lr must be a positive"),
        (three_stage_schedule(), {"which": 0}, "stage number 1..3"),
        (three_stage_schedule(), {"which": "4 nope"}, "no stage named"),
        (three_stage_schedule(), {}, "needs which="),
    ],
)
def test_bad_input_is_refused_before_anything_changes(
    resnet18_state_file, tiny_loader, stage, kwargs, message
):
    placement = kwargs.pop("placement", "stage")
    torch.manual_seed(0)
    model = resnet18_cbam(weights=resnet18_state_file, placement=placement)
    before, epoch = full_state(model), tiny_loader.epoch
    with pytest.raises(ValueError, match=message):
        lr_find(model, stage, tiny_loader, **{**FAST, **kwargs})
    assert same_tensors(full_state(model), before) and tiny_loader.epoch == epoch


# ------------------------------------------------------------------------------ the result
def _result(stage, shares, multipliers, losses):
    r = LRFinderResult(stage=stage, shares=shares)
    r.multiplier, r.loss, r.smoothed = list(multipliers), list(losses), list(losses)
    r.lrs = [{g: m * s for g, s in shares.items()} for m in multipliers]
    return r


def synthetic_curve(noise=0.0, seed=0):
    """A typical finder curve: flat, a long descent over 1e-4..1e-2, a minimum at ~3e-2, then up."""
    m = torch.logspace(-7, 1, 100, dtype=torch.float64)
    x = torch.log10(m)
    loss = 2.3 - 1.2 / (1 + torch.exp(-(x + 3) * 2.5)) + 0.8 * torch.clamp(x + 1.5, min=0) ** 2
    g = torch.Generator().manual_seed(seed)
    return m.tolist(), (loss + noise * torch.randn(100, generator=g, dtype=torch.float64)).tolist()


def test_suggestion_lies_in_the_descent_and_both_rules_are_available():
    m, loss = synthetic_curve()
    r = _result(Stage("s", 1, ["new"], 1e-3), {"head": 1.0}, m, loss)
    for rule in ("valley", "steepest"):
        assert 1e-4 < r.suggestion(rule) < 3e-2
    with pytest.raises(ValueError, match="unknown rule"):
        r.suggestion("median")


def test_suggested_stage_keeps_ratios_and_the_lr_type():
    m, loss = synthetic_curve()
    differential = Stage("2", 15, ["new", "layer3", "layer4"], {"new": 1e-3, "pretrained": 1e-4})
    r = _result(differential, {"layer3": 0.1, "layer4": 0.1, "head": 1.0}, m, loss)
    top = r.suggestion()
    s = r.suggested_stage()
    assert s.name == "2" and s.epochs == 15 and s.trainable == differential.trainable
    assert s.lr == {"new": pytest.approx(top), "pretrained": pytest.approx(top / 10)}
    assert r.suggested_lrs() == {
        "layer3": pytest.approx(top / 10),
        "layer4": pytest.approx(top / 10),
        "head": top,
    }
    single = _result(Stage("1", 5, ["new"], 1e-3), {"head": 1.0}, m, loss).suggested_stage()
    assert isinstance(single.lr, float) and single.lr == pytest.approx(top)


def test_plot_is_log_x_with_the_suggestion_marked():
    m, loss = synthetic_curve()
    r = _result(Stage("1", 5, ["new"], 1e-3), {"head": 1.0}, m, loss)
    fig = r.plot()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    marks = [line for line in ax.lines if list(line.get_xdata()) == [r.suggestion()] * len(line.get_xdata())]
    assert marks, "the suggestion is not marked"
