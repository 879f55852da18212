"""``promptcache bench``: realistic prompt-caching workloads, driven against any compatible server.

``workloads`` generates the traffic (deterministic from a seed), ``wire`` turns it into Anthropic
or OpenAI request bodies and parses their streams, ``client`` sends it and times every request,
``cluster`` says which of several targets each request goes to and adds up the cluster hit rate,
``report`` and ``prices`` turn the records into latency and cost figures, ``plots`` draws them,
``peers`` starts the servers a user would otherwise run, and ``command`` is the CLI glue.
Nothing here imports the server: the benchmark sees promptcache only through HTTP.
"""

from __future__ import annotations
