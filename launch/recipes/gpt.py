"""A byte-level decoder-only transformer language model: the corpus charlm reads (a text file or
folder, default the Python standard library's sources, offline) as UTF-8 bytes, a vocabulary of
256, scored in bits per byte on the held-out end.

Windows: the bytes are cut into consecutive, non-overlapping windows of `bptt` bytes (the
context length); window k reads ids[s : s+T] and predicts ids[s+1 : s+T+1] for s = k·T, so the
byte at position t of a window is scored after t bytes of context (0..T−1), every byte once.
The held-out split is the last `test_fraction` of the bytes, windowed the same way.

Model (GPT-2 style, pre-LayerNorm): token embedding + learned position embedding → `depth`
blocks of x + attn(LN(x)), x + MLP(LN(x)) → LayerNorm → output head. Attention is causal
self-attention with q, k, v and out as nn.Linear layers (distq's weight selection quantizes them
like any Linear) and torch's scaled_dot_product_attention(is_causal=True); the MLP is
Linear(E, 4E) → GELU → Linear(4E, E). Width E = --hidden, blocks = --depth, context = --bptt,
heads = `default_heads(E)` (head width ≈ 32).

The token embedding is stored as a Linear(256, E) weight (as charlm's is) so that
keep_full_precision's 'first' names it, and the output head is its own Linear(E, 256), untied,
so 'last' names it: with the defaults both stay full precision and every weight inside the
blocks is quantized. A tied head would be the embedding itself, and 'last' would then fall on
the last block's MLP projection; at 256 × E the untied head costs few parameters. Logits come
out as (B, V, T), so cross_entropy against (B, T) targets is the mean loss per byte in nats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional

from distq.launch.recipes import charlm
from distq.launch.recipes.base import Split

VOCAB = 256  # one token per byte value
HEAD_WIDTH = 32
INIT_STD = 0.02


def default_heads(width: int) -> int:
    """Attention heads for model width E: the largest divisor of E not above max(1, E // 32),
    so heads are about 32 wide and always split E evenly (E = 48: 1 head, E = 256: 8)."""
    target = max(1, width // HEAD_WIDTH)
    return next(h for h in range(target, 0, -1) if width % h == 0)


def corpus_bytes(data_dir: str | None = None) -> Tensor:
    """The corpus (charlm's: `data_dir`, or the standard library's sources) as UTF-8 byte
    ids, int64."""
    text = charlm.default_corpus() if data_dir is None else charlm.read_corpus(data_dir)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def windows(ids: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """(x, y): x[k] = ids[s : s+T] and y[k] = ids[s+1 : s+T+1] for s = k·T (T = `context`):
    consecutive windows score consecutive bytes."""
    count = (len(ids) - 1) // context
    if count < 1:
        raise ValueError(
            f"a text of {len(ids)} bytes is too short for one window of bptt={context} (+1 target)"
        )
    x = ids[: count * context].reshape(count, context)
    y = ids[1 : count * context + 1].reshape(count, context)
    return x.contiguous(), y.contiguous()


def load(test_fraction: float, seed: int, data_dir: str | None = None, bptt: int = 100) -> Split:
    """Windows of `bptt` bytes of the corpus; the last `test_fraction` of the bytes is held out
    (its first byte is predicted from the last training byte). The split is contiguous, so
    `seed` changes nothing here (the batch order comes from it)."""
    del seed
    ids = corpus_bytes(data_dir)
    cut = len(ids) - round(test_fraction * len(ids))
    train_x, train_y = windows(ids[:cut], bptt)
    test_x, test_y = windows(ids[cut - 1 :], bptt)
    return Split(train_x, train_y, test_x, test_y, classes=VOCAB)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: q, k, v, out are nn.Linear(E, E)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"heads={heads} does not divide the width {width}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, E = x.shape

        def split(t: Tensor) -> Tensor:  # (B, T, E) -> (B, heads, T, E / heads)
            return t.view(B, T, self.heads, E // self.heads).transpose(1, 2)

        y = functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(B, T, E))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Byte embedding + position embedding → blocks → LayerNorm → head; reads (B, T) byte ids,
    T ≤ context, returns (B, 256, T) logits, position t seeing bytes 0..t only."""

    def __init__(self, width: int, depth: int, context: int, heads: int | None = None) -> None:
        super().__init__()
        self.context = context
        self.embed = charlm.TableEmbedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        heads = heads or default_heads(width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)
        self._init(depth)

    def _init(self, depth: int) -> None:
        """GPT-2's: N(0, 0.02) weights, zero biases, the projections into the residual stream
        scaled by 1/√(2·depth) so its variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.position, std=INIT_STD)
        for block in self.blocks:
            for layer in (block.attn.out, block.proj):
                nn.init.normal_(layer.weight, std=INIT_STD / math.sqrt(2 * depth))

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[1]
        if length > self.context:
            raise ValueError(
                f"a window of {length} bytes is longer than the context {self.context}"
            )
        x = self.embed(ids) + self.position[:length]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)).transpose(1, 2)


def build_model(width: int, depth: int, bptt: int = 100) -> GPT:
    """The byte-level transformer: `depth` blocks of width `width`, a context of `bptt` bytes."""
    return GPT(width, depth, bptt)


def scores(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Held-out mean loss per byte in nats (test_loss) and in bits (test_bpb = test_loss / ln 2;
    8 for a uniform model over 256 bytes)."""
    bpb = charlm.bits_per_char(model, x, y)
    return {"test_loss": bpb * math.log(2), "test_bpb": bpb}
