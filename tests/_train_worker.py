"""Trains the reference run (see _helpers.py) with a checkpoint, in its own process, for test_train.py.

    python tests/_train_worker.py WEIGHTS CHECKPOINT MARKER STALL_EPOCH

When epoch STALL_EPOCH has done its first step, writes MARKER and sleeps, so the test can SIGKILL the
process mid-epoch at a known point.
"""

import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(
    int(os.environ.get("COURSE_TEST_THREADS", "1"))
)  # as conftest.py: same numbers bit for bit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _helpers import HookedLoader, reference_loaders, reference_model, reference_schedule  # noqa: E402

from course_utils.train import fit  # noqa: E402


def main(weights, checkpoint, marker, stall_epoch):
    def hook(epoch, i, batch):
        if epoch == stall_epoch and i == 1:
            Path(marker).write_text(f"epoch {epoch}: first step done\n")
            time.sleep(600)

    train, val = reference_loaders()
    model = reference_model(weights)
    fit(
        model,
        reference_schedule(),
        HookedLoader(train, hook),
        val,
        checkpoint=checkpoint,
        progress=False,
        device="cpu",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
