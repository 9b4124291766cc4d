"""What runs the course but is never taught: the command line and its standard-library bootstrap, ``doctor``,
``bench``, ``book``, run sizes (``presets``), devices, the precision choice, downloads and weights files,
checkpoints, and the checks of arguments and batches. See ``course_utils/README.md`` for the map.

Nothing is imported here, so ``python -m course_utils`` starts with a bare Python.
"""
