# Horovod: horovodrun -np 2 --gloo python examples/train_horovod.py
import horovod.torch as hvd
import torch

from distq.comm.horovod import DistributedOptimizer
from distq.optim import QuantizedOptimizer

hvd.init()
model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=3e-3), model)
opt = DistributedOptimizer(opt, model.named_parameters(), bits=2, collective="allgather")
for _ in range(20):
    x = torch.randn(32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), x[:, :10].argmax(1))
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"rank {hvd.rank()}: loss {loss.item():.3f}, sent {opt.stats.bytes_sent} B")
