"""Polynomials of degree <= 1 in the carried states, over atomic indices.

A state-dependent value is a sum of einsum monomials (Einstein convention: an
index that is not one of the value's free indices is summed)::

    value[free] = sum_m  coef_m * prod_f factor_f[idx_f] ** power_f * S_m[idx_S]

Every tensor dim holds a tuple of *atomic indices* (a dim merged by a ``view``
holds two, a size-1 dim holds none), so einsum's trace form survives::

    before:  %v = view(permute(S, [0, 1, 3, 2]), [6, 5, 4]); %k1 = view(k', [6, 4, 1])
             %bmm = bmm(%v, %k1); %o = view(%bmm, [2, 3, 5])
    after:   o = Poly(dims=((b,), (h,), (j,)),
                      monos=(Mono(1.0, (Factor(k, 1, (2, 3, 4), (b, h, c)),), S0[b, h, c, j]),))

Atoms always have size >= 2; a monomial need not carry every free atom
(it is then constant, i.e. broadcast, along it).  Atoms are unique ints of one
``Space``; every *use* of a value gets a fresh copy (``freshen``), so names
never capture.  ``align`` unifies the dims of several operands by renaming,
merging adjacent atoms of factors, or splitting atoms of factors (never of a
state: the state's atoms are fixed, one per dim).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from nlcompile.ir import Factor

Dims = tuple[tuple[int, ...], ...]


class NonPoly(Exception):
    """A value leaves the degree <= 1 polynomials; ``linear`` if it is still linear."""

    def __init__(self, reason: str, linear: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.linear = linear


@dataclass(frozen=True)
class StateRef:
    """State ``state`` read ``when`` ("before" = S_{t-1}, "after" = S_t), one atom per state atom."""

    state: int
    when: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Mono:
    coef: float
    factors: tuple[Factor, ...] = ()
    state: StateRef | None = None

    def atoms(self) -> set[int]:
        out = {i for f in self.factors for i in f.indices}
        if self.state is not None:
            out.update(self.state.indices)
        return out


@dataclass(frozen=True)
class Poly:
    dims: Dims
    monos: tuple[Mono, ...]

    @property
    def free(self) -> set[int]:
        return {a for d in self.dims for a in d}

    @property
    def degree(self) -> int:
        return int(any(m.state is not None for m in self.monos))


class Space:
    """Allocates atomic indices and remembers their sizes."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}

    def fresh(self, size: int) -> int:
        atom = len(self.sizes)
        self.sizes[atom] = size
        return atom

    def dims_for(self, shape: Sequence[int]) -> Dims:
        return tuple((self.fresh(int(s)),) if int(s) != 1 else () for s in shape)

    def factor(self, node: str, shape: Sequence[int], power: int = 1) -> Poly:
        """An opaque node as a one-factor poly with fresh atoms (size-1 dims dropped)."""
        dims = self.dims_for(shape)
        idx = tuple(a for d in dims for a in d)
        fac = Factor(node, power, tuple(self.sizes[a] for a in idx), idx)
        return Poly(dims, (Mono(1.0, (fac,)),))

    def constant(self, shape: Sequence[int], value: float) -> Poly:
        return Poly(self.dims_for(shape), (Mono(float(value)),) if value != 0 else ())

    def size(self, atoms: Iterable[int]) -> int:
        return math.prod(self.sizes[a] for a in atoms)


# ---------------------------------------------------------------- transforms
def substitute(p: Poly, sub: dict[int, tuple[int, ...]], space: Space) -> Poly:
    """Replace atoms by tuples of atoms (rename: 1-tuples, split: longer).  States may only be renamed."""
    def tup(t):
        return tuple(x for a in t for x in sub.get(a, (a,)))

    def fac(f: Factor) -> Factor:
        idx = tup(f.indices)
        return Factor(f.node, f.power, tuple(space.sizes[a] for a in idx), idx)

    def mono(m: Mono) -> Mono:
        st = m.state
        if st is not None:
            idx = tup(st.indices)
            if len(idx) != len(st.indices):
                raise NonPoly("would split an atomic dim of state %d" % st.state, linear=True)
            st = StateRef(st.state, st.when, idx)
        return Mono(m.coef, tuple(fac(f) for f in m.factors), st)

    return Poly(tuple(tup(d) for d in p.dims), tuple(mono(m) for m in p.monos))


def rename_all(p: Poly, mapping: dict[int, int], space: Space) -> Poly:
    return substitute(p, {a: (b,) for a, b in mapping.items()}, space)


def freshen(p: Poly, space: Space) -> Poly:
    """A copy with every atom (free and summed) renamed to a new one."""
    atoms = set(p.free).union(*(m.atoms() for m in p.monos)) if p.monos else set(p.free)
    return rename_all(p, {a: space.fresh(space.sizes[a]) for a in sorted(atoms)}, space)


def _merge_tuple(t: tuple[int, ...], group: tuple[int, ...], new: int) -> tuple[int, ...] | None:
    hit = [i for i, a in enumerate(t) if a in group]
    if not hit:
        return t
    start = hit[0]
    if tuple(t[start:start + len(group)]) != group or len(hit) != len(group):
        return None
    return t[:start] + (new,) + t[start + len(group):]


def merge(p: Poly, group: tuple[int, ...], new: int, space: Space) -> Poly | None:
    """Merge adjacent atoms ``group`` into ``new`` everywhere, or None when some factor splits them."""
    monos = []
    for m in p.monos:
        if m.state is not None and set(m.state.indices) & set(group):
            return None
        facs = []
        for f in m.factors:
            idx = _merge_tuple(f.indices, group, new)
            if idx is None:
                return None
            facs.append(Factor(f.node, f.power, tuple(space.sizes[a] for a in idx), idx))
        monos.append(Mono(m.coef, tuple(facs), m.state))
    dims = tuple(_merge_tuple(d, group, new) for d in p.dims)
    if any(d is None for d in dims):
        return None
    return Poly(dims, tuple(monos))


# ---------------------------------------------------------------- alignment
def _prefixes(atoms: Sequence[int], space: Space) -> list[int]:
    out, acc = [], 1
    for a in atoms:
        acc *= space.sizes[a]
        out.append(acc)
    return out


def _segments(a: tuple[int, ...], b: tuple[int, ...], space: Space):
    """Split two factorisations of one size at their common boundaries."""
    common = set(_prefixes(a, space)) & set(_prefixes(b, space))
    out, ia, ib = [], 0, 0
    for bound in sorted(common):
        ja, jb = ia, ib
        while math.prod(space.sizes[x] for x in a[:ja]) != bound:
            ja += 1
        while math.prod(space.sizes[x] for x in b[:jb]) != bound:
            jb += 1
        out.append((a[ia:ja], b[ib:jb]))
        ia, ib = ja, jb
    return out


def _refinement(seg: tuple[int, ...], bounds: set[int], space: Space) -> dict[int, tuple[int, ...]]:
    sub, lo = {}, 1
    for a in seg:
        hi = lo * space.sizes[a]
        cuts = sorted(x for x in bounds if lo < x < hi)
        if cuts:
            pieces, prev = [], lo
            for c in cuts + [hi]:
                if c % prev:
                    raise NonPoly("cannot align a reshaped dim", linear=True)
                pieces.append(space.fresh(c // prev))
                prev = c
            sub[a] = tuple(pieces)
        lo = hi
    return sub


class Workspace:
    """Operands being aligned; every transform is applied to all of them (atoms are unique)."""

    def __init__(self, space: Space, polys: Sequence[Poly]):
        self.space, self.polys, self.table = space, list(polys), {}

    def _subst(self, sub: dict[int, tuple[int, ...]]) -> None:
        self.polys = [substitute(p, sub, self.space) for p in self.polys]
        self.table = {k: tuple(x for a in v for x in sub.get(a, (a,))) for k, v in self.table.items()}

    def _merge(self, group: tuple[int, ...]) -> tuple[int, ...] | None:
        """Merge ``group`` into one new atom in every operand; None (nothing changed) if impossible."""
        if len(group) < 2:
            return group
        new = self.space.fresh(self.space.size(group))
        merged = [merge(p, group, new, self.space) for p in self.polys]
        if any(m is None for m in merged):
            return None
        self.polys = merged
        self.table = {k: _merge_tuple(v, group, new) for k, v in self.table.items()}
        return (new,)

    def _can_merge(self, group: tuple[int, ...]) -> bool:
        if len(group) < 2:
            return True
        new = self.space.fresh(self.space.size(group))
        return all(merge(p, group, new, self.space) is not None for p in self.polys)

    def unify(self, a: tuple[int, ...], b: tuple[int, ...]) -> None:
        """Make atom tuples ``a`` and ``b`` (same total size) the same atoms.

        Per common segment: equal atom sizes are renamed; otherwise both sides are
        merged into one atom when every factor carries them adjacently, else split
        to their common refinement (a state's atom is never split).
        """
        for sa, sb in _segments(a, b, self.space):
            if [self.space.sizes[x] for x in sa] != [self.space.sizes[x] for x in sb]:
                if self._can_merge(sa) and self._can_merge(sb):
                    sa, sb = self._merge(sa), self._merge(sb)
                    if sa is None or sb is None:
                        raise NonPoly("cannot align a reshaped dim", linear=True)
                else:
                    bounds = set(_prefixes(sa, self.space)) | set(_prefixes(sb, self.space))
                    sub = {**_refinement(sa, bounds, self.space), **_refinement(sb, bounds, self.space)}
                    self._subst(sub)
                    sa = tuple(x for t in sa for x in sub.get(t, (t,)))
                    sb = tuple(x for t in sb for x in sub.get(t, (t,)))
            self._subst({y: (x,) for x, y in zip(sa, sb) if x != y})

    def bind(self, letter: str, atoms: tuple[int, ...]) -> None:
        if not atoms:
            return
        if letter in self.table:
            self.unify(self.table[letter], atoms)
        else:
            self.table[letter] = atoms


def _align(space: Space, operands: Sequence[tuple[Poly, str]]) -> Workspace:
    ws = Workspace(space, [p for p, _ in operands])
    for i, (_, letters) in enumerate(operands):
        for d, letter in enumerate(letters):
            ws.bind(letter, ws.polys[i].dims[d])
    return ws


def _sum_atoms(monos: Iterable[Mono], atoms: set[int], space: Space) -> tuple[Mono, ...]:
    """Sum over ``atoms``: an atom a monomial does not carry multiplies it by its size."""
    out = []
    for m in monos:
        missing = atoms - m.atoms()
        out.append(replace(m, coef=m.coef * space.size(missing)))
    return tuple(out)


def _times(monos: Sequence[Mono]) -> Mono:
    states = [m.state for m in monos if m.state is not None]
    if len(states) > 1:
        raise NonPoly("multiplies two state-dependent values (degree 2)")
    return Mono(math.prod(m.coef for m in monos), tuple(f for m in monos for f in m.factors),
                states[0] if states else None)


def product(space: Space, operands: Sequence[tuple[Poly, str]], out: str) -> Poly:
    """Einsum of polys: operand dims named by letters, letters not in ``out`` are summed."""
    ws = _align(space, operands)
    dims = tuple(ws.table.get(c, ()) for c in out)
    summed = {a for c, atoms in ws.table.items() if c not in out for a in atoms}
    monos = [_times(ms) for ms in itertools.product(*(p.monos for p in ws.polys))]
    return Poly(dims, _sum_atoms(monos, summed, space))


def lincomb(space: Space, operands: Sequence[tuple[Poly, str, float]], out: str) -> Poly:
    """sum_i scale_i * operand_i, broadcast to the dims named by ``out``."""
    ws = _align(space, [(p, s) for p, s, _ in operands])
    dims = tuple(ws.table.get(c, ()) for c in out)
    monos = tuple(replace(m, coef=m.coef * c) for p, (_, _, c) in zip(ws.polys, operands) for m in p.monos)
    return simplify(Poly(dims, monos))


def scale(p: Poly, c: float) -> Poly:
    return simplify(Poly(p.dims, tuple(replace(m, coef=m.coef * c) for m in p.monos)))


def invert(p: Poly) -> Poly:
    """1 / p for a one-monomial state-free p (factor powers negated)."""
    if len(p.monos) != 1 or p.monos[0].state is not None or p.monos[0].coef == 0:
        raise NonPoly("divides by a state-dependent or zero value")
    m = p.monos[0]
    facs = tuple(replace(f, power=-f.power) for f in m.factors)
    return Poly(p.dims, (Mono(1.0 / m.coef, facs),))


def simplify(p: Poly) -> Poly:
    """Merge monomials with the same factors and state; drop zero ones."""
    acc: dict = {}
    for m in p.monos:
        key = (tuple(sorted(m.factors, key=repr)), m.state)
        acc[key] = acc.get(key, 0.0) + m.coef
    return Poly(p.dims, tuple(Mono(c, f, s) for (f, s), c in acc.items() if c != 0))


# ---------------------------------------------------------------- structure
def letters(n: int) -> str:
    return "".join(chr(ord("a") + i) for i in range(n))


def broadcast_letters(ndim: int, out_ndim: int) -> str:
    return letters(out_ndim)[out_ndim - ndim:]


def view(p: Poly, shape: Sequence[int], space: Space) -> Poly:
    """Regroup atoms (memory order) into ``shape``, splitting an atom where a dim boundary cuts it."""
    atoms = [a for d in p.dims for a in d]
    dims, i = [], 0
    for s in (int(x) for x in shape):
        group, acc = [], 1
        while acc < s:
            if i >= len(atoms):
                raise NonPoly("view does not match the atoms", linear=True)
            a = atoms[i]
            n = space.sizes[a]
            if acc * n <= s:
                group.append(a)
                acc, i = acc * n, i + 1
                continue
            if s % acc or n % (s // acc):
                raise NonPoly("view cuts an atomic dim unevenly", linear=True)
            parts = (space.fresh(s // acc), space.fresh(n * acc // s))
            p = substitute(p, {a: parts}, space)
            atoms[i:i + 1] = list(parts)
        if acc != s:
            raise NonPoly("view does not match the atoms", linear=True)
        dims.append(tuple(group))
    return Poly(tuple(dims), p.monos)


def permute(p: Poly, perm: Sequence[int]) -> Poly:
    n = len(p.dims)
    return Poly(tuple(p.dims[d % n] for d in perm), p.monos)


def expand(p: Poly, shape: Sequence[int], space: Space) -> Poly:
    """Broadcast size-1 dims (and new leading dims) to ``shape`` with fresh atoms no monomial carries."""
    lead = len(shape) - len(p.dims)
    dims = []
    for j, s in enumerate(int(x) for x in shape):
        old = p.dims[j - lead] if j >= lead else ()
        dims.append(old if old or s == 1 else (space.fresh(s),))
    return Poly(tuple(dims), p.monos)


def reduce_sum(p: Poly, axes: Sequence[int] | None, keepdim: bool, space: Space) -> Poly:
    n = len(p.dims)
    axes = set(range(n)) if not axes else {a % n for a in axes}
    summed = {a for d in axes for a in p.dims[d]}
    dims = tuple(() if d in axes else p.dims[d] for d in range(n) if keepdim or d not in axes)
    return simplify(Poly(dims, _sum_atoms(p.monos, summed, space)))


def transpose(p: Poly, d0: int = 0, d1: int = 1) -> Poly:
    n = len(p.dims)
    if n < 2:
        return p
    perm = list(range(n))
    perm[d0 % n], perm[d1 % n] = d1 % n, d0 % n
    return permute(p, perm)


def unsqueeze(p: Poly, d: int) -> Poly:
    d %= len(p.dims) + 1
    return Poly(p.dims[:d] + ((),) + p.dims[d:], p.monos)


def squeeze(p: Poly, axes: int | Sequence[int] | None) -> Poly:
    """Drop size-1 dims among ``axes`` (all when None); dims of size > 1 stay, as in torch."""
    n = len(p.dims)
    axes = range(n) if axes is None else [axes] if isinstance(axes, int) else axes
    drop = {a % n for a in axes} if n else set()
    return Poly(tuple(d for i, d in enumerate(p.dims) if d or i not in drop), p.monos)
