# Plain DDP: torchrun --standalone --nproc_per_node=2 examples/train_ddp.py
import torch
import torch.distributed as dist

from distq.comm import QuantizedCommState, quantized_hook
from distq.optim import QuantizedOptimizer

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
model = torch.nn.parallel.DistributedDataParallel(model)
state = QuantizedCommState(bits=2, clip=2.5)                  # 2-bit gradients on the wire
model.register_comm_hook(state, quantized_hook)
opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=3e-3), model, scheme="ternary")
for _ in range(20):
    x = torch.randn(32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), x[:, :10].argmax(1))
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"rank {dist.get_rank()}: loss {loss.item():.3f}, sent {state.stats.bytes_sent} B")
dist.destroy_process_group()
