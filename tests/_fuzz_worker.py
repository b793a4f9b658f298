"""The process that runs fuzzed calls for tests/test_fuzz.py, so that a crash or a hang is a failed test rather
than a dead test run. Protocol on stdin/stdout: 8-byte little-endian length, then a pickle.

Request: (op, args, kwargs), NumPy arrays among the args. Reply: ("ok", outputs) where outputs are host arrays
(and, for sgd_update, the updated w and v), or ("raise", type name, is a ValueError, is a TypeError, message).
"""

import os
import pickle
import struct
import sys

import numpy as np

# The protocol owns the real stdout; anything printed goes to stderr.
_protocol = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)

import pyalexnet as pa  # noqa: E402  (after the redirection)

pa.ops._poison_outputs = True  # an element a kernel forgets to write shows as NaN


def _host(r):
    """Every op's outputs as a list of host arrays (a loss stays a float)."""
    if isinstance(r, tuple):
        return [v if isinstance(v, float) else pa.to_numpy(v) for v in r]
    return [pa.to_numpy(r)]


def _run(op, args, kwargs):
    if pa.backend_name() != "emu":  # on the emulator the arrays go in exactly as sent, hostile layouts included
        args = [pa.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
    result = getattr(pa.ops, op)(*args, **kwargs)
    if op == "sgd_update":
        return [pa.to_numpy(args[0]), pa.to_numpy(args[2])]
    return _host(result)


def _reply(obj):
    data = pickle.dumps(obj)
    _protocol.write(struct.pack("<Q", len(data)))
    _protocol.write(data)
    _protocol.flush()


def main():
    stdin = sys.stdin.buffer
    while True:
        head = stdin.read(8)
        if len(head) < 8:
            return
        op, args, kwargs = pickle.loads(stdin.read(struct.unpack("<Q", head)[0]))
        try:
            _reply(("ok", _run(op, args, kwargs)))
        except Exception as e:  # noqa: BLE001  (the parent judges the exception)
            _reply(("raise", type(e).__name__, isinstance(e, ValueError), isinstance(e, TypeError), str(e)))


if __name__ == "__main__":
    main()
