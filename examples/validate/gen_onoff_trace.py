#!/usr/bin/env python3
# Generates the on/off Poisson validation trace of docs/EVALUATION.md ("Live platform vs simulator"):
#   python3 gen_onoff_trace.py SEED MINUTES > trace.csv   (vtrace1.csv = seed 1, 20 minutes)
# Validation trace: on/off Poisson arrivals per function, 20 min, CPU well below 2 cores.
import random, sys
seed = int(sys.argv[1]); minutes = int(sys.argv[2])
rng = random.Random(seed)
rates = {  # arrivals per second while "on"
 'authenc':0.5,'featuregen':0.4,'htmlserve':1.0,'imagepro':0.4,'linalg':0.6,
 'mapreduce':0.15,'modelserve':1.0,'modeltrain':0.12,'vanilla':0.5,'videopro':0.5}
end = minutes*60*1000
out = []
for f, r in rates.items():
    t = rng.uniform(0, 60_000)
    on = rng.random() < 0.6
    while t < end:
        dur = rng.uniform(20_000, 90_000) if on else rng.uniform(30_000, 150_000)
        stop = min(end, t + dur)
        if on:
            x = t
            while True:
                x += rng.expovariate(r) * 1000
                if x >= stop: break
                out.append((int(x), f))
        t = stop; on = not on
out.sort()
print('time_ms,function,params')
for x, f in out: print(f'{x},{f},')
