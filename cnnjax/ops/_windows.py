"""The strided window slices shared by the convolution and pooling kernels."""

from __future__ import annotations

from jax import lax


def offset_windows(xp, out_hw, f_hw, stride, dilation):
    """The strided slice of ``xp`` that each filter offset ``(a, b)`` sees, row-major in (a, b)."""
    (ho, wo), (fh, fw) = out_hw, f_hw
    windows = []
    for a in range(fh):
        for b in range(fw):
            r0, c0 = a * dilation[0], b * dilation[1]
            windows.append(
                lax.slice(
                    xp,
                    (0, r0, c0, 0),
                    (
                        xp.shape[0],
                        r0 + (ho - 1) * stride[0] + 1,
                        c0 + (wo - 1) * stride[1] + 1,
                        xp.shape[3],
                    ),
                    (1, stride[0], stride[1], 1),
                )
            )
    return windows
