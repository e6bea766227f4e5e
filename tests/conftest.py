import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the session (this process and the CLI
# subprocesses): experiments of the same shapes compile once, not per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="fedreid_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(__file__))
