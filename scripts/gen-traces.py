#!/usr/bin/env python3
"""Generates the link traces of `tandem bench traces` (data/traces/*.csv; specs/planner.md §6).

Each trace is 180 one-second samples `time_s,bandwidth_kbit,rtt_ms` drawn from a log-normal
AR(1) process (log x_t = log m + φ (log x_{t-1} - log m) + σ √(1-φ²) ε_t), whose median m and
spread σ follow the published statistics cited in specs/planner.md §6. Fixed seed: the committed
files are reproduced byte for byte by `python3 scripts/gen-traces.py` (standard library only).
"""
import math
import os
import random

SEED = 20261130
DURATION_S = 180

# name: (bandwidth median kbit/s, σ of log bandwidth, φ, floor kbit/s,
#        RTT median ms, σ of log RTT, φ, outage probability per second)
TRACES = {
    # Norway HSDPA commute traces (Riiser et al., MMSys 2013): median near 1 Mbit/s, wide
    # spread, short outages in tunnels and between cells.
    "3g": (1000.0, 0.75, 0.85, 40.0, 150.0, 0.35, 0.8, 0.02),
    # Belgium 4G/LTE traces (van der Hooft et al., IEEE Commun. Lett. 2016): median near
    # 29 Mbit/s; LTE RTT about 70 ms (Huang et al., MobiSys 2012).
    "lte": (29000.0, 0.6, 0.85, 500.0, 70.0, 0.3, 0.8, 0.0),
    # Wi-Fi (Sommers & Barford, IMC 2012: Wi-Fi faster and with lower latency than cellular):
    # median 20 Mbit/s, RTT 20 ms.
    "wifi": (20000.0, 0.5, 0.9, 1000.0, 20.0, 0.4, 0.7, 0.0),
}


def series(rng, median, sigma, phi, n):
    x, out = 0.0, []
    for _ in range(n):
        x = phi * x + sigma * math.sqrt(1.0 - phi * phi) * rng.gauss(0.0, 1.0)
        out.append(median * math.exp(x))
    return out


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = os.path.join(root, "data", "traces")
    os.makedirs(out_dir, exist_ok=True)
    for name, (bw_m, bw_s, bw_phi, floor, rtt_m, rtt_s, rtt_phi, p_out) in TRACES.items():
        rng = random.Random(f"{SEED}-{name}")
        bw = series(rng, bw_m, bw_s, bw_phi, DURATION_S)
        rtt = series(rng, rtt_m, rtt_s, rtt_phi, DURATION_S)
        lines = ["time_s,bandwidth_kbit,rtt_ms"]
        for t in range(DURATION_S):
            b = bw[t]
            if rng.random() < p_out:
                b = floor  # an outage: the link barely moves
            lines.append(f"{t},{max(b, floor):.0f},{rtt[t]:.1f}")
        with open(os.path.join(out_dir, f"{name}.csv"), "w") as f:
            f.write("\n".join(lines) + "\n")
        s = sorted(max(v, floor) for v in bw)
        r = sorted(rtt)
        print(f"{name}: bandwidth median {s[len(s)//2]:.0f} kbit/s, RTT median {r[len(r)//2]:.1f} ms")


if __name__ == "__main__":
    main()
