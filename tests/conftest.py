"""Test-wide settings: embedded Redis servers keep their data in a temporary directory."""

import os
import tempfile

os.environ.setdefault("L2O_REDIS_DIR", tempfile.mkdtemp(prefix="l2o-redis-test-"))
