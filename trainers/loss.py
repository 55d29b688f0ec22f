"""Next-token cross-entropy, summed over the label tokens of a batch: plain (the model's whole logits), or chunked
through the LM head so that a [tokens x vocabulary] logits tensor is never held whole.

The chunked loss runs inside the LM head's own call (its `forward` is swapped for the length of one model call):
the head receives the final hidden states, keeps only the positions that have a label, and computes logits and
cross-entropy a chunk of tokens at a time, each chunk under activation checkpointing (its logits are recomputed
in the backward rather than kept). The head is still called as a module, so DeepSpeed ZeRO-3 gathers its weight
around it as it does for any layer. It is the plain loss exactly when the model's logits are its head applied to
its last hidden states, which `exact_for` checks on the model itself before training.
"""

import math
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipelines.chat import IGNORE

MIN_CHUNK_BYTES = 32 * 1024**2  # fp32 logits a chunk holds at least: smaller chunks cost more calls than they save


def chunk_tokens(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk when `tokens` go through the head: a chunk's logits about as large as all their hidden
    states (Liger-Kernel's rule, a power of two: the loss then never needs more than the layers' activations), but
    not under MIN_CHUNK_BYTES of logits (on a small model, many tiny chunks only add overhead)."""
    rule = 1 << max(0, math.ceil(tokens / math.ceil(vocab / hidden)) - 1).bit_length()
    return min(tokens, max(rule, MIN_CHUNK_BYTES // (4 * vocab)))


def forward(model, batch: dict):
    """The model's output for a collated batch (no KV cache: with one, transformers would not isolate packed
    sequences)."""
    return model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        use_cache=False,
    )


def plain_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy, correct argmax predictions) over positions whose label is not IGNORE."""
    logits, labels = logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long()
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    if torch.is_grad_enabled():  # training: no one reads it
        return loss, torch.zeros((), dtype=torch.long)
    return loss, ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum().cpu()


def _chunk_loss(head_forward, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_forward(hidden).float(), labels, reduction="sum")


class TokenLoss:
    """The summed loss (and, for evaluation, correct predictions) of a batch through `model`, chunked or plain."""

    def __init__(self, model, chunked: bool, chunk: int | None = None):
        self.head = model.get_output_embeddings() if chunked else None
        # (sizes from the config: under ZeRO-3 the head's weight is a partition)
        text = model.config.get_text_config()
        self.chunk, self.hidden, self.vocab = chunk, text.hidden_size, text.vocab_size
        self.correct = torch.zeros((), dtype=torch.long)

    def __call__(self, model, batch: dict) -> torch.Tensor:
        """The summed loss; `self.correct` then holds the correct predictions (counted only without gradients)."""
        if self.head is None:
            loss, self.correct = plain_sums(forward(model, batch).logits, batch["labels"])
            return loss
        with self._head_computes_loss(batch["labels"]):
            loss = forward(model, batch).logits  # what the head returned: the loss itself
        return loss.reshape(())

    @contextmanager
    def _head_computes_loss(self, labels: torch.Tensor):
        head, owner = self.head, self
        original = types.MethodType(type(head).forward, head)  # the head's own computation, without its hooks

        def loss_forward(_, hidden: torch.Tensor) -> torch.Tensor:
            targets = labels[:, 1:].flatten()
            keep = targets != IGNORE
            hidden, targets = hidden[:, :-1].flatten(0, 1)[keep], targets[keep]
            total = hidden.new_zeros((), dtype=torch.float32)
            chunk = owner.chunk or max(1, chunk_tokens(len(targets), owner.hidden, owner.vocab))
            correct = torch.zeros((), dtype=torch.long)
            for start in range(0, len(targets), chunk):
                h, t = hidden[start : start + chunk], targets[start : start + chunk]
                if torch.is_grad_enabled():  # logits recomputed in the backward instead of kept
                    total = total + checkpoint(_chunk_loss, original, h, t, use_reentrant=False)
                else:
                    logits = original(h).float()
                    total = total + F.cross_entropy(logits, t, reduction="sum")
                    correct += (logits.argmax(-1) == t).sum().cpu()
            owner.correct = correct
            return total

        head.forward = types.MethodType(loss_forward, head)
        try:
            yield
        finally:
            del head.forward  # the class's forward again (generation and export see the plain head)


@torch.no_grad()
def exact_for(model, chunk: int = 3) -> bool:
    """Whether the chunked loss equals the plain one on this model (its logits are its head applied to its last
    hidden states, with nothing after), checked on a few tokens in several chunks."""
    vocab = model.config.get_text_config().vocab_size
    ids = (torch.arange(3, 13) * 7919 % vocab)[None]
    labels = ids.clone()
    labels[0, :3] = IGNORE
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(ids.shape[1])[None]}
    was_training = model.training
    model.eval()
    try:
        plain = TokenLoss(model, chunked=False)(model, batch)
        chunked = TokenLoss(model, chunked=True, chunk=chunk)(model, batch)
    finally:
        model.train(was_training)
    return bool(torch.allclose(plain, chunked, rtol=1e-5, atol=1e-6))
