"""The numba backend: the forest flattened into arrays, traversed by branch-free jitted kernels.

Layout. Every split is rewritten to one canonical test, "go right iff key(x[f]) >= k", on int32
keys. ``key`` maps a float32 to an int32 that orders like the float (``b`` if the sign bit is clear,
``-(b & 0x7fffffff)`` if set, so -0.0 and +0.0 share key 0) and maps NaN to INT32_MIN, below every
threshold, so a missing value always takes the left edge. A node whose default (missing) direction
is right has its children swapped and tests the negated feature (``-key``, stored in a second half
of the per-row key vector) against ``1 - key(t)``; both sides of that rewrite send NaN left, i.e.
to the original right child. XGBoost's ``x < t`` on float32 and LightGBM's ``x <= t`` on float64
thresholds become exact float32 thresholds first (inputs are float32, as in XGBoost). Feature index
and threshold key share one uint64, so a step is one node load, one key load and one compare.

Trees up to ``PERFECT_MAX_DEPTH`` deep are padded to perfect binary trees of the forest's depth D
(a shallow leaf is replicated), so traversal is exactly D steps of ``i = 2i + 1 + right`` with no
branch on the data. Deeper forests use an explicit-children layout (children adjacent, ``i =
child[i] + right``) with a loop per tree.

Loop order. One row: eight trees advance in lockstep, eight independent dependency chains that the
CPU overlaps. Batches: blocks of 64 rows (their keys fit in L1); for each tree, eight rows advance
in lockstep; tree-major within the block so a tree's nodes stay in L1 while all rows pass through.

Kernels are ``nogil`` and thread-safe (they read the model arrays and write only the caller's
output rows); they allocate a small scratch buffer per call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numba import njit

from rtbserve.errors import UnsupportedModel
from rtbserve.predictors.source import ModelSource

PERFECT_MAX_DEPTH = 10
BLOCK_ROWS = 64
INT32_MIN = np.int32(-(2**31))
# LightGBM turns dense rows sparse dropping |x| <= kZeroThreshold (1e-35f): such inputs are 0
LIGHTGBM_ZERO_MAG = int(np.float32(1e-35).view(np.int32))

POSTPROCESSORS = {
    "identity": 0,
    "identity_multiclass": 0,
    "sigmoid": 1,
    "softmax": 2,
    "multiclass_ova": 3,
    "exponential": 4,
    "logarithm_one_plus_exp": 5,
    "signed_square": 6,
    "hinge": 7,
}

# treelite Operator enum
_OP_LT, _OP_LE, _OP_GT, _OP_GE = 2, 3, 4, 5
_NODE_LEAF, _NODE_NUMERICAL = 0, 1

U = np.uint64


# --------------------------------------------------------------------------- flattening


def float32_keys(values: np.ndarray) -> np.ndarray:
    """float32 values -> int32 keys that order like the floats (see the module docstring)."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    b = v.view(np.int32).astype(np.int64)
    mag = b & 0x7FFFFFFF
    keys = np.where(b >= 0, b, -mag)
    keys = np.where(mag > 0x7F800000, int(INT32_MIN), keys)
    return keys.astype(np.int32)


def exact_float32_threshold(t: np.ndarray, op: np.ndarray) -> np.ndarray:
    """Thresholds T (float32) with "x OP t" == "x < T" for every float32 x (OP is < or <=)."""
    t64 = np.asarray(t, dtype=np.float64)
    t32 = t64.astype(np.float32)
    up = np.nextafter(t32, np.float32(np.inf))
    with np.errstate(invalid="ignore"):
        lt_fix = t32.astype(np.float64) < t64  # rounded down: the next float32 is the first >= t
        le_fix = t32.astype(np.float64) <= t64  # first float32 strictly above t
    need = np.where(op == _OP_LT, lt_fix, le_fix)
    return np.where(need, up, t32).astype(np.float32)


@dataclass
class FlatForest:
    """A forest as flat arrays; see the module docstring for the layout."""

    n_features: int
    n_outputs: int
    n_trees: int
    depth: int  # perfect layout depth, or -1 for the explicit-children layout
    packed: np.ndarray  # uint64 [nodes]: low 32 bits feature column, high 32 bits threshold key
    leaves: np.ndarray  # float32|float64: perfect [T * 2^D]; explicit [nodes]
    children: np.ndarray  # uint32 [nodes] (explicit layout; 0 marks a leaf), else empty
    roots: np.ndarray  # uint32 [T] root node per tree (explicit layout), else empty
    tree_out: np.ndarray  # uint32 [T] output column each tree adds to
    base: np.ndarray  # [K] base margins
    scale: np.ndarray  # [K] 1 / trees per output when averaging, else 1
    post: int
    alpha: float
    zero_mag: int  # int32 magnitude bits at or below which an input reads as 0

    @property
    def nbytes(self) -> int:
        return sum(
            a.nbytes for a in (self.packed, self.leaves, self.children, self.roots, self.tree_out)
        )

    def to_npz(self) -> dict[str, np.ndarray]:
        arrays = {k: getattr(self, k) for k in ("packed", "leaves", "children", "roots")}
        arrays.update(tree_out=self.tree_out, base=self.base, scale=self.scale)
        meta = [self.n_features, self.n_outputs, self.n_trees, self.depth, self.post]
        meta.append(self.zero_mag)
        arrays["meta"] = np.array(meta, dtype=np.int64)
        arrays["alpha"] = np.array([self.alpha], dtype=np.float64)
        return arrays

    @classmethod
    def from_npz(cls, z: Any) -> FlatForest:
        n_features, n_outputs, n_trees, depth, post, zero_mag = (int(v) for v in z["meta"])
        return cls(
            n_features=n_features,
            n_outputs=n_outputs,
            n_trees=n_trees,
            depth=depth,
            packed=z["packed"],
            leaves=z["leaves"],
            children=z["children"],
            roots=z["roots"],
            tree_out=z["tree_out"],
            base=z["base"],
            scale=z["scale"],
            post=post,
            alpha=float(z["alpha"][0]),
            zero_mag=zero_mag,
        )


def flatten(source: ModelSource) -> FlatForest:
    """Flatten a model into a ``FlatForest``; raise ``UnsupportedModel`` for what it cannot hold."""
    tl = source.treelite
    h = source.header
    spec = source.output
    if spec.postprocessor not in POSTPROCESSORS:
        raise UnsupportedModel(
            f"the numba backend does not implement the {spec.postprocessor!r} output transform; "
            "use backend='tl2cgen' or the reference library"
        )
    if source.has_categorical:
        raise UnsupportedModel(
            "the model has categorical splits, which the numba backend does not serve; "
            "use backend='tl2cgen' (or the reference library, backend='xgboost'/'lightgbm')"
        )
    leaf_dtype = np.float64 if int(h["leaf_output_type"][0]) == 3 else np.float32
    n_trees = tl.num_tree
    k = spec.n_outputs
    class_id = np.asarray(h["class_id"], dtype=np.int64)
    if k > 1 and (class_id < 0).any():
        raise UnsupportedModel(
            "trees with vector leaves (XGBoost multi_strategy='multi_output_tree') are not "
            "served by the numba backend; use backend='tl2cgen'"
        )
    tree_out = (class_id if k > 1 else np.zeros(n_trees, np.int64)).astype(np.uint32)
    trees = [_canonical_tree(tl.get_tree_accessor(t), source.n_features) for t in range(n_trees)]
    depth = max((tr["depth"] for tr in trees), default=0)
    base = np.asarray(h["base_scores"], dtype=np.float64).reshape(-1)[:k].astype(leaf_dtype)
    if base.size < k:
        base = np.resize(base, k)
    scale = np.ones(k, dtype=leaf_dtype)
    if bool(h["average_tree_output"][0]):
        counts = np.bincount(tree_out, minlength=k).astype(np.float64)
        scale = (1.0 / np.maximum(counts, 1)).astype(leaf_dtype)
    common = dict(
        n_features=source.n_features,
        n_outputs=k,
        n_trees=n_trees,
        tree_out=tree_out,
        base=base,
        scale=scale,
        post=POSTPROCESSORS[spec.postprocessor],
        alpha=spec.sigmoid_alpha,
        zero_mag=LIGHTGBM_ZERO_MAG if source.family == "lightgbm" else 0,
    )
    if depth <= PERFECT_MAX_DEPTH:
        packed, leaves = _perfect_layout(trees, depth, leaf_dtype)
        empty = np.zeros(0, np.uint32)
        return FlatForest(
            depth=depth, packed=packed, leaves=leaves, children=empty, roots=empty, **common
        )
    packed, leaves, children, roots = _explicit_layout(trees, leaf_dtype)
    return FlatForest(
        depth=-1, packed=packed, leaves=leaves, children=children, roots=roots, **common
    )


def _canonical_tree(acc: Any, n_features: int) -> dict[str, Any]:
    """One tree with every split as "right iff key(col) >= thr_key" (children swapped as needed)."""
    g = acc.get_field
    left = g("cleft").astype(np.int64)
    right = g("cright").astype(np.int64)
    node_type = g("node_type")
    leaf = g("leaf_value").astype(np.float64)
    internal = left >= 0
    if (internal & (node_type != _NODE_NUMERICAL)).any():
        raise UnsupportedModel("categorical splits are not served by the numba backend")
    op = g("cmp").astype(np.int64)
    if (internal & ~np.isin(op, (_OP_LT, _OP_LE, _OP_GT, _OP_GE))).any():
        raise UnsupportedModel("the numba backend serves <, <=, >, >= splits only")
    default_left = g("default_left").astype(bool)
    # x > t  ==  not (x <= t); x >= t == not (x < t): swap children, flip the missing direction
    flip = internal & ((op == _OP_GT) | (op == _OP_GE))
    left, right = np.where(flip, right, left), np.where(flip, left, right)
    default_left = np.where(flip, ~default_left, default_left)
    op = np.where(op == _OP_GT, _OP_LE, np.where(op == _OP_GE, _OP_LT, op))
    thr = exact_float32_threshold(g("threshold"), op)  # go left iff x < thr
    key = float32_keys(thr).astype(np.int64)
    feat = g("split_index").astype(np.int64)
    # default right: test the negated column, "-key(x) >= 1 - key(thr)" <=> "x < thr"
    col = np.where(default_left, feat, feat + n_features)
    thr_key = np.where(default_left, key, 1 - key)
    go_right_child = np.where(default_left, right, left)
    go_left_child = np.where(default_left, left, right)
    thr_key = np.clip(thr_key, -(2**31), 2**31 - 1)
    packed = (col.astype(np.uint64) & U(0xFFFFFFFF)) | (
        (thr_key.astype(np.int64) & 0xFFFFFFFF).astype(np.uint64) << U(32)
    )
    # depth by walking from the root
    n = len(left)
    depth_of = np.zeros(n, np.int64)
    order = [0]
    for i in order:  # BFS; the list grows while iterating
        if internal[i]:
            for c in (go_left_child[i], go_right_child[i]):
                depth_of[c] = depth_of[i] + 1
                order.append(int(c))
    return {
        "internal": internal,
        "lo": go_left_child,  # child taken when the canonical test is false
        "hi": go_right_child,
        "packed": packed,
        "leaf": leaf,
        "depth": int(depth_of.max()) if n else 0,
    }


def _perfect_layout(trees: list[dict[str, Any]], depth: int, dtype: Any) -> tuple[Any, Any]:
    n_internal = (1 << depth) - 1
    packed = np.zeros((len(trees), max(n_internal, 0)), dtype=np.uint64)
    leaves = np.zeros((len(trees), 1 << depth), dtype=dtype)
    for t, tr in enumerate(trees):
        stack = [(0, 0, 0)]  # (node, heap position, level)
        while stack:
            node, pos, level = stack.pop()
            if not tr["internal"][node]:
                span = 1 << (depth - level)  # a shallow leaf fills its whole padded subtree
                first = (pos + 1) * span - 1 - n_internal
                leaves[t, first : first + span] = tr["leaf"][node]
                continue  # padded internal nodes below keep packed=0: either child is this leaf
            packed[t, pos] = tr["packed"][node]
            stack.append((int(tr["lo"][node]), 2 * pos + 1, level + 1))
            stack.append((int(tr["hi"][node]), 2 * pos + 2, level + 1))
    return packed.reshape(-1), leaves.reshape(-1)


def _explicit_layout(trees: list[dict[str, Any]], dtype: Any) -> tuple[Any, Any, Any, Any]:
    packed: list[int] = []
    leaves: list[float] = []
    children: list[int] = []
    roots: list[int] = []
    for tr in trees:
        root = len(packed)
        roots.append(root)
        packed.append(0)
        leaves.append(0.0)
        children.append(0)
        queue = [(0, root)]
        for node, slot in queue:
            if not tr["internal"][node]:
                leaves[slot] = tr["leaf"][node]
                continue
            packed[slot] = int(tr["packed"][node])
            first = len(packed)
            children[slot] = first
            packed.extend((0, 0))
            leaves.extend((0.0, 0.0))
            children.extend((0, 0))
            queue.append((int(tr["lo"][node]), first))
            queue.append((int(tr["hi"][node]), first + 1))
    return (
        np.array(packed, dtype=np.uint64),
        np.array(leaves, dtype=dtype),
        np.array(children, dtype=np.uint32),
        np.array(roots, dtype=np.uint32),
    )


# --------------------------------------------------------------------------- kernels

_JIT = dict(nogil=True, boundscheck=False, error_model="numpy", cache=True)


@njit(inline="always", **_JIT)
def _row_keys(X, r, xk, base_off, F, zero_mag):
    xi = X[r].view(np.int32)
    for j in range(F):
        b = xi[j]
        mag = b & np.int32(0x7FFFFFFF)
        k = b if b >= 0 else -mag
        if mag <= zero_mag:  # +-0, and LightGBM's |x| <= 1e-35 (it reads those as 0)
            k = np.int32(0)
        if mag > np.int32(0x7F800000):  # NaN
            xk[base_off + j] = INT32_MIN
            xk[base_off + F + j] = INT32_MIN
        else:
            xk[base_off + j] = k
            xk[base_off + F + j] = -k


@njit(inline="always", **_JIT)
def _step(packed, node, xk, xoff):
    p = packed[node]
    return U(xk[xoff + (p & U(0xFFFFFFFF))] >= np.int32(p >> U(32)))


@njit(**_JIT)
def _start_rows(out, begin, end, base, scale):
    """Sums start at the base margin, as in XGBoost (0 when trees are averaged: base comes last)."""
    K = out.shape[1]
    for r in range(begin, end):
        for c in range(K):
            out[r, c] = base[c] if scale[c] == 1.0 else 0.0


@njit(**_JIT)
def _finish_rows(out, begin, end, base, scale, post, alpha):
    """Turn raw sums in out[begin:end] into the model's output (post 0 leaves margins)."""
    K = out.shape[1]
    for r in range(begin, end):
        for c in range(K):
            if scale[c] != 1.0:
                out[r, c] = out[r, c] * scale[c] + base[c]
        if post == 1 or post == 3:
            for c in range(K):
                out[r, c] = 1.0 / (1.0 + np.exp(-alpha * out[r, c]))
        elif post == 2:
            m = out[r, 0]
            for c in range(1, K):
                m = max(m, out[r, c])
            s = 0.0
            for c in range(K):
                e = np.exp(out[r, c] - m)
                out[r, c] = e
                s += e
            for c in range(K):
                out[r, c] = out[r, c] / s
        elif post == 4:
            for c in range(K):
                out[r, c] = np.exp(out[r, c])
        elif post == 5:
            for c in range(K):
                out[r, c] = np.log1p(np.exp(out[r, c]))
        elif post == 6:
            for c in range(K):
                v = out[r, c]
                out[r, c] = v * v if v >= 0 else -v * v
        elif post == 7:
            for c in range(K):
                out[r, c] = 1.0 if out[r, c] > 0 else 0.0


def _make_perfect_kernel(depth: int) -> Any:
    D = depth  # a compile-time constant of this kernel: the level loop has a fixed trip count

    @njit(**_JIT)
    def perfect_predict(nodes, values, n_trees, post, alpha, X, begin, end, out_flat):
        """Score rows [begin, end) of X (float32, C order) into out_flat (n * K); perfect layout.

        ``nodes`` = packed nodes, the output column of each tree, then the input's zero magnitude
        (keys of |x| at or below it read as 0: 0 for XGBoost, 1e-35 for LightGBM); ``values`` =
        leaves, then the K base margins, then K scales (few arguments keep the call's unboxing
        cheap).
        ``post`` 0 returns margins. Thread-safe for disjoint row ranges; releases the GIL.
        """
        n_packed = nodes.shape[0] - n_trees - 1
        packed = nodes[:n_packed]
        tree_out = nodes[n_packed : n_packed + n_trees]
        zero_mag = np.int32(nodes[-1])
        F = U(X.shape[1])
        F2 = U(2) * F
        T = U(n_trees)
        NI = (U(1) << U(D)) - U(1)
        NL = NI + U(1)
        n_leaves = T * NL
        K = (values.shape[0] - n_leaves) // 2
        leaves = values[:n_leaves]
        base = values[n_leaves : n_leaves + K]
        scale = values[n_leaves + K :]
        out = out_flat.reshape((out_flat.shape[0] // K, K))
        one = U(1)
        two = U(2)
        _start_rows(out, begin, end, base, scale)
        if end - begin < 4:
            # few rows: sixteen trees in lockstep per row (16 independent chains beat 8, 12, 24, 32)
            xk = np.empty(F2, np.int32)  # allocates
            for r in range(begin, end):
                _row_keys(X, r, xk, U(0), F, zero_mag)
                t = U(0)
                while t + U(16) <= T:
                    o = t * NI
                    i0 = U(0)
                    i1 = U(0)
                    i2 = U(0)
                    i3 = U(0)
                    i4 = U(0)
                    i5 = U(0)
                    i6 = U(0)
                    i7 = U(0)
                    i8 = U(0)
                    i9 = U(0)
                    i10 = U(0)
                    i11 = U(0)
                    i12 = U(0)
                    i13 = U(0)
                    i14 = U(0)
                    i15 = U(0)
                    for _ in range(D):
                        i0 = two * i0 + one + _step(packed, o + U(0) * NI + i0, xk, U(0))
                        i1 = two * i1 + one + _step(packed, o + U(1) * NI + i1, xk, U(0))
                        i2 = two * i2 + one + _step(packed, o + U(2) * NI + i2, xk, U(0))
                        i3 = two * i3 + one + _step(packed, o + U(3) * NI + i3, xk, U(0))
                        i4 = two * i4 + one + _step(packed, o + U(4) * NI + i4, xk, U(0))
                        i5 = two * i5 + one + _step(packed, o + U(5) * NI + i5, xk, U(0))
                        i6 = two * i6 + one + _step(packed, o + U(6) * NI + i6, xk, U(0))
                        i7 = two * i7 + one + _step(packed, o + U(7) * NI + i7, xk, U(0))
                        i8 = two * i8 + one + _step(packed, o + U(8) * NI + i8, xk, U(0))
                        i9 = two * i9 + one + _step(packed, o + U(9) * NI + i9, xk, U(0))
                        i10 = two * i10 + one + _step(packed, o + U(10) * NI + i10, xk, U(0))
                        i11 = two * i11 + one + _step(packed, o + U(11) * NI + i11, xk, U(0))
                        i12 = two * i12 + one + _step(packed, o + U(12) * NI + i12, xk, U(0))
                        i13 = two * i13 + one + _step(packed, o + U(13) * NI + i13, xk, U(0))
                        i14 = two * i14 + one + _step(packed, o + U(14) * NI + i14, xk, U(0))
                        i15 = two * i15 + one + _step(packed, o + U(15) * NI + i15, xk, U(0))
                    lo = t * NL - NI
                    if K == 1:
                        s = out[r, 0]  # sequential, in tree order, as the reference sums
                        s += leaves[lo + U(0) * NL + i0]
                        s += leaves[lo + U(1) * NL + i1]
                        s += leaves[lo + U(2) * NL + i2]
                        s += leaves[lo + U(3) * NL + i3]
                        s += leaves[lo + U(4) * NL + i4]
                        s += leaves[lo + U(5) * NL + i5]
                        s += leaves[lo + U(6) * NL + i6]
                        s += leaves[lo + U(7) * NL + i7]
                        s += leaves[lo + U(8) * NL + i8]
                        s += leaves[lo + U(9) * NL + i9]
                        s += leaves[lo + U(10) * NL + i10]
                        s += leaves[lo + U(11) * NL + i11]
                        s += leaves[lo + U(12) * NL + i12]
                        s += leaves[lo + U(13) * NL + i13]
                        s += leaves[lo + U(14) * NL + i14]
                        s += leaves[lo + U(15) * NL + i15]
                        out[r, 0] = s
                    else:
                        out[r, tree_out[t + U(0)]] += leaves[lo + U(0) * NL + i0]
                        out[r, tree_out[t + U(1)]] += leaves[lo + U(1) * NL + i1]
                        out[r, tree_out[t + U(2)]] += leaves[lo + U(2) * NL + i2]
                        out[r, tree_out[t + U(3)]] += leaves[lo + U(3) * NL + i3]
                        out[r, tree_out[t + U(4)]] += leaves[lo + U(4) * NL + i4]
                        out[r, tree_out[t + U(5)]] += leaves[lo + U(5) * NL + i5]
                        out[r, tree_out[t + U(6)]] += leaves[lo + U(6) * NL + i6]
                        out[r, tree_out[t + U(7)]] += leaves[lo + U(7) * NL + i7]
                        out[r, tree_out[t + U(8)]] += leaves[lo + U(8) * NL + i8]
                        out[r, tree_out[t + U(9)]] += leaves[lo + U(9) * NL + i9]
                        out[r, tree_out[t + U(10)]] += leaves[lo + U(10) * NL + i10]
                        out[r, tree_out[t + U(11)]] += leaves[lo + U(11) * NL + i11]
                        out[r, tree_out[t + U(12)]] += leaves[lo + U(12) * NL + i12]
                        out[r, tree_out[t + U(13)]] += leaves[lo + U(13) * NL + i13]
                        out[r, tree_out[t + U(14)]] += leaves[lo + U(14) * NL + i14]
                        out[r, tree_out[t + U(15)]] += leaves[lo + U(15) * NL + i15]
                    t += U(16)
                while t < T:
                    o = t * NI
                    i = U(0)
                    for _ in range(D):
                        i = two * i + one + _step(packed, o + i, xk, U(0))
                    out[r, tree_out[t]] += leaves[t * NL - NI + i]
                    t += one
        else:
            # batches: 64-row blocks, tree-major, eight rows in lockstep
            B = U(BLOCK_ROWS)
            xk = np.empty(B * F2, np.int32)  # allocates
            for b0 in range(begin, end, BLOCK_ROWS):
                nb = U(min(end, b0 + BLOCK_ROWS) - b0)
                for q in range(nb):
                    _row_keys(X, U(b0) + q, xk, q * F2, F, zero_mag)
                for t in range(T):
                    o = t * NI
                    lo = t * NL - NI
                    c = tree_out[t]
                    q = U(0)
                    while q + U(8) <= nb:
                        x0 = q * F2
                        x1 = x0 + F2
                        x2 = x1 + F2
                        x3 = x2 + F2
                        x4 = x3 + F2
                        x5 = x4 + F2
                        x6 = x5 + F2
                        x7 = x6 + F2
                        i0 = i1 = i2 = i3 = i4 = i5 = i6 = i7 = U(0)
                        for _ in range(D):
                            i0 = two * i0 + one + _step(packed, o + i0, xk, x0)
                            i1 = two * i1 + one + _step(packed, o + i1, xk, x1)
                            i2 = two * i2 + one + _step(packed, o + i2, xk, x2)
                            i3 = two * i3 + one + _step(packed, o + i3, xk, x3)
                            i4 = two * i4 + one + _step(packed, o + i4, xk, x4)
                            i5 = two * i5 + one + _step(packed, o + i5, xk, x5)
                            i6 = two * i6 + one + _step(packed, o + i6, xk, x6)
                            i7 = two * i7 + one + _step(packed, o + i7, xk, x7)
                        r = U(b0) + q
                        out[r, c] += leaves[lo + i0]
                        out[r + one, c] += leaves[lo + i1]
                        out[r + U(2), c] += leaves[lo + i2]
                        out[r + U(3), c] += leaves[lo + i3]
                        out[r + U(4), c] += leaves[lo + i4]
                        out[r + U(5), c] += leaves[lo + i5]
                        out[r + U(6), c] += leaves[lo + i6]
                        out[r + U(7), c] += leaves[lo + i7]
                        q += U(8)
                    while q < nb:
                        i = U(0)
                        xo = q * F2
                        for _ in range(D):
                            i = two * i + one + _step(packed, o + i, xk, xo)
                        out[U(b0) + q, c] += leaves[lo + i]
                        q += one
        _finish_rows(out, begin, end, base, scale, post, alpha)

    return perfect_predict


@functools.cache
def perfect_kernel(depth: int) -> Any:
    """The perfect-layout kernel for one forest depth (numba caches each on disk)."""
    return _make_perfect_kernel(depth)


@njit(**_JIT)
def explicit_predict(nodes, values, n_trees, post, alpha, X, begin, end, out_flat):
    """Score rows [begin, end) of X into out_flat; explicit-children layout (deep trees).

    ``nodes`` = packed nodes, children, per tree its root and output column, then the zero
    magnitude (see ``perfect_predict``); ``values`` =
    per-node leaf values, K base margins, K scales.
    """
    n_nodes = (nodes.shape[0] - 2 * n_trees - 1) // 2
    packed = nodes[:n_nodes]
    children = nodes[n_nodes : 2 * n_nodes]
    roots = nodes[2 * n_nodes : 2 * n_nodes + n_trees]
    tree_out = nodes[2 * n_nodes + n_trees : 2 * n_nodes + 2 * n_trees]
    zero_mag = np.int32(nodes[-1])
    K = (values.shape[0] - n_nodes) // 2
    leaves = values[:n_nodes]
    base = values[n_nodes : n_nodes + K]
    scale = values[n_nodes + K :]
    out = out_flat.reshape((out_flat.shape[0] // K, K))
    F = U(X.shape[1])
    F2 = U(2) * F
    T = n_trees
    xk = np.empty(F2, np.int32)  # allocates
    _start_rows(out, begin, end, base, scale)
    for r in range(begin, end):
        _row_keys(X, r, xk, U(0), F, zero_mag)
        for t in range(T):
            i = roots[t]
            while children[i] != 0:
                i = children[i] + _step(packed, i, xk, U(0))
            out[r, tree_out[t]] += leaves[i]
    _finish_rows(out, begin, end, base, scale, post, alpha)


class NumbaPredictor:
    """Scores a ``FlatForest`` with the jitted kernels. Thread-safe for disjoint row ranges."""

    name = "numba"

    def __init__(self, forest: FlatForest) -> None:
        self.forest = forest
        self.n_features = forest.n_features
        self.n_outputs = forest.n_outputs
        self.out_dtype = forest.leaves.dtype
        f = forest
        u64 = np.uint64
        zero = np.array([f.zero_mag], dtype=u64)
        if f.depth >= 0:
            parts = [f.packed, f.tree_out.astype(u64), zero]
            self._kernel = perfect_kernel(f.depth)
        else:
            parts = [f.packed, f.children, f.roots, f.tree_out, zero]
            parts = [p.astype(u64) for p in parts]
            self._kernel = explicit_predict
        self._nodes = np.ascontiguousarray(np.concatenate(parts), dtype=u64)
        self._values = np.ascontiguousarray(
            np.concatenate([f.leaves, f.base, f.scale]), dtype=self.out_dtype
        )
        self._n_trees = f.n_trees
        self._post = f.post
        self._alpha = f.alpha
        self._call: Any = self._kernel

    def predict_into(
        self, X: np.ndarray, out: np.ndarray, begin: int, end: int, margin: bool
    ) -> None:
        """Score rows [begin, end) of X (float32, C order, (n, F)) into flat out (n * K).

        Releases the GIL. The caller guarantees the dtypes and C order (Model.predict does):
        after ``warm_up`` the call skips numba's type dispatch.
        """
        self._call(
            self._nodes,
            self._values,
            self._n_trees,
            0 if margin else self._post,
            self._alpha,
            X,
            begin,
            end,
            out,
        )

    def bind(self, margin: bool) -> Any:
        """``run(X, begin, end, out)`` with every model argument pre-bound (the hot path).

        A ``functools.partial`` of the typed entry point: no Python frame between the caller and
        the kernel.
        """
        post = 0 if margin else self._post
        args = (self._nodes, self._values, self._n_trees, post, self._alpha)
        return functools.partial(self._call, *args)

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) the kernel, then bind its typed entry point."""
        x = np.zeros((8, self.n_features), dtype=np.float32)
        out = np.empty(8 * self.n_outputs, dtype=self.out_dtype)
        args = (self._nodes, self._values, self._n_trees, 1, 1.0, x, 0, 8, out)
        self._kernel(*args)
        # the typed entry point skips argument type dispatch (~0.2 us a call)
        self._call = _entry_point(self._kernel, args)


def _entry_point(kernel: Any, args: tuple[Any, ...]) -> Any:
    """The compiled overload for ``args``' types (skips dispatch), or the dispatcher itself."""
    overload = kernel.overloads.get(tuple(numba.typeof(a) for a in args))
    return overload.entry_point if overload is not None else kernel


def warm_kernels(depths: range = range(PERFECT_MAX_DEPTH + 1)) -> None:
    """Compile every kernel into numba's on-disk cache (run once after install: ~1 min)."""
    x = np.zeros((8, 2), dtype=np.float32)
    for dtype in (np.float32, np.float64):
        out = np.empty(8, dtype=dtype)
        for depth in depths:
            n_leaves = 1 << depth
            values = np.zeros(n_leaves + 2, dtype=dtype)  # one tree: leaves, base, scale
            nodes = np.zeros(n_leaves - 1 + 2, dtype=np.uint64)  # nodes, output column, zero
            kernel = perfect_kernel(depth)
            for rows in (1, 8):
                kernel(nodes, values, 1, 1, 1.0, x, 0, rows, out)
        values = np.zeros(1 + 2, dtype=dtype)  # explicit layout: one leaf node
        nodes = np.zeros(5, dtype=np.uint64)  # packed, child, root, output column, zero
        explicit_predict(nodes, values, 1, 1, 1.0, x, 0, 8, out)


if __name__ == "__main__":
    warm_kernels()
