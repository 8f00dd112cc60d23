"""Pipeline schedules as data: a table of (tick, stage) -> op, built on the host.

The layers split into C = S·v chunks (S stages, v virtual stages); chunk c runs on stage c % S as
that stage's virtual chunk j = c // S. Each stage executes its ops in the schedule's order, an op
as soon as its input arrived (one tick after the producing op): GPipe runs every forward, then
every backward; 1F1B starts backwards as early as possible so a stage holds at most S
microbatches in flight; interleaved 1F1B (Megatron) cycles each stage through its v chunks in
groups of S microbatches, dividing the bubble by v. Zero bubble ZB-H1 (Qi et al., 2023) splits
each backward into its input gradient (I, sent on at once) and its weight gradient (W, which
waits): 1F1B's order of forwards and input gradients, a stage running a pending W whenever its
next op cannot run yet or another forward would hold more than S microbatches in flight (1F1B's
peak, on its first stage); W's fill the bubble to (S-1)/(3M+S-1).
A tick is one forward, backward, I or W. llm.parallel.pipeline executes the table.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1")
SPLIT_BACKWARD = ("zb_h1",)  # schedules whose backwards are I then W

# Op kinds of the table: a phase (F forward, B backward, I its input gradient, W its weight
# gradient) of a chunk that is "first" (c = 0: embeds the tokens), "last" (c = C-1: ends in the
# loss) or "mid"; each chunk kind has its own pool of activation slots on a stage.
PHASES = ("F", "B", "I", "W")
POOLS = ("first", "mid", "last")
IDLE, F_FIRST, F_MID, F_LAST, B_FIRST, B_MID, B_LAST = range(7)
I_FIRST, I_MID, I_LAST, W_FIRST, W_MID, W_LAST = range(7, 13)


KINDS = range(1 + len(PHASES) * len(POOLS))


def kind_of(phase: str, pool: str) -> int:
    return 1 + len(POOLS) * PHASES.index(phase) + POOLS.index(pool)


def phase_and_pool(kind: int) -> tuple[str, str]:
    """The inverse of `kind_of` (kind != IDLE)."""
    return PHASES[(kind - 1) // len(POOLS)], POOLS[(kind - 1) % len(POOLS)]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The table of one schedule. Every array is int32[ticks, stages]:

    kind: the op (IDLE, `kind_of(phase, pool)`); micro: its microbatch; chunk: its virtual chunk
    j; slot: its slot in the pool of its chunk's kind, held from its input's arrival to its
    backward (its W when split). recv_x_mid / recv_x_last: the slot an activation
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
        """Idle share of the stage-ticks (a forward, backward, I or W counts one tick each)."""
        return float(np.mean(self.tables["kind"] == IDLE))

    def max_in_flight(self) -> int:
        """Most microbatch-chunks any stage holds between their forward and backward (W)."""
        return sum(self.pool_sizes.values())


def op_orders(name: str, stages: int, microbatches: int, virtual: int) -> list[list[tuple]]:
    """Per stage, its forwards and backwards (input gradients when split) in order: (phase,
    microbatch, virtual chunk j); a split schedule's W ops are placed by `build`."""
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
        elif name in ("1f1b", "zb_h1"):
            warmup = min(s_ - s - 1, total)
        else:
            warmup = min((s_ - s - 1) * 2 + (v - 1) * s_, total)
        back = "I" if name in SPLIT_BACKWARD else "B"
        ops = [("F", *fwd(k)) for k in range(warmup)]
        for i in range(total - warmup):
            ops += [("F", *fwd(warmup + i)), (back, *bwd(i))]
        ops += [(back, *bwd(k)) for k in range(total - warmup, total)]
        orders.append(ops)
    return orders


def build(name: str, stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """The table of schedule `name` (SCHEDULES): each stage runs its next op once its inputs are
    there (split schedules: a pending W when it cannot, or before a forward that would hold
    more than S microbatches in flight); the activation slots are assigned from arrival to
    backward (W)."""
    chunks = stages * virtual
    orders = op_orders(name, stages, microbatches, virtual)
    back = "I" if name in SPLIT_BACKWARD else "B"
    done: dict[tuple, int] = {}  # (phase, m, c) -> tick
    pointer = [0] * stages
    pending: list[list[tuple]] = [[] for _ in range(stages)]  # W ops to run, oldest first
    in_flight = [0] * stages  # forwards whose W has not run (split schedules)
    rows = []
    while any(p < len(o) for p, o in zip(pointer, orders)) or any(pending):
        t, row = len(rows), []
        if t > 4 * (3 * len(orders[0]) + chunks):
            raise AssertionError(f"schedule {name} deadlocks at tick {t}")
        for s in range(stages):
            op = None
            if pointer[s] < len(orders[s]):
                phase, m, j = orders[s][pointer[s]]
                c = j * stages + s
                need = ("F", m, c - 1) if phase == "F" else (back, m, c + 1)
                edge = c == 0 if phase == "F" else c == chunks - 1
                full = phase == "F" and in_flight[s] >= stages and pending[s]
                if (edge or done.get(need, t) < t) and not full:
                    op = (phase, m, c)
                    pointer[s] += 1
            if op is None and pending[s]:
                op = pending[s].pop(0)
            if op is not None and back == "I":
                in_flight[s] += {"F": 1, "I": 0, "W": -1}[op[0]]
                if op[0] == "I":
                    pending[s].append(("W", *op[1:]))
            row.append(op)
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
    # producing forward; its own forward for c = 0) to its backward (its W when split).
    last = "W" if name in SPLIT_BACKWARD else "B"
    live = {}
    for m in range(microbatches):
        for c in range(chunks):
            start = done[("F", m, c - 1)] if c else done[("F", m, 0)]
            live[(m, c)] = (start, done[(last, m, c)])
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
            phase, m, c = op
            kind = kind_of(phase, _pool(c, chunks))
            for n, value in (
                ("kind", kind),
                ("micro", m),
                ("chunk", c // stages),
                ("slot", slots[(m, c)]),
            ):
                tables[n][t, s] = value
            if phase == "F" and c < chunks - 1:  # the activation arrives at the stage of c + 1
                target = f"recv_x_{_pool(c + 1, chunks)}"
                tables[target][t, (c + 1) % stages] = slots[(m, c + 1)]
            if phase in ("B", "I") and c > 0:  # the gradient arrives at the stage of c - 1
                target = f"recv_dy_{_pool(c - 1, chunks)}"
                tables[target][t, (c - 1) % stages] = slots[(m, c - 1)]
    return Schedule(name, stages, microbatches, virtual, tables, sizes)
