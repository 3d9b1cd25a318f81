"""Return the received floats plus one: no data, next to no compute. With run config
``torch = 1`` it first imports PyTorch and takes one SGD step of a small CNN on 8 random
28x28 images: the floor of any PyTorch app on Flower (a fresh process per message imports
torch every time)."""

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def one_torch_step() -> None:
    import torch
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.Conv2d(32, 64, 5, padding=2, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 14 * 14, 11),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(torch.rand(8, 1, 28, 28)), torch.randint(0, 10, (8,)))
    loss.backward()
    opt.step()


@app.train()
def train(msg: Message, context: Context) -> Message:
    if int(context.run_config.get("torch", 0)):
        one_torch_step()
    w = msg.content.array_records["arrays"]["w"].numpy() + 1.0
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(w)}),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    return Message(content=content, reply_to=msg)
