"""Central finite differences, for the gradient tests (float64)."""
EPS = 1e-6


def central_difference(loss, a, idx, eps=EPS):
    """d loss() / d a[idx]: loss() reads a, whose entry is put back afterwards."""
    old = a[idx]
    a[idx] = old + eps
    up = loss()
    a[idx] = old - eps
    down = loss()
    a[idx] = old
    return (up - down) / (2 * eps)


def assert_gradient(grad, loss, a, idx, what=None, rtol=1e-7):
    """grad, the analytic d loss() / d a[idx], within rtol of the central difference."""
    fd = central_difference(loss, a, idx)
    assert abs(grad - fd) <= rtol * max(1.0, abs(fd)), (what, idx, grad, fd)
