"""Sequence-parallel rank math shared by the exporter and the runtime (pure Python, no process group).

`TokenShard`: which contiguous tokens of a chunk a rank holds. `SPLayout`: how a world of P ranks
factors into Ulysses (heads) x ring (cache tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from ropesp.errors import ConfigError, arg


@dataclass(frozen=True)
class TokenShard:
    """Contiguous split of a chunk's L tokens over P ranks, tail padded to a multiple of P."""

    total: int
    """L, real tokens of the chunk."""
    padded: int
    """L_pad = ceil(L / P) * P."""
    first: int
    """This rank's first token index."""
    length: int
    """L_local = L_pad / P."""

    @classmethod
    def split(cls, total: int, sp_size: int, rank: int) -> TokenShard:
        length = -(-total // sp_size)
        return cls(total=total, padded=length * sp_size, first=rank * length, length=length)


@dataclass(frozen=True)
class SPLayout:
    """World size P = ulysses x ring."""

    ulysses: int
    """U: heads are split over U ranks (must divide the head count)."""
    ring: int
    """R: the cache's tokens are split over R ranks."""

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring

    def coords(self, rank: int) -> tuple[int, int]:
        """(ring index r, Ulysses index u) of a global rank."""
        return divmod(rank, self.ulysses)

    def rank_of(self, ring_index: int, u: int) -> int:
        return (ring_index % self.ring) * self.ulysses + u

    @classmethod
    def choose(
        cls, num_heads: int, world_size: int, ulysses: int | None = None, ring: int | None = None
    ) -> SPLayout:
        """The largest Ulysses degree dividing both the heads and the world size, unless given."""
        if ring is not None and (ring < 1 or world_size % ring):
            raise ConfigError(
                f"{arg('ring_degree', ring)} must be a positive divisor of the world size {world_size}"
            )
        if ulysses is None:
            if ring is not None:
                ulysses = world_size // ring
            else:
                ulysses = max(_common_divisors(world_size, num_heads))
        ring = world_size // ulysses if ring is None else ring
        if ulysses < 1 or ulysses * ring != world_size:
            raise ConfigError(
                f"{arg('ulysses_degree', ulysses)} x {arg('ring_degree', ring)} must equal the world size {world_size}"
            )
        if num_heads % ulysses:
            valid = _common_divisors(world_size, num_heads)
            raise ConfigError(
                f"{arg('ulysses_degree', ulysses)} does not divide the model's {num_heads} attention heads; "
                f"valid Ulysses degrees for world size {world_size}: {valid}"
            )
        return cls(ulysses, ring)


def _common_divisors(world_size: int, num_heads: int) -> list[int]:
    """Divisors of both, ascending (bounded by the heads: a huge world size costs nothing)."""
    return [d for d in range(1, min(world_size, num_heads) + 1) if world_size % d == 0 and num_heads % d == 0]
