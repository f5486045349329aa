"""The OpenAI-compatible HTTP server (``pip install inference-pio-core[serve]``; ``inference-pio serve``).

One job per module, in the order a request meets them:

- ``middleware``: header (431) and body (413) size limits, before any route runs.
- ``app``: the routes, nothing else; ``/openapi.json`` describes each request body.
- ``parsing``: the body as JSON (nesting limit, valid Unicode), then the ``protocol`` model.
- ``protocol``: request models with their limits, and the response bodies.
- ``state``: settings, the served plugins and their loading status, the API key check.
- ``serving``: the flow both generating endpoints share (accept, then answer whole or streamed);
  ``serving_chat`` (template options, images) and ``serving_completion`` add what differs.
- ``images``: fetching ``http(s)`` image URLs from allow-listed hosts.
- ``errors``: the one translation of exceptions into OpenAI error responses.
- ``metrics``: Prometheus metrics; ``cli``: the ``serve`` command.
- ``ray_serve``: the same app as a Ray Serve application (``serve --ray``: replicas, a cluster).

Nothing here imports torch: a server of torch-free plugins runs without it; only ``ray_serve`` imports ray.
"""
