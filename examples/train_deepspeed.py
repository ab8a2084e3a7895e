# DeepSpeed: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/train_deepspeed.py
import deepspeed
import torch

from distq.comm import QuantizedCommState
from distq.comm.deepspeed import quantize_engine
from distq.optim import QuantizedOptimizer

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
config = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 2,
          "gradient_clipping": 1.0}
engine, _, _, _ = deepspeed.initialize(
    model=model, config=config,
    optimizer=lambda params: QuantizedOptimizer(torch.optim.Adam(params, lr=3e-3), model))
exchange = quantize_engine(engine, QuantizedCommState(bits=2, clip=2.5))  # engine's allreduce off
for _ in range(40):          # 20 steps of 2 micro-batches
    x = torch.randn(32, 32)
    loss = torch.nn.functional.cross_entropy(engine(x), x[:, :10].argmax(1))
    engine.backward(loss)
    engine.step()
print(f"rank {engine.global_rank}: sent {exchange.state.stats.bytes_sent} B")
