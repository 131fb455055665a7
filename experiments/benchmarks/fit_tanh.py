"""Fit the rational tanh of cnnjax.ops.activations and measure its float32 error.

    python experiments/benchmarks/fit_tanh.py            # fit P/Q of degree 4/4
    python experiments/benchmarks/fit_tanh.py --p 5 --q 4

tanh(x) ~ x P(s) / Q(s) with s = x^2 on [0, 9], fitted for relative error:
linearised least squares ``x P - tanh(x) Q ~ 0`` weighted by ``1 / (tanh(x) Q_prev)``
(Sanathanan-Koerner iterations), with Lawson reweighting towards the minimax
solution, in a Chebyshev basis of ``2 s / 81 - 1`` (well conditioned) and
converted to powers of s at the end. Then every coefficient is rounded to
float32 and the formula is evaluated in float32, as the library does, on
3 million points from 1e-8 to 20, against float64 tanh: the printed error is in
units in the last place (ulps) of the correctly rounded result, beside
XLA's own ``jnp.tanh`` and the library's current coefficients.
"""

from __future__ import annotations

import argparse

import numpy as np
from numpy.polynomial import chebyshev, polynomial

CLAMP = 9.0


def fit(p_degree: int, q_degree: int, iterations: int = 80):
    x = np.concatenate([np.geomspace(1e-4, 0.3, 20_000), np.linspace(0.3, CLAMP, 200_000)])
    u = 2 * x * x / CLAMP**2 - 1
    t = np.tanh(x)
    vp, vq = chebyshev.chebvander(u, p_degree), chebyshev.chebvander(u, q_degree)
    q_prev, lawson = np.ones_like(x), np.ones_like(x)
    for it in range(iterations):
        # Unknowns: P's coefficients and Q's except the first (fixed at 1).
        a = np.concatenate([x[:, None] * vp, -t[:, None] * vq[:, 1:]], axis=1)
        weight = np.sqrt(lawson) / (t * q_prev)
        sol = np.linalg.lstsq(a * weight[:, None], t * vq[:, 0] * weight, rcond=None)[0]
        pc, qc = sol[: p_degree + 1], np.concatenate([[1.0], sol[p_degree + 1 :]])
        q_prev = chebyshev.chebval(u, qc)
        err = np.abs(x * chebyshev.chebval(u, pc) / q_prev - t) / t
        if it > 10:
            lawson = lawson * err
            lawson /= lawson.sum()

    def in_powers_of_s(cheb):
        # Substitute u = 2 s / CLAMP^2 - 1 into the power series in u.
        out, power = np.zeros(len(cheb)), np.array([1.0])
        for c in chebyshev.cheb2poly(cheb):
            out[: len(power)] += c * power
            power = polynomial.polymul(power, [-1.0, 2.0 / CLAMP**2])
        return out

    p, q = in_powers_of_s(pc), in_powers_of_s(qc)
    return p / q[0], q / q[0], err.max()


def rational_f32(p, q, x):
    y = np.clip(np.asarray(x, np.float32), -CLAMP, CLAMP)
    s = y * y

    def horner(c):
        out = np.float32(c[-1])
        for ci in c[-2::-1]:
            out = out * s + np.float32(ci)
        return out

    r = y * horner(p) / horner(q)
    return np.where(np.abs(r) > 1, np.sign(r), r).astype(np.float32)


def ulp_error(y, x):
    ref = np.tanh(np.asarray(x, np.float64))
    return np.abs(np.asarray(y, np.float64) - ref) / np.abs(np.spacing(ref.astype(np.float32)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=int, default=4, help="degree of P in x^2")
    ap.add_argument("--q", type=int, default=4, help="degree of Q in x^2")
    args = ap.parse_args()
    p, q, rel = fit(args.p, args.q)
    print(f"fit P{args.p}/Q{args.q}: relative error {rel:.3g} in float64")
    print("P =", tuple(float(c) for c in p))
    print("Q =", tuple(float(c) for c in q))
    x = np.geomspace(1e-8, 20, 3_000_000, dtype=np.float32)
    rows = [("this fit", rational_f32(p, q, x))]
    try:
        import jax
        import jax.numpy as jnp

        from cnnjax.ops import activations

        rows.append(("cnnjax.ops.tanh (rational)",
                     np.asarray(jax.jit(lambda v: activations.tanh(v, "rational"))(x))))
        rows.append(("jnp.tanh (XLA)", np.asarray(jax.jit(jnp.tanh)(x))))
    except ImportError:
        pass
    for name, y in rows:
        e = ulp_error(y, x)
        print(f"{name:28s} float32 error: max {e.max():.2f} ulp, mean {e.mean():.3f} ulp")


if __name__ == "__main__":
    main()
