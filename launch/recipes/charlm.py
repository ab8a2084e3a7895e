"""A character-level language model: any text file or folder as corpus (default: the Python
standard library's own sources, offline), a quantizable LSTM, bits per character held out.

Training windows: the corpus (a vocabulary of its distinct characters) is cut into windows of
`bptt` scored characters, each preceded by `bptt // 2` burn-in characters that the model reads
without gradient (truncated BPTT: gradients flow back `bptt` steps, the state at the window's
start is the burn-in's, not zero). The held-out split is the corpus' last `test_fraction`,
windowed the same way, so every held-out character is scored once, after ≥ bptt/2 of context.

Model: a full-precision embedding (`encoder`, an embedding table stored as a Linear weight so
keep_full_precision's 'first' names it), the LSTM (distq.lstm; W_x and W_h quantized, per gate
block), and a full-precision softmax layer (`decoder`, 'last'). Logits come out as (B, V, T),
so cross_entropy against (B, T) targets is the mean per-character loss in nats.
"""

from __future__ import annotations

import logging
import math
import sysconfig
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional

from distq.launch.recipes.base import Split
from distq.lstm import QuantLSTM

log = logging.getLogger(__name__)

DEFAULT_CORPUS_CHARS = 2_000_000  # a fixed prefix of the sorted stdlib sources: reproducible
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})


def burn_in(bptt: int) -> int:
    """Characters read without gradient before each window's `bptt` scored ones."""
    return bptt // 2


def default_corpus(chars: int = DEFAULT_CORPUS_CHARS) -> str:
    """The first `chars` characters of this interpreter's standard-library .py files, read in
    sorted path order (test suites and site-packages left out): a code corpus needing no
    download, the same for a given Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    parts, total = [], 0
    for path in files:
        text = _read_text(path)
        if text is None:
            continue
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    corpus = "".join(parts)[:chars]
    if not corpus:
        raise FileNotFoundError(f"no readable .py sources under the standard library at {root}")
    return corpus


def read_corpus(path: str | Path) -> str:
    """A text file, or every UTF-8 text file under a folder (sorted paths, concatenated; files
    that are not UTF-8 are skipped). FileNotFoundError / ValueError name the path."""
    path = Path(path)
    if path.is_file():
        text = _read_text(path)
        if text is None:
            raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        texts = [t for t in map(_read_text, files) if t is not None]
        if len(texts) < len(files):
            log.info("corpus %s: skipped %d non-UTF-8 files", path, len(files) - len(texts))
        text = "".join(texts)
    else:
        raise FileNotFoundError(f"corpus path {str(path)!r} does not exist")
    if not text:
        raise ValueError(f"corpus {str(path)!r} holds no text")
    return text


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def windows(ids: Tensor, bptt: int) -> tuple[Tensor, Tensor]:
    """(x, y): x[k] = ids[s−W : s+bptt] and y[k] = ids[s+1 : s+bptt+1] for s = W + k·bptt
    (W = burn_in(bptt)): consecutive windows score consecutive characters."""
    W = burn_in(bptt)
    count = (len(ids) - W - 1) // bptt
    if count < 1:
        raise ValueError(
            f"a text of {len(ids)} characters is too short for one window of bptt={bptt} "
            f"(+{W} burn-in, +1 target)"
        )
    x = ids[: W + count * bptt].unfold(0, W + bptt, bptt)
    y = ids[W + 1 : W + 1 + count * bptt].reshape(count, bptt)
    return x.contiguous(), y.contiguous()


def load(test_fraction: float, seed: int, data_dir: str | None = None, bptt: int = 100) -> Split:
    """Windows of the corpus (`data_dir`: a text file or folder; None: default_corpus()); the
    last `test_fraction` of the text is held out. `classes` is the vocabulary size. The split
    is contiguous, so `seed` changes nothing here (the batch order comes from it)."""
    del seed
    text = default_corpus() if data_dir is None else read_corpus(data_dir)
    vocab = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([lookup[ch] for ch in text], dtype=torch.int64)
    cut = len(ids) - round(test_fraction * len(ids))
    train_x, train_y = windows(ids[:cut], bptt)
    test_x, test_y = windows(ids[cut - burn_in(bptt) :], bptt)
    return Split(train_x, train_y, test_x, test_y, classes=len(vocab))


class TableEmbedding(nn.Linear):
    """An embedding table stored as a Linear(vocab, width)'s weight (so distq's selection treats
    it as it does any Linear), looked up by id in its own forward: a sharding wrapper (FSDP2)
    gathers the weight around this call, which a read of `.weight` from outside would miss."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__(vocab, width, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        return functional.embedding(ids, self.weight.t())


class CharLM(nn.Module):
    """Embedding → QuantLSTM → softmax layer; reads (B, W + T) ids, returns (B, V, T) logits
    for the last T positions (the first W are burn-in, run without gradient)."""

    def __init__(self, vocab: int, hidden: int, depth: int, norm: str, burn_in: int) -> None:
        super().__init__()
        self.burn_in = burn_in
        self.encoder = TableEmbedding(vocab, hidden)
        nn.init.normal_(self.encoder.weight, std=0.1)
        self.lstm = QuantLSTM(hidden, hidden, depth, norm)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        embedded = self.encoder(ids)
        state = None
        if self.burn_in:
            with torch.no_grad():
                _, state = self.lstm(embedded[:, : self.burn_in])
            state = [(h.detach(), c.detach()) for h, c in state]
        out, _ = self.lstm(embedded[:, self.burn_in :], state)
        return self.decoder(out).transpose(1, 2)


def build_model(vocab: int, hidden: int, depth: int, norm: str = "none", bptt: int = 100):
    """The character LM over `vocab` characters: `depth` LSTM layers of width `hidden`."""
    return CharLM(vocab, hidden, depth, norm, burn_in(bptt))


def bits_per_char(model: nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    """Mean cross-entropy per scored character in bits (eval mode): log2(V) for a uniform
    model over V characters."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            logits = model(x[i : i + batch])
            total += functional.cross_entropy(logits, y[i : i + batch], reduction="sum").item()
    model.train(was_training)
    return total / (y.numel() * math.log(2))
