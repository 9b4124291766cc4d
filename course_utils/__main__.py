"""``python -m course_utils <command>``: the course's command line (:mod:`course_utils.machinery.cli`).

Standard library only until the environment exists (``python -S -E -m course_utils ...`` works).
"""

import sys

from .machinery.cli import main

if __name__ == "__main__":
    sys.exit(main())
