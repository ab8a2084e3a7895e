"""One Hugging Face Trainer run with distq on 2 ranks, for tests/integrations/test_transformers.py.

    torchrun --nproc_per_node=2 transformers_worker.py OUT_DIR [--steps N] [--accumulation K]
        [--static-graph]

A tiny randomly initialised GPT-2 (no downloads), seeded differently on each rank (no shared
seed), learns byte-level language modelling on a standard-library source file. Ternary weights
through `QuantizedOptimizer(AdamW)` handed to `Trainer(optimizers=(opt, None))` (built before
the Trainer wraps the model in DDP) and 2-bit gradients through `QuantizedCommCallback`. Each
rank writes OUT_DIR/rank<r>.pt: its parameters and latent weights, the logged losses and
distq's byte counters.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

SEQUENCE = 32


def tiny_model(kind: str, seed: int) -> torch.nn.Module:
    """A 2-layer, 32-wide causal LM over 256 byte tokens, randomly initialised with `seed`."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokens = {"vocab_size": 256, "bos_token_id": 0, "eos_token_id": 0}
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, **tokens))
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, **tokens)  # fmt: skip
    return LlamaForCausalLM(config)


def byte_sequences(text: Path, length: int = SEQUENCE) -> list[dict[str, torch.Tensor]]:
    """`text` as byte tokens, cut into sequences of `length` that are their own labels."""
    data = torch.tensor(list(text.read_bytes()), dtype=torch.long)
    rows = data[: len(data) // length * length].view(-1, length)
    return [{"input_ids": r, "labels": r} for r in rows]


def main() -> None:
    from transformers import Trainer, TrainingArguments

    from distq.comm.transformers import QuantizedCommCallback
    from distq.optim import QuantizedOptimizer

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--static-graph", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    model = tiny_model("gpt2", seed=rank)
    opt = QuantizedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, "ternary")
    initial = {n: t.clone() for n, t in opt.latent.items()}  # this rank's own initial weights
    callback = QuantizedCommCallback(bits=2, clip=2.5)
    training = TrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps, use_cpu=True,
        per_device_train_batch_size=4, gradient_accumulation_steps=args.accumulation,
        ddp_static_graph=args.static_graph, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True,
    )  # fmt: skip
    data = byte_sequences(Path(argparse.__file__))
    trainer = Trainer(model=model, args=training, train_dataset=data, optimizers=(opt, None),
                      callbacks=[callback])  # fmt: skip
    trainer.train()
    stats = callback.state.compression_stats()
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "latent": opt.latent,
            "initial": initial,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "stats": {"bytes_sent": stats.bytes_sent, "steps": stats.steps,
                      "uncompressed_bytes_sent": stats.uncompressed_bytes_sent},
            "numel": sum(p.numel() for p in model.parameters()),
        },
        args.out / f"rank{rank}.pt",
    )  # fmt: skip
    del trainer  # free the DDP model, then close gloo: a live DDP at exit may abort
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    json.dump({"ok": True}, sys.stdout)


if __name__ == "__main__":
    main()
