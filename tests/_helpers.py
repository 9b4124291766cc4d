"""Plain helper functions shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from course_utils import data as cdata


def random_images(n: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded random uint8 (3, size, size) images and labels covering all 10 classes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    return images, labels


def make_loaders(images, labels, batch_size: int = 32, n_train: int | None = None, seed: int = 0):
    """A training TensorLoader (augmented, shuffled, drop_last) and an eval one over the same images."""
    n_train = n_train or len(labels)
    train = cdata.TensorLoader(
        images[:n_train], labels[:n_train], batch_size, train=True, device="cpu", seed=seed
    )
    val = cdata.TensorLoader(images[:n_train], labels[:n_train], 64, train=False, device="cpu")
    return train, val


# ------------------------------------------------------------------------------ model state helpers
RESNET_GROUPS = ("stem", "layer1", "layer2", "layer3", "layer4", "cbam", "head")
VGG_GROUPS = ("block1", "block2", "block3", "block4", "block5", "cbam", "head")


def expected_group(name: str) -> str:
    """The layer group of a parameter/buffer name, worked out here independently of course_utils."""
    parts = name.split(".")
    if "cbam" in parts:
        return "cbam"
    if parts[0] in ("fc", "head"):
        return "head"
    assert parts[0] in RESNET_GROUPS + VGG_GROUPS, name
    return parts[0]


def group_state(model) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer group: a copy of every parameter and every buffer (BatchNorm running stats and counters)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        out.setdefault(expected_group(name), {})[name] = t.detach().clone()
    return out


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in any bit (empty list: all bit-identical)."""
    assert list(a) == list(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


# ------------------------------------------------------------------------------ the reference run
# test_train.py trains this once in-process; tests/_train_worker.py trains the same in a subprocess.
REFERENCE_EPOCHS = (1, 2, 1)  # 4 epochs: stage 1 | stage 2, stage 2 | stage 3


def reference_schedule():
    from course_utils.finetune import three_stage_schedule

    return three_stage_schedule(differential=True, epochs=REFERENCE_EPOCHS)


def reference_model(weights):
    from course_utils.models import resnet18_cbam

    torch.manual_seed(0)
    return resnet18_cbam(weights=weights, placement="stage", stem="imagenet")


def reference_loaders():
    """64 training images in 2 batches of 32 (augmented), 32 validation images in one batch."""
    images, labels = random_images(96, seed=0)
    train = cdata.TensorLoader(images[:64], labels[:64], 32, train=True, device="cpu", seed=0)
    val = cdata.TensorLoader(images[64:], labels[64:], 64, train=False, device="cpu")
    return train, val


class HookedLoader:
    """Wraps a loader: ``hook(epoch, i, batch)`` runs before batch ``i`` is handed out (i.e. after the step
    on batch ``i-1``) and may return a replacement batch; ``hook(epoch, "end", None)`` runs after the
    epoch's last step, before ``fit`` evaluates and checkpoints."""

    def __init__(self, loader, hook):
        self.loader, self.hook, self.epoch = loader, hook, None

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            batch = self.hook(self.epoch, i, batch) or batch
            yield batch
        self.hook(self.epoch, "end", None)
