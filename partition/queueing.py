"""A request's latency with several requests in flight, from a plan's idle predictions.

The pipeline is a closed queueing network: ``in_flight`` requests circulate (each answer
sends the next request at once, as ``coordinator bench`` does), through stations that each
serve one request at a time for a fixed time ``s_k`` (every stage's compute and every
link's busy time) and through pure delays that hold any number of requests (the links'
latencies). Idle, a request takes ``D`` (the plan's latency: every ``s_k`` and every
delay); the busiest station takes ``s_max`` (the plan's bottleneck).

With deterministic service times the network's asymptotic bounds are its steady state:
throughput is ``X = min(W / D, 1 / s_max)`` for ``W`` requests in flight. Once requests
leave the bottleneck ``s_max`` apart, no later station (each serves in at most ``s_max``)
and no delay makes one wait, so with ``W · s_max <= D`` every request goes round in ``D``;
with more, the bottleneck never idles and serves one request per ``s_max``. Little's law
gives the latency ``R = W / X = max(D, W · s_max)``. Mean-value analysis with exponential
service times would predict more near the knee ``W ≈ D / s_max`` (requests bunch up);
measured service times vary a little, so measured latency there lies between the two.

Paced at ``λ`` requests a second below ``1 / s_max`` (a request waits for its turn before it
is sent, and that wait is not its latency), requests enter ``1 / λ`` apart, no station makes
one wait, and every request takes ``D``. That holds only clear of the knee: a plan's
capacity is itself predicted within 15%, so at ``λ · s_max`` of :data:`SATURATED_SHARE` or
more the plan is predicted saturated, as without pacing (the demo on commit ``88c090a``,
paced at 97.5% of its predicted rate, ran at 20.4 req/s against 22.8 offered: saturated,
395 ms at p50 with 8 in flight, 342 ms as saturated, 131 ms idle).

With replicated stages requests take different paths (one replica a stage), and a measured
median is compared with the idle *median* over the paths (``Plan.latency_p50_s``) in place
of ``D``. Where no request waits (below the knee, paced, or one alone, even where a rarely
used replica or link is busier per request than the median path takes) each takes its own
path's idle time, so the median is the idle median. Far past the knee the bottleneck paces
every request and ``W · s_max`` is Little's mean, which the measured median meets or exceeds
(the demo's replicated plan: a mean of 383 ms from its measured throughput, a median of
402 ms), so it is not shifted down by the idle mean's excess over the median.

Where the replicas of the bottleneck stage differ in speed, the median under load is not
fixed by the plan: dealing by share keeps every replica busy however the ``W`` requests
are split among them, so the split stays where the first requests and the jitter of
service times leave it, and the fast replicas' requests (most of them) wait behind however
many of their own. The demo's plan (GPT-2 whole on four nodes of speeds 0.1, 0.2, 0.5 and
0.5, 8 in flight, 388 ms predicted) measured 398 ms in the demo and 298 ms in
``benchmarks/plan_quality.py``, both on commit ``8e2894e``.
"""

from __future__ import annotations

SATURATED_SHARE = 0.85
"""Paced at this share of a plan's predicted throughput or more, the plan is predicted
saturated (see the module docstring)."""


def latency_under_load(latency_s: float, bottleneck_s: float, in_flight: int,
                       offered_per_s: float | None = None) -> float:
    """Steady-state latency of a request with ``in_flight`` requests kept in flight, at most
    ``offered_per_s`` sent a second if given, for a plan whose one idle request takes
    ``latency_s`` (the mean, or the median over paths for a median) and whose busiest stage
    or link takes ``bottleneck_s`` per request (see the module docstring).

    >>> latency_under_load(0.010, 0.004, 1)
    0.01
    >>> latency_under_load(0.010, 0.004, 2)  # the second request fits in the gaps
    0.01
    >>> latency_under_load(0.010, 0.004, 8)  # the bottleneck is saturated: 8 x 4 ms
    0.032
    >>> latency_under_load(0.010, 0.004, 8, offered_per_s=200)  # paced at 80% of 250/s
    0.01
    >>> latency_under_load(0.010, 0.004, 8, offered_per_s=240)  # at 96%: taken as saturated
    0.032
    >>> latency_under_load(0.010, 0.012, 1)  # alone: a rarely used replica's busy time
    0.01

    Raises
    ------
    ValueError
        ``in_flight`` is less than 1.
    """
    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, not {in_flight}")
    if in_flight == 1 or (offered_per_s is not None
                          and offered_per_s * bottleneck_s < SATURATED_SHARE):
        return latency_s
    return max(latency_s, in_flight * bottleneck_s)
