"""``python -m learner --config FILE``: the learner as its own process (see learner.process)."""

import sys

from learner.process import main

sys.exit(main())
