"""rnnfuse.losses: values against direct formulas, gradients by float64 central finite
differences, masking by lengths, stability, dtypes, bad input, and parity with torch."""
import numpy as np
import pytest

from rnnfuse.losses import cross_entropy, mse_loss


def _fd_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar f at x (float64)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f(x)
        x[i] = old - eps
        down = f(x)
        x[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


def _ce_direct(logits, targets, mask):
    """Mean over real tokens of -log softmax, the slow obvious way."""
    total, n = 0.0, 0
    for idx in np.ndindex(targets.shape):
        if mask is None or mask[idx]:
            z = logits[idx].astype(np.float64)
            total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[targets[idx]]
            n += 1
    return total / n


# ---------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("lengths", [None, [3, 0, 1, 2]])
def test_cross_entropy_sequence_value_and_finite_differences(lengths):
    rng = np.random.default_rng(0)
    T, B, V = 3, 4, 5
    logits = rng.normal(scale=2.0, size=(T, B, V))
    targets = rng.integers(0, V, size=(T, B))
    mask = None if lengths is None else np.arange(T)[:, None] < np.array(lengths)
    if mask is not None:
        targets[~mask] = -100  # ignored at padding
    loss, grad = cross_entropy(logits, targets, lengths)
    assert loss.dtype == np.float64 and grad.shape == logits.shape and grad.dtype == np.float64
    np.testing.assert_allclose(loss, _ce_direct(logits, targets, mask), rtol=1e-12)
    fd = _fd_grad(lambda z: cross_entropy(z, targets, lengths)[0], logits.copy())
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    if mask is not None:
        assert np.all(grad[~mask] == 0)


def test_cross_entropy_classification_and_sum_reduction():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4))
    targets = rng.integers(0, 4, size=6)
    loss, grad = cross_entropy(logits, targets)
    np.testing.assert_allclose(loss, _ce_direct(logits, targets, None), rtol=1e-12)
    fd = _fd_grad(lambda z: cross_entropy(z, targets)[0], logits.copy())
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    loss_sum, grad_sum = cross_entropy(logits, targets, reduction="sum")
    np.testing.assert_allclose(loss_sum, 6 * loss, rtol=1e-12)
    np.testing.assert_allclose(grad_sum, 6 * grad, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_is_stable_for_huge_logits(dtype):
    logits = np.array([[1e4, 0.0, -1e4], [-3e4, 3e4, 3e4]], dtype=dtype)
    loss, grad = cross_entropy(logits, np.array([0, 1]))
    assert loss.dtype == dtype and grad.dtype == dtype
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, np.log(2) / 2, rtol=1e-6)
    np.testing.assert_allclose(grad, [[0, 0, 0], [0, -0.25, 0.25]], atol=1e-7)


def test_cross_entropy_float32_matches_float64():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 3, 7))
    targets = rng.integers(0, 7, size=(5, 3))
    l64, g64 = cross_entropy(logits, targets, [5, 2, 4])
    l32, g32 = cross_entropy(logits.astype(np.float32), targets, [5, 2, 4])
    assert l32.dtype == np.float32 and g32.dtype == np.float32
    np.testing.assert_allclose(l32, l64, rtol=1e-5)
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-7)


def test_cross_entropy_padding_garbage_is_ignored_and_inputs_untouched():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 2, 4))
    targets = rng.integers(0, 4, size=(3, 2))
    clean = cross_entropy(logits, targets, [2, 3])
    dirty = logits.copy()
    dirty[2, 0] = [np.nan, np.inf, -np.inf, 1e300]
    t = targets.copy()
    t[2, 0] = 99
    before = (dirty.copy(), t.copy())
    loss, grad = cross_entropy(dirty, t, np.array([2, 3]))
    assert loss == clean[0] and np.array_equal(grad, clean[1])
    np.testing.assert_array_equal(dirty, before[0])
    np.testing.assert_array_equal(t, before[1])


def test_cross_entropy_no_real_tokens_is_zero():
    loss, grad = cross_entropy(np.ones((3, 2, 4)), np.zeros((3, 2), int), [0, 0])
    assert loss == 0 and not grad.any()


def test_cross_entropy_nan_propagates():
    loss, grad = cross_entropy(np.array([[np.nan, 0.0]]), np.array([0]))
    assert np.isnan(loss) and np.isnan(grad).all()


@pytest.mark.parametrize("args, kwargs, err, msg", [
    ((np.zeros((2, 3)), np.array([0, 3])), {}, ValueError, r"targets must be class ids in \[0, 3\), got 3"),
    ((np.zeros((2, 3)), np.array([-1, 0])), {}, ValueError, r"class ids in \[0, 3\), got -1"),
    ((np.zeros((2, 2, 3)), np.array([[0, 0], [0, 5]])), {"lengths": [2, 2]}, ValueError, "got 5"),
    ((np.zeros((2, 3)), np.array([0.0, 1.0])), {}, TypeError, "targets must be an integer array, got dtype float64"),
    ((np.zeros((2, 3)), np.array([0, 1, 2])), {}, ValueError, r"targets must have shape \(2,\) \(B,\) for logits \(B, C\), got \(3,\)"),
    ((np.zeros((2, 2, 3)), np.zeros((2, 3), int)), {}, ValueError, r"targets must have shape \(2, 2\)"),
    ((np.zeros((2, 3), np.int64), np.array([0, 1])), {}, TypeError, "logits must have dtype float32 or float64, got int64"),
    ((np.zeros(3), np.array(0)), {}, ValueError, "logits must have shape \\(T, B, V\\) or \\(B, C\\), got 1 dimension"),
    ((np.zeros((2, 3)), np.array([0, 1])), {"lengths": [1, 1]}, ValueError, "lengths applies only to \\(T, B, V\\)"),
    ((np.zeros((2, 2, 3)), np.zeros((2, 2), int)), {"lengths": [1, 3]}, ValueError, r"lengths must lie in \[0, T=2\], got 3"),
    ((np.zeros((2, 2, 3)), np.zeros((2, 2), int)), {"lengths": [1]}, ValueError, r"lengths must have shape \(2,\)"),
    ((np.zeros((2, 2, 3)), np.zeros((2, 2), int)), {"lengths": [1.0, 2.0]}, TypeError, "lengths must be an integer array"),
    ((np.zeros((2, 3)), np.array([0, 1])), {"reduction": "avg"}, ValueError, "reduction must be 'mean' or 'sum', got 'avg'"),
    ((None, np.array([0, 1])), {}, TypeError, "logits must be a float32 or float64 array, got NoneType"),
    ((np.zeros((2, 0)), np.array([0, 1])), {}, ValueError, "at least one class"),
])
def test_cross_entropy_bad_input(args, kwargs, err, msg):
    with pytest.raises(err, match=msg):
        cross_entropy(*args, **kwargs)


def test_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(4, 3, 6))
    targets = rng.integers(0, 6, size=(4, 3))
    lengths = np.array([4, 1, 3])
    mask = np.arange(4)[:, None] < lengths
    loss, grad = cross_entropy(logits, targets, lengths)
    z = torch.tensor(logits, requires_grad=True)
    t = torch.tensor(np.where(mask, targets, -100))
    ref = torch.nn.functional.cross_entropy(z.reshape(-1, 6), t.reshape(-1), ignore_index=-100)
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------- mean squared error

@pytest.mark.parametrize("lengths", [None, [2, 0, 3]])
def test_mse_value_and_finite_differences(lengths):
    rng = np.random.default_rng(5)
    pred = rng.normal(size=(3, 3, 2))
    target = rng.normal(size=(3, 3, 2))
    loss, grad = mse_loss(pred, target, lengths)
    if lengths is None:
        want = np.mean((pred - target) ** 2)
    else:
        mask = np.arange(3)[:, None] < np.array(lengths)
        want = np.sum(((pred - target) ** 2)[mask]) / (mask.sum() * 2)
        assert np.all(grad[~mask] == 0)
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    fd = _fd_grad(lambda p: mse_loss(p, target, lengths)[0], pred.copy())
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


def test_mse_dtypes_sum_and_empty():
    pred = np.array([[1.0, 2.0]], np.float32)
    loss, grad = mse_loss(pred, np.array([[0, 0]]), reduction="sum")  # int target is converted
    assert loss == 5 and loss.dtype == np.float32 and grad.dtype == np.float32
    np.testing.assert_array_equal(grad, [[2, 4]])
    loss, grad = mse_loss(np.ones((2, 2, 1)), np.zeros((2, 2, 1)), lengths=[0, 0])
    assert loss == 0 and not grad.any()


def test_mse_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    pred, target = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    loss, grad = mse_loss(pred, target)
    p = torch.tensor(pred, requires_grad=True)
    ref = torch.nn.functional.mse_loss(p, torch.tensor(target))
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, p.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("args, kwargs, err, msg", [
    ((np.zeros((2, 3)), np.zeros((3, 2))), {}, ValueError, r"target must have pred's shape \(2, 3\), got \(3, 2\)"),
    ((np.zeros(3, int), np.zeros(3)), {}, TypeError, "pred must have dtype float32 or float64, got int64"),
    ((np.zeros(3), np.array(["a", "b", "c"])), {}, TypeError, "target must be a real numeric array"),
    ((np.zeros(3), np.zeros(3)), {"lengths": [1, 2, 3]}, ValueError, r"with lengths, pred must have shape \(T, B, ...\)"),
    ((np.zeros((2, 2)), np.zeros((2, 2))), {"lengths": [1, -1]}, ValueError, r"lengths must lie in \[0, T=2\], got -1"),
    ((np.zeros(3), None), {}, TypeError, "target must be an array, got NoneType"),
])
def test_mse_bad_input(args, kwargs, err, msg):
    with pytest.raises(err, match=msg):
        mse_loss(*args, **kwargs)
