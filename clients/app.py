"""The ClientApp every SuperNode runs. Who the node is comes from its own node config (Deployment
Engine) or its entry in the run config (Simulation Engine); the handler for its role and attack
mode comes from ``fedleak.roles``. Honest participants and attackers reply with the same records
and metric keys, so the server cannot tell them apart."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedleak import protocol
from fedleak.clients.collaborative_mod import collaborative_mod
from fedleak.clients.privacy_mods import local_dp_mod, update_defense_mod
from fedleak.records import NodeReport
from fedleak.reporting import participant_reporter
from fedleak.roles import client_handler
from fedleak.settings import FederationSettings
from fedleak.settings.flower import NodeIdentity, from_run_config, node_identity

# Outermost first: Flower's local DP noises what the update defenses left, on fedavg/fedsgd.
app = ClientApp(mods=[local_dp_mod, update_defense_mod, collaborative_mod])

ANNOUNCED = "fedleak.announced"  # node state: this node told the experimenter who it is


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = from_run_config(context.run_config)
    identity = node_identity(context.node_config, context.run_config)
    if ANNOUNCED not in context.state.config_records:
        announce(context, identity, settings)
    handler = client_handler(identity.spec.role, identity.spec.mode)
    return handler(msg, context, identity, settings)


def announce(context: Context, identity: NodeIdentity, settings: FederationSettings) -> None:
    """Tell the experimenter (never the server) which Flower node this participant is."""
    from fedleak.training import device_for

    spec = identity.spec
    record = NodeReport(
        participant=spec.index,
        node=int(context.node_id),
        role=spec.role,
        device=str(device_for(settings)),
    )
    participant_reporter(spec, settings).send(record)
    context.state[ANNOUNCED] = ConfigRecord({"node": int(context.node_id)})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the received model on this participant's own classes of the test set."""
    from fedleak.data import load_dataset
    from fedleak.messages import received_model
    from fedleak.metrics.classification import accuracy

    settings = from_run_config(context.run_config)
    spec = node_identity(context.node_config, context.run_config).spec
    model = received_model(msg, settings)
    test = load_dataset(settings.data.dataset, "test", settings.data.root or None)
    if spec.class_list:
        test = test.of_classes(spec.class_list)
    acc = accuracy(model, test.images, test.labels) if len(test) else 0.0
    metrics = MetricRecord({protocol.EVAL_ACCURACY: acc, protocol.NUM_EXAMPLES: max(1, len(test))})
    return Message(content=RecordDict({protocol.METRICS: metrics}), reply_to=msg)
