# Accelerate: torchrun --standalone --nproc_per_node=2 examples/train_accelerate.py
import torch
from accelerate import Accelerator

from distq.comm import QuantizedCommState, quantized_hook

accelerator = Accelerator(cpu=True)
model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
model, opt = accelerator.prepare(model, opt)                   # a DDP model on 2 processes
state = QuantizedCommState(bits=2, clip=2.5)
model.register_comm_hook(state, quantized_hook)               # instead of comm_hook=<enum>
for _ in range(20):
    x = torch.randn(32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), x[:, :10].argmax(1))
    opt.zero_grad()
    accelerator.backward(loss)
    opt.step()
print(f"rank {accelerator.process_index}: loss {loss.item():.3f}, sent {state.stats.bytes_sent} B")
