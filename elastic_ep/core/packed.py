"""Integer arrays in records: compact, bounded, checked before anything is allocated.

A placement of DeepSeek-V3 on 256 ranks x 9 slots is 58 x 2304 logical ids: about
470 KB as a JSON list of lists, 94 KB packed (int16, zlib, base64). Records hold such
arrays as ``{"dtype": "int16", "shape": [58, 2304], "z": "<base64 of zlib>"}``.

Reading is strict because a record may come from anywhere: the dtype is one of
:data:`DTYPES`, the shape is bounded before decompression, decompression stops at the
shape's byte count (a zlib bomb inflates no further), and the bytes must fill the
shape exactly.

:func:`describe` is the one short, safe description of any value read from a record
that every reader's error message uses.

Example::

    d = pack(np.array([[0, 1], [1, 0]]))
    unpack(d, "placement phy2log", max_elements=4) -> int64 [[0, 1], [1, 0]]
"""

from __future__ import annotations

import base64
import binascii
import zlib
from typing import Any, Callable

import numpy as np

from elastic_ep.errors import PlacementError

DTYPES = ("int8", "int16", "int32", "int64")
MAX_DIMS = 4


def narrowest(lo: int, hi: int) -> str:
    """The smallest dtype of :data:`DTYPES` holding ``lo..hi``: ``narrowest(-1, 255) == "int16"``."""
    for name in DTYPES:
        info = np.iinfo(name)
        if info.min <= lo and hi <= info.max:
            return name
    raise ValueError(f"{lo}..{hi} does not fit int64")


def pack(arr: np.ndarray, level: int = 6) -> dict[str, Any]:
    """``arr`` (integers) as a record value, in the narrowest dtype that holds it."""
    a = np.asarray(arr)
    dtype = narrowest(int(a.min()), int(a.max())) if a.size else "int8"
    raw = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    return {"dtype": dtype, "shape": list(a.shape), "z": base64.b64encode(zlib.compress(raw, level)).decode("ascii")}


def unpack(value: Any, name: str, max_elements: int, error: Callable[[str], Exception] = PlacementError,
           ndim: int | None = None) -> np.ndarray:
    """The int64 array of a :func:`pack` value, or ``error`` naming ``name`` and the defect:
    not such a mapping, an unknown dtype, a shape past ``max_elements`` (or not ``ndim``
    dimensions), text that is not base64 or zlib, bytes that do not fill the shape."""
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "z"}:
        raise error(f"{name} must be a packed array {{dtype, shape, z}}, got {describe(value)}")
    dtype, shape, text = value["dtype"], value["shape"], value["z"]
    if dtype not in DTYPES:
        raise error(f"{name} dtype {describe(dtype)} is not one of {DTYPES}")
    want_dims = ndim if ndim is not None else len(shape) if isinstance(shape, list) else -1
    if (not isinstance(shape, list) or not 0 < len(shape) <= MAX_DIMS or len(shape) != want_dims
            or not all(type(n) is int and 0 <= n <= max_elements for n in shape)):
        raise error(f"{name} shape {describe(shape)} is not a list of {ndim or 'up to ' + str(MAX_DIMS)} sizes")
    count = int(np.prod(shape, dtype=np.float64))
    if count > max_elements:
        raise error(f"{name} is shaped {shape}: {count} entries, more than the {max_elements} it may hold")
    nbytes = count * np.dtype(dtype).itemsize
    if not isinstance(text, str) or len(text) > 4 * (nbytes // 3 + 64) + 1024:
        raise error(f"{name} data is {describe(text)}, not the base64 text of at most {nbytes} bytes")
    try:
        z = base64.b64decode(text.encode("ascii"), validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(z, nbytes)
        extra = bool(inflater.unconsumed_tail) or not inflater.eof
    except (binascii.Error, UnicodeEncodeError, zlib.error, ValueError) as e:
        raise error(f"{name} data is not base64 of zlib data: {e}") from None
    if len(raw) != nbytes or extra:
        raise error(f"{name} data holds {'more than ' if extra else ''}{len(raw)} bytes; shape {shape} of "
                    f"{dtype} needs exactly {nbytes}")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.int64).reshape(shape)


def describe(value: Any) -> str:
    """A short description of a value read from a record, safe for any value: huge ints
    and deep nestings are described, not printed."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**18 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    size = f" of {len(value)}" if isinstance(value, (list, dict, bytes)) else ""
    return f"a {type(value).__name__}{size}"
