# Hugging Face Trainer: torchrun --standalone --nproc_per_node=2 examples/train_transformers.py
import difflib
import gc
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from distq.comm.transformers import QuantizedCommCallback
from distq.optim import QuantizedOptimizer

text = torch.tensor(list(Path(difflib.__file__).read_bytes()))  # local text as byte tokens
data = [{"input_ids": s, "labels": s} for s in text[: len(text) // 64 * 64].view(-1, 64)]
config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                    bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(config)                                # random init, no download
opt = QuantizedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model)  # ternary
print(opt.summary.to_str().splitlines()[-1])                   # what is quantized
callback = QuantizedCommCallback(bits=2, clip=2.5)             # 2-bit gradients on the wire
args = TrainingArguments("runs/transformers", max_steps=20, per_device_train_batch_size=8,
                         use_cpu=True, ddp_find_unused_parameters=False, save_strategy="no",
                         report_to=[], disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                  callbacks=[callback])
loss = trainer.train().training_loss
print(f"rank {args.process_index}: loss {loss:.3f}, sent {callback.state.stats.bytes_sent} B")
del trainer                                                    # a clean exit on gloo: free the
gc.collect()                                                   # DDP model, then the group
torch.distributed.barrier()
torch.distributed.destroy_process_group()
