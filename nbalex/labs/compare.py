"""Compare a launcher's outputs with the reference and read a hint from the pattern of errors.

Outputs are filled with a canary (:data:`CANARY`) before the student's launch, so an element
the kernel never wrote still holds it.  :func:`compare` returns None when an array matches
within its tolerance, else a failure record: the shape, how many elements are wrong, the
first few with their index, expected and got, and a one-line hint.  The hints are tried in
order, the most specific first; each is a pattern a common bug leaves behind.
"""

import numpy as np

CANARY = {np.dtype(np.float32): np.float32(-2.0 ** 100), np.dtype(np.float64): -2.0 ** 100,
          np.dtype(np.int32): np.int32(-559038737), np.dtype(np.uint8): np.uint8(0xCD)}
"""The value an output holds before the launch, by dtype (never a value a reference makes)."""

FIRST = 5
"""Wrong elements listed per array."""


def canary(dtype):
    return CANARY[np.dtype(dtype)]


def _close(got, expected, rtol, atol):
    if rtol == 0 and atol == 0:
        return (got == expected) | (np.isnan(got) & np.isnan(expected)) if got.dtype.kind == "f" \
            else got == expected
    return np.isclose(got, expected, rtol=rtol, atol=atol, equal_nan=True)


def compare(name, got, expected, rtol=0.0, atol=0.0, special=None):
    """None if ``got`` matches ``expected`` (same shape), else a dict describing the failure.

    ``special(name, got, expected, wrong)`` may return a lab-specific hint, tried first.
    """
    got = np.asarray(got)
    if got.shape != expected.shape:
        return {"array": name, "shape": list(expected.shape), "wrong": int(expected.size),
                "total": int(expected.size), "first": [],
                "hint": f"got shape {got.shape}, expected {expected.shape}"}
    ok = _close(got, expected, rtol, atol)
    if ok.all():
        return None
    wrong = ~ok
    first = [{"index": [int(i) for i in ix], "expected": _py(expected[tuple(ix)]),
              "got": _py(got[tuple(ix)])} for ix in np.argwhere(wrong)[:FIRST]]
    hint = (special(name, got, expected, wrong) if special else None) or \
        hint_for(got, expected, wrong, rtol, atol)
    return {"array": name, "shape": list(expected.shape), "wrong": int(wrong.sum()),
            "total": int(expected.size), "first": first, "hint": hint}


def _py(v):
    v = v.item()
    if isinstance(v, float) and v == float(CANARY[np.dtype(np.float32)]):
        return "never written"
    if isinstance(v, int) and v in (int(CANARY[np.dtype(np.int32)]),):
        return "never written"
    return v


def hint_for(got, expected, wrong, rtol, atol):
    """The generic hint for the pattern of ``wrong`` elements."""
    size = expected.size
    unwritten = got == canary(got.dtype) if got.dtype in CANARY else np.zeros_like(wrong)
    unwritten &= wrong
    n_wrong = int(wrong.sum())
    if unwritten.any():
        flat = np.flatnonzero(unwritten.ravel())
        if flat.size == size:
            return ("nothing was written: is the kernel body still to write, is the kernel "
                    "launched, and does it store into the array it was given?")
        if flat.size == n_wrong and flat[0] == size - flat.size and np.all(np.diff(flat) == 1):
            return (f"the last {flat.size} of {size} elements were never written: the grid "
                    "covers fewer threads than elements (round the block count up, "
                    "(n + threads - 1) // threads, or loop with a grid stride)")
        edge = _edge_axis(unwritten)
        if edge is not None:
            return (f"the elements at the end of axis {edge} were never written: a bounds "
                    "guard that is one too strict (< n - 1, or a tile count rounded down)")
        return (f"{flat.size} of {size} elements were never written (first at flat index "
                f"{flat[0]}): an index or loop step skips them (check the stride of the loop "
                "and how the thread index maps to the element)")
    if got.dtype.kind == "f":
        bad_nan = np.isnan(got) & ~np.isnan(expected)
        if bad_nan.any():
            return ("NaN where the reference has numbers: a read outside the array or of "
                    "shared memory no thread wrote, or a 0/0 (or inf - inf)")
        if not np.any(got) and np.any(expected):
            return ("all zeros: the result was never stored, or stored into a temporary "
                    "instead of the output")
    shifted = _shifted(got, expected)
    if shifted:
        return shifted
    if got.ndim >= 2 and got.shape[-1] > 1 and got.shape[-2] > 1:
        swapped = np.swapaxes(expected, -1, -2).reshape(got.shape)
        if _close(got, swapped, max(rtol, 1e-6), max(atol, 1e-6)).all():
            return ("transposed: rows and columns swapped (row-major: element [r, c] is at "
                    "r * width + c)")
    if got.dtype.kind in "iu" and np.all(np.abs(got[wrong].astype(np.int64)
                                             - expected[wrong].astype(np.int64)) == 1):
        return "every wrong value is off by one: an index computed one too large or small"
    if got.dtype.kind == "f":
        ratio = _constant_ratio(got, expected, wrong)
        if ratio is not None:
            return (f"got {ratio:.6g} times the expected value: a scale factor is missing or "
                    "extra (1/(1-p), 1/N, a learning-rate multiplier, a sign)")
    edge = _edge_axis(wrong)
    if edge is not None:
        return (f"only the last elements along axis {edge} are wrong: a bounds check or a "
                "partial tile (zero-fill what lies past the edge, guard only the store)")
    if got.dtype.kind == "f":
        scale = np.maximum(np.abs(expected[wrong].astype(np.float64)), 1e-30)
        with np.errstate(all="ignore"):
            rel = float(np.max(np.abs(got[wrong] - expected[wrong]) / scale))
        if rel < 1e-2:
            return (f"close but outside the tolerance (rtol {rtol:g}, atol {atol:g}; largest "
                    f"relative error {rel:.2g}): a sum taken in another order or in float32 "
                    "where the reference keeps more precision, or a term left out")
    where = _only_at(wrong)
    if where:
        return where
    return (f"{n_wrong} of {size} elements are wrong; compare the first ones with the math in "
            "the handout")


def _only_at(wrong):
    """"wrong only at ..." when the errors sit at a few indices of one axis."""
    for axis in range(wrong.ndim):
        hit = np.flatnonzero(wrong.any(axis=tuple(a for a in range(wrong.ndim) if a != axis)))
        if 0 < hit.size <= 6 and hit.size < wrong.shape[axis]:
            listed = ", ".join(str(int(i)) for i in hit)
            return (f"wrong only at index {listed} of axis {axis} (of {wrong.shape[axis]}), "
                    "right elsewhere: look at what is special there (an edge, a boundary "
                    "between tensors or windows)")
    return None


def _edge_axis(mask):
    """The axis along which every True of ``mask`` sits at the last index (None if none)."""
    for axis in range(mask.ndim - 1, -1, -1):
        if mask.shape[axis] < 2:
            continue
        idx = np.argwhere(mask)
        if np.all(idx[:, axis] == mask.shape[axis] - 1):
            return axis
    return None


def _shifted(got, expected):
    """"off by one" when got equals expected moved by one place along some axis."""
    for axis in range(got.ndim - 1, -1, -1):
        n = got.shape[axis]
        if n < 3:
            continue
        for d in (1, -1):
            a = np.take(got, range(1, n) if d == 1 else range(0, n - 1), axis=axis)
            b = np.take(expected, range(0, n - 1) if d == 1 else range(1, n), axis=axis)
            if a.size and np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True):
                where = "row" if axis == got.ndim - 2 else "column" if axis == got.ndim - 1 \
                    else f"place along axis {axis}"
                return (f"off by one {where}: element i holds what belongs at "
                        f"i {'-' if d == 1 else '+'} 1 (an index computed one too "
                        f"{'small' if d == 1 else 'large'})")
    return None


def _constant_ratio(got, expected, wrong):
    e, g = expected[wrong].astype(np.float64), got[wrong].astype(np.float64)
    keep = np.abs(e) > 1e-6
    if keep.sum() < 2:
        return None
    r = g[keep] / e[keep]
    if np.allclose(r, r[0], rtol=1e-4) and abs(r[0] - 1) > 1e-3:
        return float(r[0])
    return None
