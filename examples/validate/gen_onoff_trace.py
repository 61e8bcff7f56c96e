#!/usr/bin/env python3
# Generates the on/off Poisson validation traces of docs/EVALUATION.md ("Live platform vs simulator"):
#   python3 gen_onoff_trace.py SEED MINUTES [ON_S OFF_S RATE_SCALE [BURST]] > trace.csv
#   vtrace1.csv = seed 1, 20 minutes (on 20-90 s, off 30-150 s, rates x1: CPU well below 2 cores)
#   vtrace2.csv = `7 20 5-20 30-84 1 2-4`: short "on" periods opened by a burst of 2-4
#     simultaneous requests (several sandboxes per function), "off" gaps of 30-84 s: longer than
#     the scaled idle period (6 s), often longer than the scaled keep-alive (60 s), shorter than
#     the scaled keep-dedup (90 s), so Medes can dedup-start where fixed keep-alive cold-starts.
# ON_S / OFF_S: LO-HI seconds of an on period / off gap (uniform); RATE_SCALE multiplies the rates;
# BURST (LO-HI requests, optional): each on period opens with that many requests within 50 ms.
import random, sys
seed = int(sys.argv[1]); minutes = int(sys.argv[2])
def span(arg, default):
    if arg is None:
        return default
    lo, hi = arg.split('-')
    return float(lo) * 1000, float(hi) * 1000
on_ms = span(sys.argv[3] if len(sys.argv) > 3 else None, (20_000, 90_000))
off_ms = span(sys.argv[4] if len(sys.argv) > 4 else None, (30_000, 150_000))
scale = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
burst = tuple(int(v) for v in sys.argv[6].split('-')) if len(sys.argv) > 6 else None
rng = random.Random(seed)
rates = {  # arrivals per second while "on"
 'authenc':0.5,'featuregen':0.4,'htmlserve':1.0,'imagepro':0.4,'linalg':0.6,
 'mapreduce':0.15,'modelserve':1.0,'modeltrain':0.12,'vanilla':0.5,'videopro':0.5}
end = minutes*60*1000
out = []
for f, r in rates.items():
    r *= scale
    t = rng.uniform(0, 60_000)
    on = rng.random() < 0.6
    while t < end:
        dur = rng.uniform(*on_ms) if on else rng.uniform(*off_ms)
        stop = min(end, t + dur)
        if on:
            x = t
            if burst:  # the on period opens with a burst of near-simultaneous requests
                for _ in range(rng.randint(*burst)):
                    out.append((int(t + rng.uniform(0, 50)), f))
            while True:
                x += rng.expovariate(r) * 1000
                if x >= stop: break
                out.append((int(x), f))
        t = stop; on = not on
out.sort()
print('time_ms,function,params')
for x, f in out: print(f'{x},{f},')
