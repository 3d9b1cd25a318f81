"""The collaborative protocol's pieces: upload selection, clipping, DP budget, download, mod,
and the server's sparse aggregation."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedleak.clients.collaborative_mod import LOCAL_KEY, collaborative_mod
from fedleak.collaborative import (
    LaplaceScales,
    clip,
    download_mask,
    dp_select_upload,
    select_upload,
    upload_count,
)
from fedleak.protocol import DOWNLOAD_MASK as MASK_KEY
from fedleak.server.fleet import Fleet
from fedleak.server.strategies import CollaborativeStrategy
from fedleak.settings import load_federation


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Flower stamps messages with the running task's identity, which a SuperNode sets."""
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in {"_task_id": 1, "_run_id": 1, "_node_id": 7}.items():
        monkeypatch.setattr(TaskIdentity, key, value)


def test_upload_keeps_the_largest_fraction():
    delta = np.array([0.5, -3.0, 0.1, 2.0, -0.2, 0.0, 1.0, -1.5, 0.3, 0.05], dtype=np.float32)
    shared = select_upload(delta, theta_u=0.3, tau=0.0, gamma=0.0)
    assert np.count_nonzero(shared) == 3
    assert set(np.flatnonzero(shared)) == {1, 3, 7}
    assert np.array_equal(shared[[1, 3, 7]], delta[[1, 3, 7]])


def test_upload_threshold_and_clipping():
    delta = np.array([0.5, -3.0, 0.1, 2.0, -0.2], dtype=np.float32)
    shared = select_upload(delta, theta_u=1.0, tau=0.4, gamma=1.0)
    assert set(np.flatnonzero(shared)) == {0, 1, 3}  # |x| >= tau only
    assert shared[1] == -1.0 and shared[3] == 1.0 and shared[0] == 0.5
    assert np.all(np.abs(shared) <= 1.0)
    assert np.array_equal(clip(delta, 0.0), delta)


def test_upload_count_rounds_up_and_is_at_least_one():
    assert upload_count(1000, 0.1) == 100
    assert upload_count(1000, 0.0001) == 1
    assert upload_count(7, 0.5) == 4


def test_laplace_budget_split_is_eight_ninths_to_one_ninth():
    gamma, eps = 0.001, 10.0
    s = LaplaceScales.for_budget(eps, gamma)
    sensitivity = 2 * gamma
    eps_select, eps_release = eps * 8 / 9, eps / 9
    assert s.release == pytest.approx(sensitivity / eps_release)
    assert s.threshold == pytest.approx(2 * sensitivity / eps_select)
    assert s.query == pytest.approx(2 * s.threshold)
    # The release noise is 8x the threshold-only share's: release gets 1/9, selection 8/9 halved.
    assert s.release / s.threshold == pytest.approx(4.0)
    with pytest.raises(ValueError):
        LaplaceScales.for_budget(10.0, 0.0)


def test_dp_upload_respects_count_and_bound():
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 0.01, size=5000).astype(np.float32)
    shared = dp_select_upload(
        delta,
        theta_u=0.1,
        tau=1e-4,
        gamma=1e-3,
        epsilon_per_param=10.0,
        rng=np.random.default_rng(1),
    )
    assert 0 < np.count_nonzero(shared) <= 500
    assert np.all(np.abs(shared) <= 1e-3 + 1e-12)


def test_dp_noise_shrinks_with_budget():
    delta = np.linspace(-1e-3, 1e-3, 4000).astype(np.float32)
    errors = []
    for eps in (0.01, 1e6):
        shared = dp_select_upload(delta, 1.0, 0.0, 1e-3, eps, np.random.default_rng(3))
        chosen = np.flatnonzero(shared)
        errors.append(np.abs(shared[chosen] - delta[chosen]).mean())
    assert errors[1] < 1e-6 < errors[0]


def test_download_mask_prefers_most_updated():
    counts = np.array([0, 5, 1, 9, 0, 3, 7, 2], dtype=float)
    mask = download_mask(counts, theta_d=0.25, rng=np.random.default_rng(0))
    assert set(np.flatnonzero(mask)) == {3, 6}
    assert download_mask(counts, 1.0, np.random.default_rng(0)).all()
    assert download_mask(np.zeros(100), 0.1, np.random.default_rng(0)).sum() == 10


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _train_msg(arrays: dict[str, np.ndarray], mask: dict | None = None, **proto) -> Message:
    config = ConfigRecord(
        {
            "protocol": "collaborative",
            "theta-u": 1.0,
            "tau": 0.0,
            "gamma": 0.0,
            "dp-epsilon": 0.0,
            "server-round": 1,
        }
        | proto
    )
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "config": config}
    )
    if mask is not None:
        content[MASK_KEY] = ArrayRecord({k: Array(v) for k, v in mask.items()})
    return Message(content=content, dst_node_id=7, message_type="train")


def _trainer(step: float):
    """A ClientApp stand-in that adds `step` to every parameter and records what it got."""
    seen = {}

    def call_next(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()
        seen["in"] = arrays
        out = ArrayRecord({k: Array(a + step) for k, a in zip(["w"], arrays, strict=True)})
        metrics = MetricRecord({"train-loss": 0.5, "num-examples": 10})
        return Message(content=RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    return call_next, seen


def test_mod_uploads_the_update_not_the_weights():
    ctx = _context()
    call_next, _ = _trainer(0.25)
    reply = collaborative_mod(_train_msg({"w": np.ones(4, np.float32)}), ctx, call_next)
    shared = reply.content.array_records["arrays"]["w"].numpy()
    assert np.allclose(shared, 0.25)
    assert np.allclose(ctx.state.array_records[LOCAL_KEY]["w"].numpy(), 1.25)
    assert reply.content.metric_records["metrics"]["uploaded-fraction"] == 1.0


def test_mod_merges_partial_download_with_local_model():
    ctx = _context()
    ctx.state[LOCAL_KEY] = ArrayRecord({"w": Array(np.full(4, 5.0, np.float32))})
    call_next, seen = _trainer(0.0)
    mask = {"w": np.array([True, False, True, False])}
    collaborative_mod(_train_msg({"w": np.zeros(4, np.float32)}, mask), ctx, call_next)
    assert np.array_equal(seen["in"][0], [0.0, 5.0, 0.0, 5.0])


def test_mod_passes_other_protocols_through():
    ctx = _context()
    call_next, _ = _trainer(0.25)
    msg = _train_msg({"w": np.ones(2, np.float32)})
    msg.content["config"]["protocol"] = "fedavg"
    reply = collaborative_mod(msg, ctx, call_next)
    assert np.allclose(reply.content.array_records["arrays"]["w"].numpy(), 1.25)


def _reply(delta: np.ndarray, to: Message) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(delta)}),
            "metrics": MetricRecord({"train-loss": 1.0, "num-examples": 3}),
        }
    )
    return Message(content=content, reply_to=to)


def _strategy(theta_d: float = 1.0) -> CollaborativeStrategy:
    settings = load_federation("smoke", [f"protocol.theta-d={theta_d}"])
    return CollaborativeStrategy(Fleet(1, 1, 1), settings)


def test_strategy_applies_sparse_update_and_rejects_nan():
    strategy = _strategy()
    strategy.current = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    sent = _train_msg({"w": np.ones(3, np.float32)})
    arrays, metrics = strategy.aggregate_train(
        1, [_reply(np.array([0.5, 0, -1], np.float32), sent)]
    )
    assert np.allclose(arrays["w"].numpy(), [1.5, 1.0, 0.0])
    assert np.array_equal(strategy.update_counts["w"], [1, 0, 1])
    assert metrics["train-loss"] == 1.0
    bad = _reply(np.array([np.nan, 0, 0], np.float32), sent)
    arrays, _ = strategy.aggregate_train(2, [bad])
    assert arrays is None
    assert ["NaN" in r["reason"] for r in strategy.last_round["rejected"]] == [True]


class _Grid:
    """The one Grid method the strategy's node selection reads."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def test_partial_download_after_first_turn_and_resync():
    strategy = _strategy(theta_d=0.5)
    weights = ArrayRecord({"w": Array(np.arange(1, 9, dtype=np.float32))})
    grid = _Grid([7])
    first = list(strategy.configure_train(1, weights, ConfigRecord(), grid))[0]
    assert MASK_KEY not in first.content.array_records  # everyone starts from the same model
    update = np.array([1, 0, 1, 0, 1, 0, 1, 0], np.float32)
    weights, _ = strategy.aggregate_train(1, [_reply_w(update, first)])
    second = list(strategy.configure_train(2, weights, ConfigRecord(), grid))[0]
    mask = second.content.array_records[MASK_KEY]["w"].numpy()
    assert mask.sum() == 4 and np.array_equal(np.flatnonzero(mask), [0, 2, 4, 6])  # most updated
    sent = second.content.array_records["arrays"]["w"].numpy()
    assert np.all(sent[~mask] == 0) and np.array_equal(sent[mask], weights["w"].numpy()[mask])

    # The node restarted and lost its local model: it uploads nothing and asks for everything.
    reply = collaborative_mod(second, _context(), _trainer(1.0)[0])
    assert reply.content.metric_records["metrics"]["collaborative-resync"] == 1.0
    assert not reply.content.array_records["arrays"]["w"].numpy().any()
    strategy.aggregate_train(2, [reply])
    third = list(strategy.configure_train(3, weights, ConfigRecord(), grid))[0]
    assert MASK_KEY not in third.content.array_records


def _reply_w(delta: np.ndarray, to: Message) -> Message:
    metrics = MetricRecord({"train-loss": 1.0, "num-examples": 3, "collaborative-resync": 0.0})
    content = RecordDict({"arrays": ArrayRecord({"w": Array(delta)}), "metrics": metrics})
    return Message(content=content, reply_to=to)
