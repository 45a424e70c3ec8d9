"""Session setup shared by every test module."""
import os
import tempfile

# A compiled graph of rnnfuse's operators holds their workspace sizes, which a rebuild of
# the kernels may change while torch's on-disk compile cache keys do not see it: each test
# session compiles into a cache of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="rnnfuse-inductor-"))
