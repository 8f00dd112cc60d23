"""Pipeline schedule tables (llm.parallel.schedules), checked by replaying them on the host: every
op once, in dependency order, its input in its slot, the bubble as the formula says (ZB-H1's
weight gradients filling it)."""

import pytest

from llm.parallel import schedules as sc

CASES = [
    (name, s, m, v)
    for name, v in (
        ("gpipe", 1),
        ("1f1b", 1),
        ("interleaved_1f1b", 2),
        ("interleaved_1f1b", 4),
        ("zb_h1", 1),
    )
    for s in (2, 4)
    for m in (s, 2 * s)
]


def replay(table: sc.Schedule):
    """Runs the table with labels for data: each slot holds the (microbatch, chunk) whose
    activation or gradient it received; returns the tick of each op."""
    S, C = table.stages, table.stages * table.virtual_stages
    t_ = table.tables
    x = {(s, p): {} for s in range(S) for p in sc.POOLS}  # received activations
    dy = {(s, p): {} for s in range(S) for p in sc.POOLS}
    stash = {(s, p): {} for s in range(S) for p in sc.POOLS}
    done = {}
    for t in range(table.ticks):
        sent_x, sent_dy = {}, {}
        for s in range(S):
            kind = int(t_["kind"][t, s])
            if kind == sc.IDLE:
                continue
            m, j, slot = (int(t_[k][t, s]) for k in ("micro", "chunk", "slot"))
            c = j * S + s
            phase, pool = sc.phase_and_pool(kind)
            assert pool == ("first" if c == 0 else "last" if c == C - 1 else "mid")
            assert (phase, m, c) not in done
            if phase == "F":
                if c > 0:
                    assert x[s, pool].get(slot) == (m, c), (t, s)
                stash[s, pool][slot] = (m, c)
                sent_x[(s + 1) % S] = (m, c + 1)
            else:  # B, I or W: the activations still in the slot, the gradient received
                assert stash[s, pool][slot] == (m, c)
                if c < C - 1:
                    assert dy[s, pool].get(slot) == (m, c), (t, s)
                if phase != "I":  # B and W free the slot
                    del stash[s, pool][slot]
                if phase != "W":
                    sent_dy[(s - 1) % S] = (m, c - 1)
                else:
                    assert done[("I", m, c)] < t
            done[(phase, m, c)] = t
        for s in range(S):
            for pool, key, sent, buf in (
                ("mid", "recv_x_mid", sent_x, x),
                ("last", "recv_x_last", sent_x, x),
                ("first", "recv_dy_first", sent_dy, dy),
                ("mid", "recv_dy_mid", sent_dy, dy),
            ):
                slot = int(t_[key][t, s])
                if slot < table.pool_sizes[pool]:  # the slot is free, or its own (a gradient)
                    assert (
                        stash[s, pool].get(slot, sent[s]) == sent[s]
                        and buf is dy
                        or (slot not in stash[s, pool])
                    ), "overwrites a live slot"
                    buf[s, pool][slot] = sent[s]
    return done


@pytest.mark.parametrize("name,stages,micro,virtual", CASES)
def test_table_runs_every_op_once_in_order(name, stages, micro, virtual):
    table = sc.build(name, stages, micro, virtual)
    done = replay(table)
    chunks = stages * virtual
    split = name in sc.SPLIT_BACKWARD
    back = "I" if split else "B"
    assert len(done) == (3 if split else 2) * micro * chunks
    for m in range(micro):
        for c in range(chunks):
            assert c == 0 or done[("F", m, c - 1)] < done[("F", m, c)]
            assert c == chunks - 1 or done[(back, m, c + 1)] < done[(back, m, c)]
    if split:  # a tick per F, I and W; the W's fill all but (S-1) ticks of each stage
        assert table.bubble_fraction == pytest.approx((stages - 1) / (3 * micro + stages - 1))
    else:  # GPipe's (S-1)/(M+S-1); interleaving divides the bubble by v.
        want = (stages - 1) / (virtual * micro + stages - 1)
        assert table.bubble_fraction == pytest.approx(want)


@pytest.mark.parametrize("stages", [2, 4])
def test_1f1b_holds_at_most_s_microbatches_gpipe_holds_m(stages):
    micro = 2 * stages
    one_f_one_b = sc.build("1f1b", stages, micro).pool_sizes
    gpipe = sc.build("gpipe", stages, micro).pool_sizes
    assert max(one_f_one_b.values()) == stages
    assert one_f_one_b["last"] == 2  # the last stage: its backward follows each forward
    assert max(gpipe.values()) == micro


@pytest.mark.parametrize("stages", [2, 4])
def test_zb_h1_holds_at_most_s_microbatches_from_forward_to_weight_gradient(stages):
    micro = 4 * stages
    done = replay(sc.build("zb_h1", stages, micro))
    for s in range(stages):
        spans = [(done[("F", m, s)], done[("W", m, s)]) for m in range(micro)]
        for t in range(max(end for _, end in spans)):
            assert sum(start <= t < end for start, end in spans) <= stages
