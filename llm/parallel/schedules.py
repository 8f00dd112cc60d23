"""Pipeline schedules as data: a table of (tick, stage) -> op, built on the host.

The layers split into C = S·v chunks (S stages, v virtual stages); chunk c runs on stage c % S as
that stage's virtual chunk j = c // S. Each stage executes its ops in the schedule's order, an op
as soon as its input arrived (one tick after the producing op): GPipe runs every forward, then
every backward; 1F1B starts backwards as early as possible so a stage holds at most S
microbatches in flight; interleaved 1F1B (Megatron) cycles each stage through its v chunks in
groups of S microbatches, dividing the bubble by v. llm.parallel.pipeline executes the table.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")

# Op kinds of the table. A chunk is "first" (c = 0: embeds the tokens), "last" (c = C-1: ends in
# the loss) or "mid"; each kind has its own pool of activation slots on a stage.
IDLE, F_FIRST, F_MID, F_LAST, B_FIRST, B_MID, B_LAST = range(7)
POOLS = ("first", "mid", "last")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The table of one schedule. Every array is int32[ticks, stages]:

    kind: the op (IDLE, F_*, B_*); micro: its microbatch; chunk: its virtual chunk j; slot: its
    slot in the pool of its chunk's kind. recv_x_mid / recv_x_last: the slot an activation
    arriving from the previous stage at the end of the tick goes to (pool size = none arrives);
    recv_dy_first / recv_dy_mid: the same for a gradient arriving from the next stage.
    """

    name: str
    stages: int
    microbatches: int
    virtual_stages: int
    tables: dict[str, np.ndarray]
    pool_sizes: dict[str, int]  # slots per stage of each pool ("first", "mid", "last")

    @property
    def ticks(self) -> int:
        return self.tables["kind"].shape[0]

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the stage-ticks (a forward and a backward count one tick each)."""
        return float(np.mean(self.tables["kind"] == IDLE))

    def max_in_flight(self) -> int:
        """Most microbatch-chunks any stage holds between their forward and backward."""
        return sum(self.pool_sizes.values())


def op_orders(name: str, stages: int, microbatches: int, virtual: int) -> list[list[tuple]]:
    """Per stage, its ops in order: (is_forward, microbatch, virtual chunk j)."""
    s_, m_, v = stages, microbatches, virtual
    total = m_ * v

    def fwd(k):  # k-th forward of a stage: microbatches in groups of S, chunks cycled per group
        return k // (s_ * v) * s_ + k % s_, k % (s_ * v) // s_

    def bwd(k):
        m, j = fwd(k)
        return m, v - 1 - j

    orders = []
    for s in range(s_):
        if name == "gpipe":
            warmup = total
        elif name == "1f1b":
            warmup = min(s_ - s - 1, total)
        else:
            warmup = min((s_ - s - 1) * 2 + (v - 1) * s_, total)
        ops = [(True, *fwd(k)) for k in range(warmup)]
        for i in range(total - warmup):
            ops += [(True, *fwd(warmup + i)), (False, *bwd(i))]
        ops += [(False, *bwd(k)) for k in range(total - warmup, total)]
        orders.append(ops)
    return orders


def build(name: str, stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """The table of schedule `name` (SCHEDULES): each stage runs its next op once its inputs are
    there; the activation slots are assigned from arrival to backward."""
    chunks = stages * virtual
    orders = op_orders(name, stages, microbatches, virtual)
    done: dict[tuple, int] = {}  # (is_forward, m, c) -> tick
    pointer = [0] * stages
    rows = []
    while any(p < len(o) for p, o in zip(pointer, orders)):
        t, row = len(rows), []
        if t > 4 * (len(orders[0]) + chunks):
            raise AssertionError(f"schedule {name} deadlocks at tick {t}")
        for s in range(stages):
            if pointer[s] == len(orders[s]):
                row.append(None)
                continue
            forward, m, j = orders[s][pointer[s]]
            c = j * stages + s
            need = (True, m, c - 1) if forward else (False, m, c + 1)
            edge = c == 0 if forward else c == chunks - 1
            if edge or done.get(need, t) < t:
                row.append((forward, m, c))
                pointer[s] += 1
            else:
                row.append(None)
        for op in row:
            if op is not None:
                done[op] = t
        rows.append(row)
    return _tabulate(name, stages, microbatches, virtual, rows, done)


def _pool(c: int, chunks: int) -> str:
    return "first" if c == 0 else "last" if c == chunks - 1 else "mid"


def _tabulate(name, stages, microbatches, virtual, rows, done) -> Schedule:
    """The arrays of `rows` ([tick][stage] -> (is_forward, m, c) or None), with slots."""
    chunks = stages * virtual
    # Each (m, c) holds a slot of its pool on its stage from its input's arrival (the tick of the
    # producing forward; its own forward for c = 0) to its backward.
    live = {}
    for m in range(microbatches):
        for c in range(chunks):
            start = done[(True, m, c - 1)] if c else done[(True, m, 0)]
            live[(m, c)] = (start, done[(False, m, c)])
    slots, sizes = {}, dict.fromkeys(POOLS, 0)
    for s in range(stages):
        for pool in POOLS:
            free_at: list[int] = []  # per slot, the tick after which it is free
            mine = [k for k in live if k[1] % stages == s and _pool(k[1], chunks) == pool]
            for key in sorted(mine, key=lambda k: live[k]):
                start, end = live[key]
                slot = next((i for i, f in enumerate(free_at) if f < start), len(free_at))
                free_at[slot : slot + 1] = [end]
                slots[key] = slot
            sizes[pool] = max(sizes[pool], len(free_at))
    ticks = len(rows)
    names = [
        "kind",
        "micro",
        "chunk",
        "slot",
        "recv_x_mid",
        "recv_x_last",
        "recv_dy_first",
        "recv_dy_mid",
    ]
    tables = {n: np.zeros((ticks, stages), np.int32) for n in names}
    for n, pool in (
        ("recv_x_mid", "mid"),
        ("recv_x_last", "last"),
        ("recv_dy_first", "first"),
        ("recv_dy_mid", "mid"),
    ):
        tables[n][:] = sizes[pool]  # the spare slot: nothing arrives
    for t, row in enumerate(rows):
        for s, op in enumerate(row):
            if op is None:
                continue
            forward, m, c = op
            pool = _pool(c, chunks)
            kind = (F_FIRST, F_MID, F_LAST)[POOLS.index(pool)] + (0 if forward else 3)
            for n, value in (
                ("kind", kind),
                ("micro", m),
                ("chunk", c // stages),
                ("slot", slots[(m, c)]),
            ):
                tables[n][t, s] = value
            if forward and c < chunks - 1:  # the activation arrives at the stage of c + 1
                target = f"recv_x_{_pool(c + 1, chunks)}"
                tables[target][t, (c + 1) % stages] = slots[(m, c + 1)]
            if not forward and c > 0:  # the gradient arrives at the stage of c - 1
                target = f"recv_dy_{_pool(c - 1, chunks)}"
                tables[target][t, (c - 1) % stages] = slots[(m, c - 1)]
    return Schedule(name, stages, microbatches, virtual, tables, sizes)
