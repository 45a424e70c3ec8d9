"""Test helper: the same values in other memory layouts and containers, for the fuzz tests
(test_reliability.py, test_fuzz_training.py)."""
import numpy as np


def relayout(a, layout):
    """The same values in another memory layout (or container)."""
    if a is None or a.ndim == 0 or layout == "C":
        return a
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "strided":
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    if layout == "negative":
        rev = np.ascontiguousarray(a[..., ::-1])
        return rev[..., ::-1]
    if layout == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    if layout == "unaligned":  # C-contiguous, but not aligned to the itemsize
        raw = np.zeros(a.nbytes + 1, np.uint8)
        b = raw[1:].view(a.dtype).reshape(a.shape)
        b[...] = a
        assert a.size == 0 or not b.flags.aligned
        return b
    if layout == "list":  # Python floats are float64: only valid for float64 calls
        return a.tolist() if a.dtype == np.float64 and a.size else a
    if layout == "broadcast":  # zero strides where an axis has one value
        if a.shape[0] > 1:
            return np.broadcast_to(a[:1], a.shape)
        return a
    raise AssertionError(layout)
