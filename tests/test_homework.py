"""The homework checker (course_utils.homework, notebook 05 exercise 8): the course's VGG16 + CBAM and a
hand-written copy of it pass every check; each kind of mistake fails the check that should catch it, with
a message naming the problem."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import vgg as tvgg

from course_utils import homework
from course_utils.cbam import CBAM
from course_utils.models import VGG16_BLOCKS, VGG16_WIDTHS, VGGCBAM, vgg16_cbam

CHECKS = ("output", "parameters", "positions", "weights", "schedule")


@pytest.fixture(scope="module")
def course() -> VGGCBAM:
    torch.manual_seed(0)
    return vgg16_cbam(num_classes=10, weights=None, placement="stage")


class Student(nn.Module):
    """A student's VGG16 + CBAM written by hand, as in notebook 05's answer; ``variant`` puts a mistake in."""

    stages = ("block1", "block2", "block3", "block4", "block5")

    def __init__(self, variant: str = "right", head_name: str = "head"):
        super().__init__()
        features = tvgg.make_layers(tvgg.cfgs["D"])  # torchvision's VGG16 features, without its classifier
        for i, (start, stop) in enumerate(VGG16_BLOCKS, start=1):
            setattr(self, f"block{i}", nn.Sequential(*features[start:stop]))
        self.cbam = nn.ModuleDict({f"block{i}": CBAM(w) for i, w in enumerate(VGG16_WIDTHS, start=1)})
        self.maxpool, self.pool = nn.MaxPool2d(2, 2), nn.AdaptiveAvgPool2d(1)
        setattr(self, head_name, nn.Sequential(nn.Dropout(0.5), nn.Linear(512, 10)))
        self.variant, self.head_name = variant, head_name

    def run_block(self, name: str, x: torch.Tensor) -> torch.Tensor:
        block, cbam = getattr(self, name), self.cbam[name]
        if self.variant == "after_pool":
            return cbam(self.maxpool(block(x)))
        if self.variant == "before_relu":  # the block's last ReLU moved after the CBAM
            return self.maxpool(block[-1](cbam(block[:-1](x))))
        if self.variant == "mid_block" and name == "block1":  # after the first conv+ReLU of two
            return self.maxpool(block[2:](cbam(block[:2](x))))
        return self.maxpool(cbam(block(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stages:
            x = self.run_block(name, x)
        return getattr(self, self.head_name)(torch.flatten(self.pool(x), 1))


def results(model, reference=None) -> dict[str, dict]:
    rows = homework.check_vgg16_cbam(model, reference)
    assert len(rows) == len(CHECKS)
    return dict(zip(CHECKS, rows))


def only_problems(found: dict[str, dict]) -> set[str]:
    return {check for check, r in found.items() if r["status"] == "problem"}


# ------------------------------------------------------------------------------ what passes
def test_the_course_model_passes_every_check(course):
    found = results(copy.deepcopy(course), reference=course)
    assert all(r["status"] == "ok" for r in found.values()), found
    assert "64, 128, 256, 512, 512" in found["positions"]["message"]
    assert "14,796,606" in found["parameters"]["message"]
    assert "2 +high: block4, block5, cbam, head" in found["schedule"]["message"]
    assert results(course)["weights"]["status"] == "skipped"  # no reference: nothing to compare


def test_a_hand_written_class_passes_once_the_weights_are_copied(course):
    student = Student()
    assert only_problems(results(student, reference=course)) == {"weights"}  # still random: caught
    student.load_state_dict(course.state_dict())  # the course's names, so a strict load works
    assert not only_problems(results(student, reference=course))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(student.eval()(x), course.eval()(x))


def test_checking_draws_no_random_numbers_and_keeps_the_mode(course):
    model = copy.deepcopy(course).train()
    state = torch.random.get_rng_state()
    homework.check_vgg16_cbam(model, course)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training


# ------------------------------------------------------------------------------ what fails, and says why
def test_a_missing_cbam_is_named(course):
    model = copy.deepcopy(course)
    del model.cbam["block3"]
    found = results(model, reference=course)
    assert only_problems(found) == {"parameters", "positions"}
    assert "block3" in found["positions"]["message"] and "CBAM(256)" in found["positions"]["message"]
    assert "68,496" in found["parameters"]["message"] and "76,788" in found["parameters"]["message"]


@pytest.mark.parametrize(("classes", "said"), [(100, "out_features 应为 10"), (1000, "1000 类")])
def test_wrong_output_classes(course, classes, said):
    model = copy.deepcopy(course)
    model.head[1] = nn.Linear(512, classes)
    found = results(model, reference=course)
    assert only_problems(found) == {"output", "parameters"}
    assert f"(2, {classes})" in found["output"]["message"] and said in found["output"]["message"]


@pytest.mark.parametrize(
    ("variant", "said"),
    [
        ("after_pool", "block1 的最大池化之后 (after the max-pool)，看到的是 16×16"),
        ("before_relu", "ReLU 之前 (before the ReLU)"),
        ("mid_block", "在 block1 的中间（它前面只跑了 1 个卷积）"),
    ],
)
def test_a_cbam_in_the_wrong_place_is_found(course, variant, said):
    student = Student(variant)
    student.load_state_dict(course.state_dict())
    found = results(student, reference=course)
    assert only_problems(found) == {"positions"}, found
    assert said in found["positions"]["message"]


def test_conv_weights_not_copied(course):
    model = copy.deepcopy(course)
    with torch.no_grad():
        model.block4[2].weight.add_(1e-3)  # block4's second conv: the 9th of 13
    found = results(model, reference=course)
    assert only_problems(found) == {"weights"}
    assert "block4 第 9 个卷积" in found["weights"]["message"]
    assert "全部 13 个卷积层" in results(Student(), reference=course)["weights"]["message"]


def test_names_outside_the_course_groups_break_the_schedule(course):
    found = results(Student(head_name="classifier"))
    assert only_problems(found) == {"schedule"}
    assert (
        "group_of" in found["schedule"]["message"] and "classifier.1.weight" in found["schedule"]["message"]
    )


def test_a_cbam_hidden_in_a_block_would_stay_frozen(course):
    model = copy.deepcopy(course)
    model.block5.append(model.cbam.pop("block5"))  # same place, but named block5.6: group block5
    found = results(model, reference=course)
    assert only_problems(found) == {"schedule"}
    assert "冻结 (frozen)：block5.6." in found["schedule"]["message"]


def test_report_says_not_done_then_all_passed(course, capsys):
    assert homework.report(None) is None
    assert "还没有写完" in capsys.readouterr().out
    rows = homework.report(copy.deepcopy(course), reference=course)
    printed = capsys.readouterr().out
    assert len(rows) == 5 and printed.count("[ok]") == 5 and "全部通过" in printed
