"""An independent float64 implementation of UltraEdit's update (the test oracle).

Written from the method's formulas (docs/concepts.md), sharing no code with ultraedit_kernels.
"""
import torch

EPS32 = torch.finfo(torch.float32).eps


def realistic_features(n, d_in, d_out, seed=0, dtype=torch.float32):
    """Keys with hidden-state-like norms (||k||² ~ 1e3, a shared offset) and ~1e-3 gradients."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(d_in, generator=g) * 0.5
    keys = (torch.randn(n, d_in, generator=g) * (1000.0 / d_in) ** 0.5 + offset * 0.3)
    grads = torch.randn(n, d_out, generator=g) * 1e-3
    return keys.to(dtype), grads.to(dtype)


def stats_two_pass(blocks):
    z = torch.cat([b.double() for b in blocks])
    return z.shape[0], z.mean(0), ((z - z.mean(0)) ** 2).sum(0)


def stats_official(blocks):
    """The reference code's normalizer: M2 += B*var_unbiased + n*B*delta²/n'; std with n-1+eps."""
    n, mean, m2 = 0.0, None, None
    for b in blocks:
        x = b.double()
        B = x.shape[0]
        if mean is None:
            mean, m2 = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64)
        n_new = n + B
        delta = x.mean(0) - mean
        mean = mean + B * delta / n_new
        m2 = m2 + B * x.var(0) + n * B * delta ** 2 / n_new
        n = n_new
    std = (m2 / (n - 1 + EPS32)).sqrt()
    return n, mean, m2, std


def pseudo_values_fp64(keys, grads, mean, std, lr):
    d_in = keys.shape[1]
    z = torch.cat([keys.double(), grads.double()], 1)
    z_hat = (z - mean.double()) / (std.double() + EPS32)
    k_hat, g_hat = z_hat[:, :d_in], z_hat[:, d_in:]
    return -lr * (k_hat ** 2).sum(1, keepdim=True) * g_hat


def param_shift_fp64(keys, grads, mean, std, lr, ridge):
    K = keys.double()
    V = pseudo_values_fp64(keys, grads, mean, std, lr)
    eye = torch.eye(K.shape[1], dtype=torch.float64)
    return torch.linalg.solve(K.T @ K + ridge * eye, K.T @ V)


def gram_references(x, ridge, rows):
    """``(float64 X Xᵀ + λI, the plain product in the op's compute dtype)`` of ``x`` (``X = x`` or
    ``xᵀ``), the oracle and the baseline of the ``gram`` tests."""
    x64 = x.double()
    ref = x64 @ x64.T if rows else x64.T @ x64
    ref.diagonal().add_(ridge)
    xc = x.double() if x.dtype == torch.float64 else x.float()
    plain = xc @ xc.T if rows else xc.T @ xc
    plain.diagonal().add_(ridge)
    return ref, plain
