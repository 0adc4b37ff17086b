"""What a request costs the server in memory, and how the server bounds it.

Why this module exists: a replica has a fixed memory (``spec.resources.memory``: a
VM's RAM, a container's cgroup limit), and a request body of B bytes costs more
than B to serve. A JSON body becomes Python objects before it becomes tensors,
and orjson parses a copy of the text into a document of 16 bytes per value
before it makes them: one 24-byte float (a 32-byte block) and an 8-byte list
slot for every number. So ``0.5,`` (4 bytes of text) costs 56 bytes at the
peak, ``[1],`` about 120, and even a typical ``0.6369616985321045, `` (21 bytes)
costs 3.8 times its text. With a body limit that ignored this, one legal 58 MB
request drove a 256 MiB replica to a 916 MiB peak.

So the server bounds a request's cost, not only its size:

- the body itself: at most ``max_body_size`` bytes (413 beyond);
- what parsing a large JSON body costs (orjson's copy and document, then the
  Python objects), estimated from its text before parsing (:func:`json_cost`):
  at most ``JSON_COST_FACTOR x max_body_size`` (413 beyond, naming the binary
  tensor data extension, which costs no objects at all);
- the tensors: numpy arrays built once the parse is over (the body is freed by
  then), the model's outputs and the encoded answer, under the parse's peak for
  JSON and about one body for binary tensors.

Hence the rule the spec applies to ``spec.server.maxBodySize``, derived from
``spec.resources.memory`` when unset (:meth:`uniframe.spec.service.Server.body_limit`):
a request's peak over the server at rest is at most ``PEAK_FACTOR`` body limits.
tests/serve/test_memory.py measures it with the real server and holds the spec's
factor equal to this one.
"""

from __future__ import annotations

MiB = 1 << 20

JSON_COST_FACTOR = 5
"""Parsing a JSON body may cost this many times the body limit: a typical float array
(``json.dumps`` of floats, about 21 bytes a number) is estimated at 4.8 times its
text (it measures 3.8), so a body of that kind is accepted up to the full limit."""

PEAK_FACTOR = 1 + JSON_COST_FACTOR
"""Peak memory of one request over the server at rest, in body limits: the body itself
while it is parsed, plus the parse. Binary tensors peak at about 2 (body and output)."""

LARGE = 1 * MiB
"""Bodies from this size take the memory-careful path (received in place, their JSON cost
estimated, heap given back afterwards); smaller ones skip all of it."""

# Peak bytes of orjson.loads per JSON token beyond its copy of the text, measured
# from VmHWM and VmRSS around the call (orjson 3.13, CPython 3.11, 64-bit): a value
# (16 in orjson's document, then one list slot and a float or large int in a 32-byte
# block; small ints are shared, so they cost less), a list (16 + 80), an object (16
# + a small dict), and per quote half a string object's header beyond a value.
VALUE_COST = 56
LIST_COST = 96
OBJECT_COST = 256
QUOTE_COST = 16


def json_cost(text: bytes | bytearray) -> int:
    """An upper estimate of the peak memory of ``orjson.loads(text)``, in bytes.

    Two text lengths (orjson's copy, and the characters of strings, which can be all
    of it) and the tokens' costs. Counting four bytes is a C loop over the text
    (about 0.2 s for 50 MB here, under the parse it guards); it over-counts small
    integers (shared objects) and never under-counts numbers, lists or strings.
    """
    return (2 * len(text) + VALUE_COST * (text.count(b",") + 1) + LIST_COST * text.count(b"[")
            + OBJECT_COST * text.count(b"{") + QUOTE_COST * text.count(b'"'))
