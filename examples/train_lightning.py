# Lightning: torchrun --standalone --nproc_per_node=2 examples/train_lightning.py
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

from distq.comm.lightning import QuantizedCommHook


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(),
                                       torch.nn.Linear(256, 10))

    def training_step(self, x, _):
        return torch.nn.functional.cross_entropy(self.net(x), x[:, :10].argmax(1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


hook = QuantizedCommHook(bits=2, clip=2.5)                     # registers distq's DDP hook
trainer = pl.Trainer(strategy=DDPStrategy(), accelerator="cpu", devices=2, max_steps=20,
                     callbacks=[hook], logger=False, enable_checkpointing=False)
trainer.fit(Model(), torch.utils.data.DataLoader(torch.randn(640, 32), batch_size=32))
print(f"rank {trainer.global_rank}: sent {hook.state.stats.bytes_sent} B")
