"""IWSLT under DDP: the step's gradient is the mean over every rank's target tokens, as fairseq divides the summed
loss by the global token count; not the mean of the ranks' per-token means, which over-weighs the tokens of a
rank whose batch has fewer. Two gloo ranks whose batches hold 4 and 22 tokens, through the engine's own step."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench.train.runtime import autocast_for
from bench.train.state import setup
from bench.config import RunConfig
from bench.train.step import train_step
from bench.task import Job
from tasks.iwslt14 import LabelSmoothedCrossEntropy, count_tokens
from tasks.translation.data import PAD

VOCAB = 7


class TokenModel(nn.Module):
    """(B, T) tokens -> (B, T, VOCAB) logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(VOCAB, 5), nn.Linear(5, VOCAB)

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)))


def _batch(rank):
    """Rank 0: 2 sentences, 4 tokens; rank 1: 2 sentences, 22 tokens (pads beyond)."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(3, VOCAB, (2, 11), generator=g)
    y = torch.randint(3, VOCAB, (2, 11), generator=g)
    if rank == 0:
        y[:, 2:] = PAD
    return x, y


def _cfg(minimizer):
    return RunConfig.of(task="iwslt14-de-en", model="toy", minimizer=minimizer, optimizer="sgd", lr=1.0, momentum=0.0,
                     weight_decay=0.0, schedule="constant", epochs=1, batch_size=2, world_size=2, device="cpu",
                     label_smoothing=0.1, rho=0.05 if minimizer == "sam" else 0.0)


def _job():
    return Job(model=TokenModel(), train_loader=[None], test_loader=[], loss_fn=LabelSmoothedCrossEntropy(0.1),
               num_train=4, count=count_tokens, fixed_batch=False)


def _worker(rank, world, rdv, out_dir, minimizer):
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    st = setup(_cfg(minimizer), _job(), torch.device("cpu"))
    x, y = _batch(rank)
    train_step(st, x, y, autocast_for("fp32", st.device))
    torch.save([p.detach().clone() for p in st.model.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _reference_sgd():
    """One process: the loss summed over both ranks' tokens, divided by all of them; one SGD step of lr 1."""
    model = TokenModel()
    loss_fn = LabelSmoothedCrossEntropy(0.1)
    total = sum(count_tokens(_batch(r)[1]) for r in range(2))
    loss = sum(loss_fn(model(_batch(r)[0]), _batch(r)[1]) * count_tokens(_batch(r)[1]) for r in range(2)) / total
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad
    return list(model.parameters())


@pytest.mark.parametrize("minimizer", ["sgd", "sam"])
def test_ddp_gradient_is_the_mean_over_all_tokens(tmp_path, minimizer):
    mp.start_processes(_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path), minimizer), nprocs=2,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))
    if minimizer == "sgd":
        ref = _reference_sgd()
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(r0, ref))
        naive = TokenModel()  # the mean of the two per-token means: what it was, and measurably different
        (sum(LabelSmoothedCrossEntropy(0.1)(naive(_batch(r)[0]), _batch(r)[1]) for r in range(2)) / 2).backward()
        moved = [p.detach() - p.grad for p in naive.parameters()]
        assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(r0, moved))
