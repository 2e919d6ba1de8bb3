#!/usr/bin/env python3
"""Cross-check specs/vectors/dp/calibration.json against independent computations.

1. Sensitivities: recomputed from the formulas of specs/dp.md §2 with exact rationals
   (fractions.Fraction of the f64 inputs) and compared with the vector (which must be >=
   the exact value and within 1e-12 relative).
2. Costs: opendp's *Python* package (PyPI `opendp`, same privacy maps, separate build):
   make_gaussian / make_laplace maps on the same vector domain, zCDP -> approx-DP ->
   fix_delta for (epsilon, delta).
3. Costs again without opendp: rho = (Delta/sigma)^2/2 in exact rationals; epsilon(delta)
   from the CKS20 zCDP conversion delta = inf_a exp((a-1)(a rho - eps) + a ln(1-1/a))/(a-1),
   solved with mpmath at 50 digits.
4. Minimality: the calibrated scale minus one grid step (1/scale_den) must miss the target
   (checked with opendp), i.e. the scale is not over-noised by more than one grid step.

Usage: python3 scripts/dp-crosscheck-vectors.py [specs/vectors/dp/calibration.json]
(needs `pip install opendp mpmath`). Output is committed as
specs/vectors/dp/crosscheck-output.txt.
"""
import json
import math
import sys
from fractions import Fraction as F

import mpmath as mp
import opendp.prelude as dp

dp.enable_features("contrib")
mp.mp.dps = 50


def radius(clip, C, s, n):
    """Exact-rational versions of specs/dp.md section 2 (no float rounding)."""
    C, s = F(C), F(s)
    sc = s * C
    if clip == "l2":
        sqrt_n = mp.sqrt(n)
        r2 = mp.mpf(sc.numerator) / sc.denominator + min(sqrt_n, 2 * mp.mpf(sc.numerator) / sc.denominator) / 2
        r1 = r2 * sqrt_n
    elif clip == "linf":
        m = math.floor(sc + F(1, 2))
        r2 = m * mp.sqrt(n)
        r1 = mp.mpf(m * n)
    elif clip == "l1":
        cap = math.floor(sc + min(F(n), 2 * sc) / 2)
        r2 = mp.mpf(cap)
        r1 = mp.mpf(cap)
    else:
        raise ValueError(clip)
    return 2 * r2, 2 * r1


def cdp_eps(rho, delta):
    """Smallest eps with delta(eps) <= delta under the CKS20 conversion (mpmath)."""
    rho, delta = mp.mpf(rho), mp.mpf(delta)

    def delta_of(eps):
        f = lambda a: mp.exp((a - 1) * (a * rho - eps) + a * mp.log(1 - 1 / a)) / (a - 1)
        # minimise over a in (1, inf): golden-section on log(a-1)
        lo, hi = mp.mpf(-20), mp.log((eps + 1) / (2 * rho) + 2)
        g = lambda u: f(1 + mp.exp(u))
        for _ in range(200):
            m1 = lo + (hi - lo) * (3 - mp.sqrt(5)) / 2
            m2 = lo + (hi - lo) * (mp.sqrt(5) - 1) / 2
            if g(m1) < g(m2):
                hi = m2
            else:
                lo = m1
        return min(g((lo + hi) / 2), mp.mpf(1))

    lo, hi = mp.mpf(0), rho + 2 * mp.sqrt(rho * mp.log(1 / delta)) + 1
    for _ in range(200):
        mid = (lo + hi) / 2
        if delta_of(mid) <= delta:
            hi = mid
        else:
            lo = mid
    return float(hi)


def opendp_costs(mech, n, scale, l2, l1, delta):
    dom = dp.vector_domain(dp.atom_domain(T=dp.i64), size=n)
    if mech == "discrete_gaussian":
        m = dp.m.make_gaussian(dom, dp.l2_distance(T=float), scale=scale)
        rho = m.map(l2)
        fixed = dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(m), delta)
        eps = fixed.map(l2)[0]
        return rho, eps
    m = dp.m.make_laplace(dom, dp.l1_distance(T=float), scale=scale)
    eps = m.map(l1)
    return None, eps


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "specs/vectors/dp/calibration.json"
    doc = json.load(open(path))
    fails = 0
    print(f"opendp (python) {dp.__version__ if hasattr(dp, '__version__') else ''}, mpmath {mp.__version__}")
    for v in doc["mechanisms"]:
        i, o = v["input"], v["output"]
        name = v["name"]
        ok = True
        l2x, l1x = radius(i["clip"], i["C"], i["s"], i["n"])
        for key, exact in (("l2_sensitivity", l2x), ("l1_sensitivity", l1x)):
            got = mp.mpf(o[key])
            if not (got >= exact and got <= exact * (1 + mp.mpf("1e-12"))):
                print(f"  {name}: {key} {o[key]} vs exact {exact}")
                ok = False
        scale = o["scale_num"] / o["scale_den"]
        if scale != o["scale"]:
            ok = False
            print(f"  {name}: scale rational {o['scale_num']}/{o['scale_den']} != {o['scale']}")
        delta = o["delta"]
        rho_o, eps_o = opendp_costs(i["mechanism"], i["n"], o["scale"], o["l2_sensitivity"], o["l1_sensitivity"], delta)
        t = i["target"]
        if i["mechanism"] == "discrete_gaussian":
            rho_exact = (F(o["l2_sensitivity"]) / F(o["scale"])) ** 2 / 2
            eps_mp = cdp_eps(float(rho_exact), delta)
            checks = [
                ("rho == opendp-python", o["rho"] == rho_o),
                ("rho >= exact rational", F(o["rho"]) >= rho_exact and o["rho"] <= float(rho_exact) * (1 + 1e-12)),
                ("eps == opendp-python", abs(o["epsilon_at_delta"] - eps_o) <= 1e-9 * eps_o),
                ("eps ~ mpmath CKS20", abs(o["epsilon_at_delta"] - eps_mp) <= 1e-6 * eps_mp),
            ]
            if "rho" in t:
                checks.append(("meets rho target", o["rho"] <= t["rho"]))
                lower = (o["scale_num"] - 1) / o["scale_den"]
                r_lower, _ = opendp_costs(i["mechanism"], i["n"], lower, o["l2_sensitivity"], 0, delta)
                checks.append(("one grid step less misses", r_lower > t["rho"]))
            else:
                checks.append(("meets (eps,delta) target", o["epsilon_at_delta"] <= t["epsilon"] and delta == t["delta"]))
                lower = (o["scale_num"] - 1) / o["scale_den"]
                _, e_lower = opendp_costs(i["mechanism"], i["n"], lower, o["l2_sensitivity"], 0, delta)
                checks.append(("one grid step less misses", e_lower > t["epsilon"]))
            line = f"rho={o['rho']:.9g} eps@{delta:g}={o['epsilon_at_delta']:.9g} (opendp-py {eps_o:.9g}, mpmath {eps_mp:.9g})"
        else:
            eps_exact = F(o["l1_sensitivity"]) / F(o["scale"])
            lower = (o["scale_num"] - 1) / o["scale_den"]
            _, e_lower = opendp_costs(i["mechanism"], i["n"], lower, 0, o["l1_sensitivity"], delta)
            checks = [
                ("eps == opendp-python", o["epsilon_at_delta"] == eps_o),
                ("eps >= exact rational", F(o["epsilon_at_delta"]) >= eps_exact),
                ("meets eps target", o["epsilon_at_delta"] <= t["epsilon"]),
                ("one grid step less misses", e_lower > t["epsilon"]),
                ("rho == eps^2/2 (rounded up)", o["rho"] >= eps_o ** 2 / 2),
            ]
            line = f"eps={o['epsilon_at_delta']:.9g} (opendp-py {eps_o:.9g}, exact {float(eps_exact):.9g})"
        for label, good in checks:
            if not good:
                print(f"  {name}: FAILED {label}")
                ok = False
        print(f"{'PASS' if ok else 'FAIL'} {name}: l2={o['l2_sensitivity']:.6f} l1={o['l1_sensitivity']:.3f} scale={o['scale']} {line}")
        fails += not ok
    for c in doc["conversions"]:
        if "rho" in c:
            eps_py = dp.c.make_fix_delta(
                dp.c.make_zCDP_to_approxDP(
                    dp.m.make_gaussian(dp.atom_domain(T=dp.i64), dp.absolute_distance(T=float), scale=1.0)
                ),
                c["delta"],
            )
            # map with d_in chosen so that rho_gauss = d_in^2/2 = c["rho"]
            d_in = math.sqrt(2 * c["rho"])
            e_py = eps_py.map(d_in)[0]
            e_mp = cdp_eps(c["rho"], c["delta"])
            ok = abs(c["epsilon"] - e_mp) <= 1e-6 * e_mp and abs(c["epsilon"] - e_py) <= 1e-6 * e_py
            print(f"{'PASS' if ok else 'FAIL'} rho={c['rho']} delta={c['delta']}: eps={c['epsilon']:.9g} (opendp-py {e_py:.9g}, mpmath {e_mp:.9g})")
        else:
            e_back = cdp_eps(c["max_rho"], c["delta"])
            ok = e_back <= c["epsilon"] * (1 + 1e-9) and cdp_eps(c["max_rho"] * (1 + 1e-6), c["delta"]) > c["epsilon"]
            print(f"{'PASS' if ok else 'FAIL'} eps={c['epsilon']} delta={c['delta']}: max_rho={c['max_rho']:.9g} (mpmath eps(max_rho)={e_back:.9g})")
        fails += not ok
    print(f"{'ALL PASS' if fails == 0 else f'{fails} FAILED'}")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
