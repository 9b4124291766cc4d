"""Helpers for the course "Fine-tuning a pretrained CNN with CBAM attention".

One module per idea the notebooks teach, data flowing in this order:
``data`` → ``cbam`` / ``models`` → ``finetune`` (the schedule) → ``train`` (``fit``) → ``plots``;
``lr_finder`` sweeps one stage's learning rate with ``train``'s own step; ``presets`` sizes the runs, ``experiments`` caches the strategy comparison's runs on disk, ``widgets`` is the
instructor's schedule designer, ``bench`` the benchmark (``python -m course_utils bench``);
``devices`` picks CUDA, MPS or the CPU. ``python -m course_utils course|test|lab|bench|doctor|book``:
``bootstrap`` sets up ``.venv`` with the standard library only, ``doctor`` checks the machine.
Nothing is imported here, so ``python -m course_utils`` starts with a bare Python.
"""

__version__ = "0.1.0"
