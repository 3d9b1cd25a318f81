"""Send 1,000 floats to every node each round, average what comes back; print each round's
seconds (the benchmark reads them from `flwr log`)."""

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds, nodes = int(context.run_config["rounds"]), int(context.run_config["nodes"])
    while len(list(grid.get_node_ids())) < nodes:
        time.sleep(0.2)
    weights = np.zeros(1000, dtype=np.float32)
    for r in range(1, rounds + 1):
        started = time.monotonic()
        record = RecordDict({"arrays": ArrayRecord({"w": Array(weights)})})
        messages = [
            Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n)
            for n in grid.get_node_ids()
        ]
        replies = list(grid.send_and_receive(messages, timeout=600))
        weights = np.mean(
            [m.content.array_records["arrays"]["w"].numpy() for m in replies if not m.has_error()],
            axis=0,
        )
        print(f"floor round {r}: {time.monotonic() - started:.3f} s", flush=True)
