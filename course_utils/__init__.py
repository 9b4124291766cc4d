"""Helpers for the course "Fine-tuning a pretrained CNN with CBAM attention".

The modules here teach, one idea each, in the order data flows (``course_utils/README.md`` gives the
reading order): ``data`` → ``cbam`` / ``models`` → ``finetune`` (the schedule and the optimizer) →
``batchnorm`` → ``train`` (``fit``) → ``lr_finder`` → ``plots``; ``experiments`` runs the strategy
comparison, ``homework`` checks the homework's model and ``widgets`` is the instructor's panel. What runs
the course but is never taught — the command line, ``doctor``, ``bench``, the book, precision, devices,
downloads, checkpoints, checks — lives in ``course_utils.machinery``. Nothing is imported here, so
``python -m course_utils`` starts with a bare Python.
"""

__version__ = "0.1.0"
